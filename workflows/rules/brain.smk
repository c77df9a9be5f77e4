# Brain MRI: YOLOv8 detection, patient-to-patient evaluation, DeiT distillation.
#
# "Realism in Action": the brain split (rules/data.smk) is already resampled to the anomaly
# distribution (tasks.brain.anomaly_ratio, by patient or image; the achieved ratios are in
# split.json). On it, when enabled in tasks.brain:
#   detection: brain/detector/   YOLOv8 trained offline; predictions.csv (slice = max box
#                                confidence), detection_metrics.json (mAP50, mAP50-95, P, R),
#                                examples.png, metrics.json (evaluate) and ptp.json (PTP)
#   distill:   brain/distill/    CNN teacher, DeiT student distilled from it, the same student
#                                without teacher; comparison.json (metrics, params, CPU latency)
#   cascade:   brain/cascade/    detector flags slices, the classifier scores them; per patient
# docs/brain.md describes the stages and the PTP definition.

# The detection, distill and cascade blocks are read by the rules below only: like the ViT
# keys, they are left out of every other rule's settings (common.smk `settings`), so editing
# e.g. detection.epochs does not re-split the data or retrain tasks.brain.models; the rules
# here name the blocks they read with `keep`.
# (listed in common.smk STAGE_KEYS)

