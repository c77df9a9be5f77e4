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
    load_study,
    mae_encoder_path,
    manifest_origin,
    needs_mae,
    study_dir,
    task_config,
    task_manifest_path,
)
from medvit.errors import ConfigError

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
GPU = 0 if config["device"] == "cpu" else 1


def _alternation(names):
    """Regex matching exactly one of `names` (or nothing when empty)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


SYNTH_TASKS = [t for t in TASKS if manifest_origin(config, t) == "synthetic"]
PNEUMONIAMNIST_TASKS = [t for t in TASKS if manifest_origin(config, t) == "pneumoniamnist"]
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
VIT_KEYS = ("pretrain", "finetune")
STAGE_KEYS = VIT_KEYS + ("adapt", "detection", "distill", "cascade", "compare", "cswin", "ssl",
                         "external_manifest", "external_synthetic", "figures")


def settings(task, *, drop=(), extra=(), keep=()):
    """Canonical JSON of the config a stage depends on, given as a rule param.

    Snakemake's `params` rerun trigger then reruns exactly the jobs whose settings changed:
    editing tasks.xray.train.epochs retrains xray only; adding a model trains just that one.
    """
    skip = set(drop) | (set(STAGE_KEYS) - set(keep))
    cfg = {k: v for k, v in task_config(config, task).items() if k not in skip}
    cfg.update({k: config[k] for k in extra})
    return json.dumps(cfg, sort_keys=True)


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
    if needs_mae(config, wildcards.task, wildcards.model):
        inputs["init"] = str(mae_encoder_path(config, wildcards.task))
    elif wildcards.model.startswith("vit_"):
        init = task_config(config, wildcards.task).get("finetune", {}).get("init", "scratch")
        if init != "scratch":
            inputs["init"] = init
    return inputs


def train_settings(wildcards):
    """Settings of a training job: the ViT recipe (and patch size) counts for ViTs only."""
    vit = wildcards.model.startswith("vit_")
    text = settings(wildcards.task, drop=("models",), extra=("seed", "device", "deterministic"),
                    keep=("finetune",) if vit else ())
    if vit and "pretrain" in task_config(config, wildcards.task):
        cfg = json.loads(text)
        cfg["patch_size"] = task_config(config, wildcards.task)["pretrain"]["patch_size"]
        text = json.dumps(cfg, sort_keys=True)
    return text
