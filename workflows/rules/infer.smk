# New cohorts: `tasks.<task>.infer` lists cohorts (a folder of images or a manifest each) that
# every model of the task scores once it is trained and evaluated (evaluation completes the
# model package: medvit.tasks.package). No labels are needed; docs/inference.md.
#
#   <results_dir>/<study>/<task>/<model>/infer/<cohort>/predictions.csv (+ quarantine.csv, infer.json)
#
# Folder input goes through the identifier-free ingest path with $MEDVIT_PSEUDONYM_KEY (a random
# key for the run when it is unset). Its input functions are in rules/stages.smk.


rule infer:
    input:
        unpack(infer_inputs),
    output:
        predictions=f"{OUT}/{{task}}/{{model}}/infer/{{cohort}}/predictions.csv",
    params:
        source=lambda w: infer_cohorts(w.task)[w.cohort],
        model_dir=lambda w, input: os.path.dirname(input.weights),
        out_dir=lambda w, output: os.path.dirname(output.predictions),
        device=config["device"],
    wildcard_constraints:
        cohort=r"[A-Za-z0-9_-]+",
    log:
        f"{OUT}/logs/infer/{{task}}_{{model}}_{{cohort}}.log",
    benchmark:
        f"{OUT}/benchmarks/infer/{{task}}_{{model}}_{{cohort}}.tsv"
    threads: model_job_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=60,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit infer --model {params.model_dir:q} --input {params.source:q} --out {params.out_dir:q}"
        " --device {params.device:q} > {log:q} 2>&1"


EXTRA_TARGETS += [
    f"{OUT}/{task}/{model}/infer/{cohort}/predictions.csv"
    for task in TASKS
    for cohort in infer_cohorts(task)
    for model in config["tasks"][task]["models"]
]