if "brain" in TASKS:
    _brain = task_config(config, "brain")
    _BRAIN_OUT = f"{OUT}/brain"
    _DET = f"{_BRAIN_OUT}/detector"
    _DIS = f"{_BRAIN_OUT}/distill"
    _CAS = f"{_BRAIN_OUT}/cascade"
    _RUN = ("seed", "device", "deterministic")

    if _brain["cascade"]["enabled"] and not (_brain["detection"]["enabled"] and _brain["distill"]["enabled"]):
        raise WorkflowError("tasks.brain.cascade.enabled needs tasks.brain.detection.enabled and "
                            "tasks.brain.distill.enabled (the cascade runs the detector, then a distill model)")

    if _brain["detection"]["enabled"]:

        rule brain_detect:
            input:
                split=f"{_BRAIN_OUT}/split.csv",
            output:
                weights=f"{_DET}/model.safetensors",
                card=f"{_DET}/model.json",
                predictions=f"{_DET}/predictions.csv",
                boxes=f"{_DET}/boxes.csv",
                metrics=f"{_DET}/detection_metrics.json",
                figure=f"{_DET}/examples.png",
            params:
                study=STUDY_FILE,
                # PTP's k is applied after detection: changing it reruns brain_ptp, not the detector
                settings=lambda w: json.dumps({
                    **json.loads(settings("brain", drop=("models", "train"), extra=_RUN, keep=("detection",))),
                    "detection": {k: v for k, v in _brain["detection"].items() if k != "min_slices"}},
                    sort_keys=True),
                out_dir=lambda w, output: os.path.dirname(output.weights),
            log:
                f"{OUT}/logs/brain/detect.log",
            benchmark:
                f"{OUT}/benchmarks/brain/detect.tsv"
            threads: model_job_threads
            resources:
                mem_mb=4000,
                runtime=240,
                gpu=model_job_gpu,
            conda:
                CONDA_ENV
            shell:
                "medvit detect --config {params.study:q} --task brain --split {input.split:q}"
                " --out {params.out_dir:q} > {log:q} 2>&1"

        rule brain_detector_evaluate:
            input:
                predictions=f"{_DET}/predictions.csv",
                card=f"{_DET}/model.json",
            output:
                metrics=f"{_DET}/metrics.json",
            params:
                study=STUDY_FILE,
                settings=lambda w: settings("brain", drop=("models", "train"), extra=("seed", "evaluation")),
            log:
                f"{OUT}/logs/brain/detector_evaluate.log",
            benchmark:
                f"{OUT}/benchmarks/brain/detector_evaluate.tsv"
            threads: 1
            resources:
                mem_mb=2000,
                runtime=30,
                gpu=0,
            conda:
                CONDA_ENV
            shell:
                "medvit evaluate --config {params.study:q} --task brain --model detector"
                " --predictions {input.predictions:q} --out {output.metrics:q} > {log:q} 2>&1"

        rule brain_ptp:
            input:
                predictions=f"{_DET}/predictions.csv",
            output:
                ptp=f"{_DET}/ptp.json",
            params:
                study=STUDY_FILE,
                settings=lambda w: settings("brain", drop=("models", "train"), extra=("seed", "evaluation"),
                                            keep=("detection",)),
            log:
                f"{OUT}/logs/brain/ptp.log",
            benchmark:
                f"{OUT}/benchmarks/brain/ptp.tsv"
            threads: 1
            resources:
                mem_mb=2000,
                runtime=30,
                gpu=0,
            conda:
                CONDA_ENV
            shell:
                "medvit ptp --config {params.study:q} --task brain --predictions {input.predictions:q}"
                " --section detection --out {output.ptp:q} > {log:q} 2>&1"

        EXTRA_TARGETS += [f"{_DET}/ptp.json", f"{_DET}/metrics.json", f"{_DET}/detection_metrics.json",
                          f"{_DET}/examples.png"]

    if _brain["distill"]["enabled"]:

        # A teacher that is also one of tasks.brain.models was trained by `rule train` on the
        # same split with the same recipe and code: it is reused, not trained twice.
        _REUSE = _brain["distill"]["teacher"] in _brain["models"]

        rule brain_distill:
            input:
                unpack(lambda w: {
                    "split": f"{_BRAIN_OUT}/split.csv",
                    **({"teacher": f"{_DIS}/teacher/model.safetensors"} if w.role == "student_distilled" else {}),
                    **({"reuse": f"{_BRAIN_OUT}/{_brain['distill']['teacher']}/model.safetensors"}
                       if w.role == "teacher" and _REUSE else {})}),
            output:
                weights=f"{_DIS}/{{role}}/model.safetensors",
                card=f"{_DIS}/{{role}}/model.json",
                predictions=f"{_DIS}/{{role}}/predictions.csv",
                metrics=f"{_DIS}/{{role}}/metrics.json",
            wildcard_constraints:
                role="teacher|student|student_distilled",
            params:
                study=STUDY_FILE,
                # the teacher trains with the task's `train` recipe, the students with distill.train
                settings=lambda w: json.dumps(
                    {**json.loads(settings("brain", drop=("models",), extra=_RUN, keep=TRAINING_KEYS)),
                     "teacher": _brain["distill"]["teacher"]} if w.role == "teacher" else
                    json.loads(settings("brain", drop=("models", "train"), extra=_RUN,
                                        keep=("distill",) + TRAINING_KEYS)),
                    sort_keys=True),
                evaluation=json.dumps(evaluation_settings(), sort_keys=True),
                flags=lambda w, input: (["--teacher", input.teacher] if w.role == "student_distilled" else
                                        ["--reuse", input.reuse] if w.role == "teacher" and _REUSE else []),
                out_dir=lambda w, output: os.path.dirname(output.weights),
            log:
                f"{OUT}/logs/brain/distill_{{role}}.log",
            benchmark:
                f"{OUT}/benchmarks/brain/distill_{{role}}.tsv"
            threads: model_job_threads
            resources:
                mem_mb=4000,
                runtime=240,
                gpu=model_job_gpu,
            conda:
                CONDA_ENV
            shell:
                "medvit distill {wildcards.role:q} --config {params.study:q} --task brain --split {input.split:q}"
                " {params.flags:q} --out {params.out_dir:q} > {log:q} 2>&1"

        rule brain_distill_compare:
            input:
                metrics=expand(f"{_DIS}/{{role}}/metrics.json", role=("teacher", "student", "student_distilled")),
                weights=expand(f"{_DIS}/{{role}}/model.safetensors", role=("teacher", "student", "student_distilled")),
            output:
                comparison=f"{_DIS}/comparison.json",
            params:
                study=STUDY_FILE,
                distill_dir=lambda w, output: os.path.dirname(output.comparison),
                settings=lambda w: json.dumps(task_config(config, "brain")["distill"]["latency_repeats"]),
            log:
                f"{OUT}/logs/brain/distill_compare.log",
            benchmark:
                f"{OUT}/benchmarks/brain/distill_compare.tsv"
            threads: 1
            resources:
                mem_mb=2000,
                runtime=30,
                gpu=0,
            conda:
                CONDA_ENV
            shell:
                "medvit distill-compare --config {params.study:q} --task brain --distill-dir {params.distill_dir:q}"
                " --out {output.comparison:q} > {log:q} 2>&1"

        EXTRA_TARGETS += [f"{_DIS}/comparison.json"]

    if _brain["cascade"]["enabled"]:

        rule brain_cascade:
            input:
                split=f"{_BRAIN_OUT}/split.csv",
                detector=f"{_DET}/model.safetensors",
                detections=f"{_DET}/predictions.csv",
                boxes=f"{_DET}/boxes.csv",
                classifier=f"{_DIS}/{_brain['cascade']['classifier']}/model.safetensors",
                # holds the classifier's validation-chosen threshold (cascade.threshold: null)
                classifier_metrics=f"{_DIS}/{_brain['cascade']['classifier']}/metrics.json",
            output:
                predictions=f"{_CAS}/predictions.csv",
                card=f"{_CAS}/model.json",
                metrics=f"{_CAS}/metrics.json",
                ptp=f"{_CAS}/ptp.json",
            params:
                study=STUDY_FILE,
                settings=lambda w: settings("brain", drop=("models", "train"), extra=("seed", "device", "evaluation"),
                                            keep=("detection", "cascade")),
                det_dir=lambda w, input: os.path.dirname(input.detector),
                out_dir=lambda w, output: os.path.dirname(output.predictions),
            log:
                f"{OUT}/logs/brain/cascade.log",
            benchmark:
                f"{OUT}/benchmarks/brain/cascade.tsv"
            threads: model_job_threads
            resources:
                mem_mb=4000,
                runtime=60,
                gpu=model_job_gpu,
            conda:
                CONDA_ENV
            shell:
                "medvit cascade --config {params.study:q} --task brain --split {input.split:q}"
                " --detector {params.det_dir:q} --classifier {input.classifier:q} --out {params.out_dir:q} > {log:q} 2>&1"

        EXTRA_TARGETS += [f"{_CAS}/metrics.json", f"{_CAS}/ptp.json"]
