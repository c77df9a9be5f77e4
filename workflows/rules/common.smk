# Study config, output paths and helpers shared by every rule file (only functions here;
# the rules themselves live in the other .smk files).
#
# The study is ONE YAML file: the one given with --configfile, else the default configfile of
# the Snakefile (workflows/studies/demo.yaml). It is loaded and validated here by
# medvit.config.load_study (every problem at once, each naming key, value and what is
# allowed), so an invalid study fails before any job starts. Every stage is then called with
# `--config <that file>` and re-reads the same validated study, which is why --config
# KEY=VALUE overrides (which the stages would never see) and several --configfile files
# (which Snakemake would merge) are refused.
import json
import os
import re

from snakemake.exceptions import WorkflowError

from medvit.config import (
    SOURCES,
    cache_dir,
    cache_mode,
    is_vit,
    load_study,
    mae_encoder_path,
    manifest_origin,
    needs_mae,
    pretrain_extra_manifests,
    study_dir,
    task_config,
    task_manifest_path,
)
from medvit.errors import ConfigError
from medvit.system import host_has_nvidia_gpu

# Software environment for `--sdm conda` (relative to the rule files). Without --sdm conda
# (the default) rules run `medvit` from PATH.
CONDA_ENV = "../envs/medvit.yaml"


def _study_file():
    files = [str(f) for f in workflow.overwrite_configfiles]
    if len(files) > 1:
        raise WorkflowError(
            "give exactly one study with --configfile (got "
            + ", ".join(files)
            + "); Snakemake would merge them, but the stages read one file"
        )
    if workflow.config_settings.config:
        raise WorkflowError(
            "--config KEY=VALUE overrides are not supported (got "
            + ", ".join(map(str, workflow.config_settings.config))
            + "): every stage re-reads the study file, so it would not see them. "
            "Copy the study YAML, edit it and pass it with --configfile."
        )
    # without --configfile: the Snakefile's own `configfile:` (the demo study)
    path = files[0] if files else workflow.configfiles[-1]
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


STUDY_FILE = _study_file()
try:
    _study = load_study(STUDY_FILE)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
# Replace (not merge) what Snakemake loaded: the demo configfile must not leak into another study.
config.clear()
config.update(_study)

STUDY = config["study"]
TASKS = list(config["tasks"])
# Output root of this study; doubled braces keep a results_dir with braces literal in patterns.
OUT = str(study_dir(config)).replace("{", "{{").replace("}", "}}")


def _jobs_run_elsewhere():
    # Called when jobs are created, not at parse time: only then is the executor known. A dry
    # run executes with Snakemake's "dryrun" executor, but Snakemake still sets
    # execution_settings.use_threads from the executor it validated against, which is True
    # exactly for a non-local one (SLURM) on posix; so `-n --profile .../slurm` shows the
    # cluster's requests.
    settings = getattr(workflow, "execution_settings", None)
    return workflow.non_local_exec or workflow.remote_exec or bool(getattr(settings, "use_threads", False))


def model_job_gpu(wildcards):
    """The `gpu` resource of a training or prediction job: 1 where it can run on a GPU.

    `device: auto` asks for one when jobs go to a cluster (its nodes have the GPUs, not this
    machine) or when this machine has one; on a CPU-only workstation it asks for none, so
    model jobs are not queued one by one behind a GPU that does not exist.
    """
    if config["device"] == "cpu":
        return 0
    if config["device"] != "auto" or _jobs_run_elsewhere():
        return 1
    return 1 if host_has_nvidia_gpu() else 0


