# Evaluation: patient- and sample-level metrics with bootstrap CIs per (task, model), then one
# HTML report over all of them.


rule evaluate:
    input:
        predictions=f"{OUT}/{{task}}/{{model}}/predictions.csv",
    output:
        metrics=f"{OUT}/{{task}}/{{model}}/metrics.json",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("seed", "evaluation")),
    log:
        f"{OUT}/logs/evaluate/{{task}}_{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate/{{task}}_{{model}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit evaluate --config {params.study:q} --task {wildcards.task:q} --model {wildcards.model:q}"
        " --predictions {input.predictions:q} --out {output.metrics:q} > {log:q} 2>&1"


rule report:
    input:
        metrics=all_metrics(),
        extras=EXTRA_TARGETS,
    output:
        html=report(f"{OUT}/report/index.html", caption="../report/evaluation_report.rst", category="Report"),
        figures=report(
            directory(f"{OUT}/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        study=STUDY_FILE,
        evaluation=json.dumps(config["evaluation"], sort_keys=True),
    log:
        f"{OUT}/logs/report/report.log",
    benchmark:
        f"{OUT}/benchmarks/report/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit report --config {params.study:q} --out {output.html:q} {input.metrics:q} > {log:q} 2>&1"
