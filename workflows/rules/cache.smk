# Preprocessed cache: for each task whose study key `cache` resolves to `disk`, the loading
# transform (read, intensity scaling, resize) runs once over every row of the split, into
# <task>/cache/<grid>/ (medvit.data.cache). Every training, prediction and pretraining job of
# the task reads it (it is their input), so the decoding happens once per study, not once per
# model and epoch. A rerun (a changed split) copies the samples the old build holds.


rule preprocess:
    input:
        split=f"{OUT}/{{task}}/split.csv",
    output:
        cache=f"{OUT}/{{task}}/cache/{{grid}}/cache.json",
    wildcard_constraints:
        task=_alternation(CACHE_TASKS),
        grid=r"[0-9x]+(-mask)?",
    params:
        study=STUDY_FILE,
        # the cached arrays depend on the task's grid (image_size) and the split's rows; a cache
        # of an older format is rebuilt by the first job that reads it
        settings=lambda w: json.dumps({"grid": w.grid}),
        folder=lambda w, output: os.path.dirname(output.cache),
    log:
        f"{OUT}/logs/preprocess/{{task}}_{{grid}}.log",
    benchmark:
        f"{OUT}/benchmarks/preprocess/{{task}}_{{grid}}.tsv"
    threads: 8
    resources:
        # at most 256 decoded samples wait to be written: memory does not grow with the study
        mem_mb=4000,
        runtime=240,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "medvit preprocess --config {params.study:q} --task {wildcards.task:q} --split {input.split:q}"
        " --out {params.folder:q} --workers {threads:q} > {log:q} 2>&1"
