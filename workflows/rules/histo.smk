# Histopathology: DCT-HistoTransformer and lightweight peers with measured compute.
#
# Seeds: `tasks.<task>.compare.seeds` = n trains every model n times on the same split, with
# the seeds seed, seed + 1, ..., seed + n - 1. The run with the study seed is the generic one
# (rules/train.smk, rules/report.smk: <task>/<model>/); the others live one level down, in
# <task>/<model>/seed<s>/, made by the three rules below with the same `medvit train/predict/
# evaluate` calls (`--seed s` replaces the study seed for training). The `model` wildcard only
# matches model names, so the generic rules never see the seed folders.
#
# Comparison: when a task has two or more models (or seeds), `medvit compare` gathers every
# run's metrics.json, measures each architecture (params, FLOPs, CPU latency) and writes
# <task>/comparison.json + accuracy_vs_flops.png, which the report shows. Only the histo task
# has a `compare` block so far; the rules are written for any 2D classification task.

# `compare` is read by the rules below only: leave it out of every other stage's settings
# (rules/common.smk: settings), so adding a seed or changing the timing never retrains a model.
# (listed in common.smk STAGE_KEYS)

COMPARE_TASKS = [
    t
    for t in TASKS
    if "compare" in config["tasks"][t]
    and (len(config["tasks"][t]["models"]) > 1 or config["tasks"][t]["compare"]["seeds"] > 1
         or config["tasks"][t].get("folds", 1) > 1)
]


SEED_TASKS = [t for t in COMPARE_TASKS if extra_seeds(t)]


rule train_seed:
    input:
        split=f"{OUT}/{{task}}/split.csv",
        cache=lambda w: cache_input(w.task),
    output:
        weights=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/model.safetensors",
        card=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/model.json",
    wildcard_constraints:
        task=_alternation(SEED_TASKS),
        seed=r"\d+",
    params:
        study=STUDY_FILE,
        settings=_seed_settings,
        model_dir=lambda w, output: os.path.dirname(output.weights),
    log:
        f"{OUT}/logs/train/{{task}}_{{model}}_seed{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{{task}}_{{model}}_seed{{seed}}.tsv"
    threads: model_job_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=240,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit train --config {params.study:q} --task {wildcards.task:q} --model {wildcards.model:q}"
        " --split {input.split:q} --out {params.model_dir:q} --seed {wildcards.seed:q} > {log:q} 2>&1"


rule predict_seed:
    input:
        split=f"{OUT}/{{task}}/split.csv",
        cache=lambda w: cache_input(w.task),
        weights=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/model.safetensors",
    output:
        predictions=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/predictions.csv",
    wildcard_constraints:
        task=_alternation(SEED_TASKS),
        seed=r"\d+",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("device",)),
    log:
        f"{OUT}/logs/predict/{{task}}_{{model}}_seed{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{{task}}_{{model}}_seed{{seed}}.tsv"
    threads: model_job_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=60,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit predict --config {params.study:q} --task {wildcards.task:q} --model {wildcards.model:q}"
        " --split {input.split:q} --weights {input.weights:q} --out {output.predictions:q} > {log:q} 2>&1"


rule evaluate_seed:
    input:
        predictions=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/predictions.csv",
    output:
        metrics=f"{OUT}/{{task}}/{{model}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        task=_alternation(SEED_TASKS),
        seed=r"\d+",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("seed", "evaluation")),
    log:
        f"{OUT}/logs/evaluate/{{task}}_{{model}}_seed{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate/{{task}}_{{model}}_seed{{seed}}.tsv"
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