def model_job_threads(wildcards):
    """Threads of a training or prediction job.

    Beside a GPU or on a cluster node, 4 (loading, augmentation, the optimizer). On a CPU-only
    machine the jobs share its cores: a quarter of --cores each, at least 1, so independent
    trainings run side by side. On 2 cores, two 1-thread trainings finish about 1.4x sooner
    than the same two run one after the other with 2 threads each (docs/performance.md).
    """
    if model_job_gpu(wildcards) or _jobs_run_elsewhere():
        return 4
    try:
        return max(1, workflow.cores // 4)
    except WorkflowError:  # no --cores (e.g. a bare dry run)
        return 1


def _alternation(names):
    """Regex matching exactly one of `names` (or nothing when empty)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


SYNTH_TASKS = [t for t in TASKS if manifest_origin(config, t) == "synthetic"]
PNEUMONIAMNIST_TASKS = [t for t in TASKS if manifest_origin(config, t) == "pneumoniamnist"]
REAL_TASKS = [t for t in TASKS if manifest_origin(config, t) in set(SOURCES) - {"pneumoniamnist"}]
MODELS = sorted({m for t in TASKS for m in config["tasks"][t]["models"]})

wildcard_constraints:
    task=_alternation(TASKS),
    model=_alternation(MODELS),


def manifest_of(wildcards):
    """The manifest a task reads (given, synthetic or imported)."""
    return str(task_manifest_path(config, wildcards.task))


def source_file(name):
    """The shipped dataset file imported for source `name`."""
    return str(SOURCES[name])


# Task keys only some stages read (the MAE stage and the ViT models, DVPT, the brain detector,
# distillation and cascade, the histo comparison, the prostate CSwin/SSL/external-test stages);
# a stage's settings leave them out unless it names them in `keep`, so editing one reruns only
# the jobs that read it (e.g. detection.epochs never re-splits the data or retrains a model).
# `augment` is kept by every stage that trains on the task's images (TRAINING_KEYS).
VIT_KEYS = ("pretrain", "finetune")
TRAINING_KEYS = ("augment",)
STAGE_KEYS = VIT_KEYS + TRAINING_KEYS + ("adapt", "detection", "distill", "cascade", "compare", "cswin", "ssl",
                                         "infer", "external_manifest", "external_synthetic", "figures")


def settings(task, *, drop=(), extra=(), keep=()):
    """Canonical JSON of the config a stage depends on, given as a rule param.

    Snakemake's `params` rerun trigger then reruns exactly the jobs whose settings changed:
    editing tasks.xray.train.epochs retrains xray only; adding a model trains just that one.
    """
    skip = set(drop) | (set(STAGE_KEYS) - set(keep))
    cfg = {k: v for k, v in task_config(config, task).items() if k not in skip}
    cfg.update({k: evaluation_settings() if k == "evaluation" else config[k] for k in extra})
    return json.dumps(cfg, sort_keys=True)


# evaluation keys only the report reads: editing them reruns the report, no training or evaluation
REPORT_ONLY_EVALUATION = ("subgroups", "prevalence")


def evaluation_settings():
    return {k: v for k, v in config["evaluation"].items() if k not in REPORT_ONLY_EVALUATION}


# Tasks whose study key `cache` resolves to `disk`: their samples are preprocessed once by
# rules/cache.smk, and the jobs that load them wait for it; other tasks' jobs get no such input.
CACHE_TASKS = [t for t in TASKS if cache_mode(config, t) == "disk"]


def cache_input(task):
    """The task's preprocessed cache (its cache.json) when its jobs read one, else nothing."""
    return [str(cache_dir(config, task) / "cache.json")] if task in CACHE_TASKS else []


def train_mem_mb(wildcards):
    # 3D volumes need more host memory than 2D images.
    return 8000 if wildcards.task == "prostate" else 4000


# Outputs of task-specific stages (comparison tables, figures) that the report reads: each
# task's rule file appends its own, so `rule all` builds them and the report waits for them.
# Each run a comparison gathers (seed runs, adaptation runs, CV folds) is listed here too:
# Snakemake 9 does not rebuild a deleted input of a job whose outputs are present, so a
# deleted run folder is rebuilt only when `all` asks for it.
EXTRA_TARGETS = []


def all_metrics():
    """Every metrics.json of the study: one per (task, model)."""
    return [
        f"{study_dir(config)}/{t}/{m}/metrics.json"
        for t in TASKS
        for m in config["tasks"][t]["models"]
    ]


def mae_tasks():
    """Tasks with a model initialised from their MAE pretraining stage."""
    return [t for t in TASKS if any(needs_mae(config, t, m) for m in config["tasks"][t]["models"])]


def train_inputs(wildcards):
    """The split, plus the MAE encoder or the local checkpoint a ViT starts from, so that
    Snakemake runs the pretraining first and retrains when the weights change."""
    inputs = {"split": f"{study_dir(config)}/{wildcards.task}/split.csv"}
    if cache_input(wildcards.task):
        inputs["cache"] = cache_input(wildcards.task)
    if needs_mae(config, wildcards.task, wildcards.model):
        inputs["init"] = str(mae_encoder_path(config, wildcards.task))
    elif is_vit(wildcards.model):
        init = task_config(config, wildcards.task).get("finetune", {}).get("init", "scratch")
        if init != "scratch":
            inputs["init"] = init
    return inputs


def train_settings(wildcards):
    """Settings of a training job: the ViT recipe (and patch size) counts for ViTs only."""
    vit = is_vit(wildcards.model)
    text = settings(wildcards.task, drop=("models",), extra=("seed", "device", "deterministic"),
                    keep=TRAINING_KEYS + (("finetune",) if vit else ()))
    if vit and "pretrain" in task_config(config, wildcards.task):
        cfg = json.loads(text)
        cfg["patch_size"] = task_config(config, wildcards.task)["pretrain"]["patch_size"]
        text = json.dumps(cfg, sort_keys=True)
    return text
