# DVPT prompt tuning of a frozen ViT and the adaptation-method comparison.
#
# For each task whose `adapt.enabled` is true (xray, histo): the shared backbone (the task's MAE
# encoder, made by `rule pretrain` in rules/xray.smk, or a local checkpoint named in
# `adapt.backbone`) is adapted by each method of `adapt.methods` at each fraction of
# `adapt.fractions` of the training patients, on the task's split:
#   <task>/adapt/<method>_p<percent>/  adapter.safetensors + adapter.json (the task's own
#                                      tensors and the backbone's SHA-256), predictions.csv,
#                                      metrics.json
#   <task>/adapt/comparison.json       every run side by side (+ label_efficiency.png); the
#                                      report shows the method table and the figure
# One job per (task, method) runs all its fractions, so the ~7 s start-up of a stage is paid
# once per method. docs/dvpt.md describes the module and the comparison.

from medvit.config import adapt_methods

ADAPT_TASKS = [t for t in TASKS if config["tasks"][t].get("adapt", {}).get("enabled")]
# `adapt` is read by the rules below only: leave it out of every other stage's settings
# (rules/common.smk: settings), so tuning the comparison never reruns the split or the models.
# (listed in common.smk STAGE_KEYS)
ADAPT_METHODS = adapt_methods()


for _task in ADAPT_TASKS:
    # a rule per task: each has its own list of fractions (outputs)
    rule:
        name:
            f"adapt_{_task}"
        input:
            split=f"{OUT}/{_task}/split.csv",
            backbone=adapt_backbone(_task),
        output:
            adapters=adapt_run_files(_task, "{method}", "adapter.safetensors"),
            cards=adapt_run_files(_task, "{method}", "adapter.json"),
            predictions=adapt_run_files(_task, "{method}", "predictions.csv"),
            metrics=adapt_run_files(_task, "{method}", "metrics.json"),
        wildcard_constraints:
            method=_alternation(ADAPT_METHODS),
        params:
            study=STUDY_FILE,
            task=_task,
            settings=lambda w, t=_task: adapt_settings(t, w.method),
            out_dir=lambda w, output: os.path.dirname(os.path.dirname(output.adapters[0])),
        log:
            f"{OUT}/logs/adapt/{_task}_{{method}}.log",
        benchmark:
            f"{OUT}/benchmarks/adapt/{_task}_{{method}}.tsv"
        threads: model_job_threads
        resources:
            mem_mb=4000,
            runtime=240,
            gpu=model_job_gpu,
        conda:
            CONDA_ENV
        shell:
            "medvit adapt --config {params.study:q} --task {params.task:q} --method {wildcards.method:q}"
            " --split {input.split:q} --out {params.out_dir:q} > {log:q} 2>&1"

    rule:
        name:
            f"adapt_compare_{_task}"
        input:
            metrics=[m for method in config["tasks"][_task]["adapt"]["methods"]
                     for m in adapt_run_files(_task, method, "metrics.json")],
        output:
            comparison=f"{OUT}/{_task}/adapt/comparison.json",
            figure=f"{OUT}/{_task}/adapt/label_efficiency.png",
        params:
            study=STUDY_FILE,
            task=_task,
            settings=lambda w, t=_task: json.dumps(config["tasks"][t]["adapt"], sort_keys=True),
            adapt_dir=lambda w, output: os.path.dirname(output.comparison),
        log:
            f"{OUT}/logs/adapt/{_task}_compare.log",
        benchmark:
            f"{OUT}/benchmarks/adapt/{_task}_compare.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
            gpu=0,
        conda:
            CONDA_ENV
        shell:
            "medvit adapt-compare --config {params.study:q} --task {params.task:q} --adapt-dir {params.adapt_dir:q}"
            " --out {output.comparison:q} > {log:q} 2>&1"

    EXTRA_TARGETS.append(f"{OUT}/{_task}/adapt/comparison.json")
    # each run too (common.smk: EXTRA_TARGETS)
    EXTRA_TARGETS += [m for method in config["tasks"][_task]["adapt"]["methods"]
                      for m in adapt_run_files(_task, method, "metrics.json")]
