# Data: make each task's manifest (synthetic study or shipped dataset; a manifest given in
# the study is used as is), then a patient-level train/val/test split of it.


rule synth:
    output:
        manifest=f"{OUT}/data/{{task}}/manifest.csv",
    wildcard_constraints:
        task=_alternation(SYNTH_TASKS),
    params:
        patients=lambda w: config["tasks"][w.task]["synthetic"]["patients"],
        image_size=lambda w: config["tasks"][w.task]["synthetic"]["image_size"],
        seed=config["seed"],
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        f"{OUT}/logs/synth/{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/synth/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit synth {wildcards.task:q} --patients {params.patients:q} --image-size {params.image_size:q}"
        " --seed {params.seed:q} --out {params.out_dir:q} > {log:q} 2>&1"


rule import_pneumoniamnist:
    input:
        npz=source_file("pneumoniamnist"),
    output:
        manifest=f"{OUT}/data/{{task}}/manifest.csv",
    wildcard_constraints:
        task=_alternation(PNEUMONIAMNIST_TASKS),
    params:
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        f"{OUT}/logs/import_pneumoniamnist/{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/import_pneumoniamnist/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit import pneumoniamnist {input.npz:q} --out {params.out_dir:q} > {log:q} 2>&1"


rule import_real:
    input:
        src=lambda w: source_file(manifest_origin(config, w.task)),
    output:
        manifest=f"{OUT}/data/{{task}}/manifest.csv",
    wildcard_constraints:
        task=_alternation(REAL_TASKS),
    params:
        dataset=lambda w: manifest_origin(config, w.task),
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        f"{OUT}/logs/import_real/{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/import_real/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit import {params.dataset:q} --from {input.src:q} --out {params.out_dir:q} > {log:q} 2>&1"


rule split:
    input:
        manifest=manifest_of,
    output:
        split=f"{OUT}/{{task}}/split.csv",
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(w.task, drop=("models", "train"), extra=("seed",)),
    log:
        f"{OUT}/logs/split/{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/split/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit split --config {params.study:q} --task {wildcards.task:q} --out {output.split:q} > {log:q} 2>&1"
