# Chest X-ray: MAE pretraining (Medical MAE) of the ViT encoder that `vit_<size>_mae` models
# (and `vit_<size>` with `finetune.init: mae`) start from. It reads the split's training rows
# only; validation and test patients never reach it. The rule runs only when such a model is
# in the study: `train` lists the encoder as an input (rules/common.smk: train_inputs).


rule pretrain:
    input:
        split=f"{OUT}/xray/split.csv",
        cache=cache_input("xray"),
        # more images for pretraining only (pretrain.extra_manifests), imported below when
        # an entry names a shipped dataset
        extras=lambda w: [str(p) for p in pretrain_extra_manifests(config, "xray")],
    output:
        encoder=f"{OUT}/xray/mae/encoder.safetensors",
        card=f"{OUT}/xray/mae/encoder.json",
        figure=report(
            f"{OUT}/xray/mae/reconstructions.png",
            caption="../report/mae_reconstructions.rst",
            category="Chest X-ray",
        ),
    params:
        study=STUDY_FILE,
        settings=lambda w: settings(
            "xray",
            drop=("models", "train", "finetune"),
            extra=("seed", "device", "deterministic"),
            keep=("pretrain",),
        ),
        out_dir=lambda w, output: os.path.dirname(output.encoder),
    log:
        f"{OUT}/logs/pretrain/xray.log",
    benchmark:
        f"{OUT}/benchmarks/pretrain/xray.tsv"
    threads: model_job_threads
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=model_job_gpu,
    conda:
        CONDA_ENV
    shell:
        "medvit pretrain --config {params.study:q} --task xray --split {input.split:q}"
        " --out {params.out_dir:q} > {log:q} 2>&1"


rule import_extra:
    input:
        src=lambda w: source_file(w.source),
    output:
        manifest=f"{OUT}/data/extra/{{source}}/manifest.csv",
    wildcard_constraints:
        source=_alternation(SOURCES),
    params:
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        f"{OUT}/logs/import_extra/{{source}}.log",
    benchmark:
        f"{OUT}/benchmarks/import_extra/{{source}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit import {wildcards.source:q} --from {input.src:q} --out {params.out_dir:q} > {log:q} 2>&1"
