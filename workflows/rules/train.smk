# Models: train each model of each task on its split, then predict the val and test splits.
# `medvit train` also writes model.json, train.log and checkpoints/ into the model folder;
# checkpoints/ is not an output, so Snakemake keeps it when a job fails and a rerun resumes.


# A ViT initialised from the MAE stage (or from a local checkpoint) has that file as an input.
rule train:
    input:
        unpack(train_inputs),
    output:
        weights=f"{OUT}/{{task}}/{{model}}/model.safetensors",
        card=f"{OUT}/{{task}}/{{model}}/model.json",
    params:
        study=STUDY_FILE,
        settings=train_settings,
        model_dir=lambda w, output: os.path.dirname(output.weights),
    log:
        f"{OUT}/logs/train/{{task}}_{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{{task}}_{{model}}.tsv"
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


rule predict:
    input:
        split=f"{OUT}/{{task}}/split.csv",
        weights=f"{OUT}/{{task}}/{{model}}/model.safetensors",
        cache=lambda w: cache_input(w.task),
    output:
        predictions=f"{OUT}/{{task}}/{{model}}/predictions.csv",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("device",)),
    log:
        f"{OUT}/logs/predict/{{task}}_{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{{task}}_{{model}}.tsv"
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