# CPU timing: the job asks for the threads it times with (compare.cpu_threads) and no GPU.
rule compare:
    input:
        unpack(comparison_inputs),
    output:
        comparison=f"{OUT}/{{task}}/comparison.json",
        figure=f"{OUT}/{{task}}/accuracy_vs_flops.png",
    wildcard_constraints:
        task=_alternation(COMPARE_TASKS),
    params:
        study=STUDY_FILE,
        settings=lambda w: json.dumps(
            {
                "compare": config["tasks"][w.task]["compare"],
                "folds": config["tasks"][w.task].get("folds", 1),
                "models": config["tasks"][w.task]["models"],
                "seed": config["seed"],
            },
            sort_keys=True,
        ),
        out_dir=lambda w, output: os.path.dirname(output.comparison),
    log:
        f"{OUT}/logs/compare/{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/compare/{{task}}.tsv"
    threads: lambda w: config["tasks"][w.task]["compare"]["cpu_threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit compare --config {params.study:q} --task {wildcards.task:q} --out {params.out_dir:q} > {log:q} 2>&1"


EXTRA_TARGETS += [
    f"{study_dir(config)}/{t}/{name}"
    for t in COMPARE_TASKS
    for name in ("comparison.json", "accuracy_vs_flops.png")
]
# every seed run too (common.smk: EXTRA_TARGETS)
EXTRA_TARGETS += [
    f"{study_dir(config)}/{t}/{m}/seed{s}/metrics.json"
    for t in SEED_TASKS
    for m in config["tasks"][t]["models"]
    for s in extra_seeds(t)
]


# Cross-validation (`tasks.<task>.folds` >= 2): `medvit split` adds a patient-level `fold`
# column to split.csv; `medvit fold-split` turns fold i into its own train/val/test split
# (test = fold i, val = fold i + 1 mod k), and the same `medvit train/predict/evaluate` run per
# model and fold under <task>/<model>/fold<i>/. The comparison then reports mean ± sd over folds.
FOLD_TASKS = [t for t in COMPARE_TASKS if config["tasks"][t].get("folds", 1) > 1]


rule fold_split:
    input:
        split=f"{OUT}/{{task}}/split.csv",
    output:
        split=f"{OUT}/{{task}}/folds/fold{{fold}}/split.csv",
    wildcard_constraints:
        task=_alternation(FOLD_TASKS),
        fold=r"\d+",
    log:
        f"{OUT}/logs/fold_split/{{task}}_fold{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/fold_split/{{task}}_fold{{fold}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit fold-split --split {input.split:q} --fold {wildcards.fold:q} --out {output.split:q} > {log:q} 2>&1"


rule train_fold:
    input:
        split=f"{OUT}/{{task}}/folds/fold{{fold}}/split.csv",
        cache=lambda w: cache_input(w.task),
    output:
        weights=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/model.safetensors",
        card=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/model.json",
    wildcard_constraints:
        task=_alternation(FOLD_TASKS),
        fold=r"\d+",
    params:
        study=STUDY_FILE,
        settings=train_settings,
        model_dir=lambda w, output: os.path.dirname(output.weights),
    log:
        f"{OUT}/logs/train/{{task}}_{{model}}_fold{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{{task}}_{{model}}_fold{{fold}}.tsv"
    threads: model_job_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=240,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit train --config {params.study:q} --task {wildcards.task:q} --model {wildcards.model:q}"
        " --split {input.split:q} --out {params.model_dir:q} > {log:q} 2>&1"


rule predict_fold:
    input:
        split=f"{OUT}/{{task}}/folds/fold{{fold}}/split.csv",
        cache=lambda w: cache_input(w.task),
        weights=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/model.safetensors",
    output:
        predictions=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/predictions.csv",
    wildcard_constraints:
        task=_alternation(FOLD_TASKS),
        fold=r"\d+",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("device",)),
    log:
        f"{OUT}/logs/predict/{{task}}_{{model}}_fold{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{{task}}_{{model}}_fold{{fold}}.tsv"
    threads: model_job_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=60,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit predict --config {params.study:q} --task {wildcards.task:q} --model {wildcards.model:q}"
        " --split {input.split:q} --weights {input.weights:q} --out {output.predictions:q} > {log:q} 2>&1"


rule evaluate_fold:
    input:
        predictions=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/predictions.csv",
    output:
        metrics=f"{OUT}/{{task}}/{{model}}/fold{{fold}}/metrics.json",
    wildcard_constraints:
        task=_alternation(FOLD_TASKS),
        fold=r"\d+",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("seed", "evaluation")),
    log:
        f"{OUT}/logs/evaluate/{{task}}_{{model}}_fold{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate/{{task}}_{{model}}_fold{{fold}}.tsv"
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
