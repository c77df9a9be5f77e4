# Prostate bpMRI: CSwin-UNet, self-supervised pretraining, patient-level cross-validation.
#
#   split.csv -> [ssl/fold<i>/encoder.safetensors]          (cswin_unet_ssl only)
#             -> <model>/fold<i>/{model.safetensors, predictions.csv, maps/}   (one job per model and fold)
#             -> <model>/{model.safetensors (fold ensemble), predictions.csv (out-of-fold)} -> metrics.json
#             -> [<model>/external/{predictions.csv, metrics.json}]   (external cohort, when configured)
#             -> cv_summary.json + overlays.png -> report
#
# The pooled <model>/model.safetensors and predictions.csv are also what the generic `train`
# and `predict` rules would make; the ruleorder below hands them to the cross-validation rules
# for this task. Its log is logs/train/prostate_<model>.log: the ensemble of the fold models
# is the task's trained model. docs/prostate.md describes the outputs.

# PROSTATE, PROSTATE_DIR, PROSTATE_FOLDS, PROSTATE_EXTERNAL, PROSTATE_LOCAL_KEYS, CSWIN_MODELS
# and SSL_MODELS come from stages.smk, beside the input functions that read them.

if "prostate" in TASKS:

    rule prostate_ssl:
        input:
            split=f"{OUT}/prostate/split.csv",
            cache=cache_input("prostate"),
        output:
            encoder=f"{OUT}/prostate/ssl/fold{{fold}}/encoder.safetensors",
            card=f"{OUT}/prostate/ssl/fold{{fold}}/encoder.json",
        wildcard_constraints:
            fold=r"\d+",
        params:
            study=STUDY_FILE,
            settings=settings("prostate", drop=PROSTATE_LOCAL_KEYS + ("train",), keep=("ssl", "cswin") + TRAINING_KEYS,
                              extra=("seed", "device", "deterministic")),
            out_dir=lambda w, output: os.path.dirname(output.encoder),
        log:
            f"{OUT}/logs/ssl/prostate_fold{{fold}}.log",
        benchmark:
            f"{OUT}/benchmarks/ssl/prostate_fold{{fold}}.tsv"
        threads: model_job_threads
        resources:
            mem_mb=8000,
            runtime=240,
            gpu=model_job_gpu,
        conda:
            CONDA_ENV
        shell:
            "medvit ssl-pretrain --config {params.study:q} --task prostate --split {input.split:q}"
            " --fold {wildcards.fold:q} --out {params.out_dir:q} > {log:q} 2>&1"

    rule prostate_fold:
        input:
            unpack(prostate_fold_inputs),
        output:
            weights=f"{OUT}/prostate/{{model}}/fold{{fold}}/model.safetensors",
            card=f"{OUT}/prostate/{{model}}/fold{{fold}}/model.json",
            predictions=f"{OUT}/prostate/{{model}}/fold{{fold}}/predictions.csv",
            split=f"{OUT}/prostate/{{model}}/fold{{fold}}/split.csv",
        wildcard_constraints:
            fold=r"\d+",
        params:
            study=STUDY_FILE,
            settings=prostate_fold_settings,
            init=lambda w, input: ["--init", input.init] if "init" in input.keys() else [],
            out_dir=lambda w, output: os.path.dirname(output.weights),
        log:
            f"{OUT}/logs/train/prostate_{{model}}_fold{{fold}}.log",
        benchmark:
            f"{OUT}/benchmarks/train/prostate_{{model}}_fold{{fold}}.tsv"
        threads: model_job_threads
        resources:
            mem_mb=8000,
            runtime=240,
            gpu=model_job_gpu,
        conda:
            CONDA_ENV
        shell:
            "medvit cv-fold --config {params.study:q} --task prostate --model {wildcards.model:q}"
            " --split {input.split:q} --fold {wildcards.fold:q} {params.init:q} --out {params.out_dir:q} > {log:q} 2>&1"

    rule prostate_cv_pool:
        input:
            split=f"{OUT}/prostate/split.csv",
            weights=prostate_fold_files("model.safetensors"),
            predictions=prostate_fold_files("predictions.csv"),
        output:
            weights=f"{OUT}/prostate/{{model}}/model.safetensors",
            card=f"{OUT}/prostate/{{model}}/model.json",
            predictions=f"{OUT}/prostate/{{model}}/predictions.csv",
        params:
            study=STUDY_FILE,
            settings=lambda w: settings("prostate", drop=PROSTATE_LOCAL_KEYS + ("ssl", "train", "cswin")),
            folds=lambda w, input: [os.path.dirname(p) for p in input.weights],
            model_dir=lambda w, output: os.path.dirname(output.weights),
        log:
            f"{OUT}/logs/train/prostate_{{model}}.log",
        benchmark:
            f"{OUT}/benchmarks/train/prostate_{{model}}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
            gpu=0,
        conda:
            CONDA_ENV
        shell:
            "medvit cv-pool --config {params.study:q} --task prostate --model {wildcards.model:q}"
            " --split {input.split:q} --folds {params.folds:q} --out {params.model_dir:q} > {log:q} 2>&1"

    ruleorder: prostate_cv_pool > train
    ruleorder: prostate_cv_pool > predict

    if PROSTATE_EXTERNAL is not None:
        if PROSTATE["external_manifest"] is None:

            rule prostate_external_synth:
                output:
                    manifest=str(PROSTATE_EXTERNAL),
                params:
                    patients=PROSTATE["external_synthetic"]["patients"],
                    seed=PROSTATE["external_synthetic"]["seed"],
                    image_size=PROSTATE["synthetic"]["image_size"],
                    out_dir=lambda w, output: os.path.dirname(output.manifest),
                log:
                    f"{OUT}/logs/synth/prostate_external.log",
                benchmark:
                    f"{OUT}/benchmarks/synth/prostate_external.tsv"
                threads: 1
                resources:
                    mem_mb=2000,
                    runtime=30,
                    gpu=0,
                conda:
                    CONDA_ENV
                shell:
                    "medvit synth prostate --patients {params.patients:q} --image-size {params.image_size:q}"
                    " --seed {params.seed:q} --out {params.out_dir:q} > {log:q} 2>&1"

        rule prostate_external:
            input:
                split=f"{OUT}/prostate/split.csv",
                weights=f"{OUT}/prostate/{{model}}/model.safetensors",
                manifest=str(PROSTATE_EXTERNAL),
            output:
                predictions=f"{OUT}/prostate/{{model}}/external/predictions.csv",
                metrics=f"{OUT}/prostate/{{model}}/external/metrics.json",
            params:
                study=STUDY_FILE,
                settings=lambda w: settings("prostate", drop=("models", "figures", "ssl", "train", "cswin"),
                                            keep=("external_manifest", "external_synthetic"),
                                            extra=("seed", "device", "evaluation")),
                out_dir=lambda w, output: os.path.dirname(output.metrics),
            log:
                f"{OUT}/logs/external/prostate_{{model}}.log",
            benchmark:
                f"{OUT}/benchmarks/external/prostate_{{model}}.tsv"
            threads: model_job_threads
            resources:
                mem_mb=4000,
                runtime=60,
                gpu=model_job_gpu,
            conda:
                CONDA_ENV
            shell:
                "medvit external-test --config {params.study:q} --task prostate --model {wildcards.model:q}"
                " --split {input.split:q} --weights {input.weights:q} --out {params.out_dir:q} > {log:q} 2>&1"

    rule prostate_cv_summary:
        input:
            unpack(prostate_summary_inputs),
        output:
            summary=f"{OUT}/prostate/cv_summary.json",
        params:
            study=STUDY_FILE,
            settings=lambda w: settings("prostate", drop=("ssl", "train"),
                                        keep=("cswin", "figures", "external_manifest", "external_synthetic"),
                                        extra=("seed",)),
        log:
            f"{OUT}/logs/cv_summary/prostate.log",
        benchmark:
            f"{OUT}/benchmarks/cv_summary/prostate.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
            gpu=0,
        conda:
            CONDA_ENV
        shell:
            "medvit cv-summary --config {params.study:q} --task prostate --split {input.split:q}"
            " --out {output.summary:q} > {log:q} 2>&1"

    EXTRA_TARGETS.append(f"{PROSTATE_DIR}/cv_summary.json")
    # each fold too (common.smk: EXTRA_TARGETS)
    EXTRA_TARGETS += [f"{PROSTATE_DIR}/{m}/fold{i}/predictions.csv" for m in PROSTATE["models"] for i in PROSTATE_FOLDS]
