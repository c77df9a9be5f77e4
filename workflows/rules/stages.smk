# Input and settings functions of the task-stage rules (dvpt.smk, histo.smk, prostate.smk,
# infer.smk), kept apart from the rules (Snakemake's style: no functions beside rules), with
# the globals they read: this file reads only common.smk's and its own, and the rule files
# read this one's (it is included before them).

from medvit.config import CSWIN_MODELS, SSL_MODELS, external_manifest_path, run_name

# ---------------------------------------------------------------- dvpt.smk

def adapt_backbone(task):
    """The shared backbone file: listed as an input so the MAE stage runs first and a changed
    backbone re-adapts every method."""
    cfg = config["tasks"][task]["adapt"]
    return str(mae_encoder_path(config, task)) if cfg["backbone"] == "mae" else cfg["backbone"]


def adapt_settings(task, method):
    """Settings of one method's job: the task config without the other methods' knobs, so adding
    a method or changing another method's learning rate leaves this one's results alone."""
    cfg = json.loads(settings(task, drop=("models", "train"), keep=("pretrain", "finetune", "adapt") + TRAINING_KEYS,
                              extra=("seed", "device", "deterministic", "evaluation")))
    adapt = cfg["adapt"]
    adapt.pop("methods")
    adapt.pop("enabled")
    adapt["lr_scale"] = adapt["lr_scale"][method]
    if method != "dvpt":
        adapt.pop("dvpt")
    if method != "vpt":
        adapt.pop("vpt")
    if method != "full":
        cfg.pop("finetune", None)
    return json.dumps(cfg, sort_keys=True)


def adapt_run_files(task, method, name):
    return [f"{OUT}/{task}/adapt/{run_name(method, f)}/{name}" for f in config["tasks"][task]["adapt"]["fractions"]]


# ---------------------------------------------------------------- histo.smk

def extra_seeds(task):
    """Seeds beyond the study's that each model of `task` is trained with."""
    n = config["tasks"][task].get("compare", {}).get("seeds", 1)
    return [config["seed"] + k for k in range(1, n)]


def _seed_settings(wildcards):
    # the generic training settings of this (task, model) plus the run's own seed
    cfg = json.loads(train_settings(wildcards))
    cfg["train_seed"] = int(wildcards.seed)
    return json.dumps(cfg, sort_keys=True)


def _dvpt_inputs(wildcards):
    """The adaptation comparison when the task runs DVPT, so the comparison includes it."""
    adapt = config["tasks"][wildcards.task].get("adapt") or {}
    if adapt.get("enabled") and "dvpt" in adapt.get("methods", []):
        return [f"{study_dir(config)}/{wildcards.task}/adapt/comparison.json"]
    return []


def comparison_inputs(wildcards):
    """Every run's metrics.json (and model.json) of a task's models, over its seeds (or its
    cross-validation folds when `folds` >= 2)."""
    root = f"{study_dir(config)}/{wildcards.task}"
    folds = config["tasks"][wildcards.task].get("folds", 1)
    folders = [
        os.path.join(root, m, *([f"seed{s}"] if s != config["seed"] else []))
        for m in config["tasks"][wildcards.task]["models"]
        for s in [config["seed"], *extra_seeds(wildcards.task)]
    ] if folds == 1 else [
        os.path.join(root, m, f"fold{i}") for m in config["tasks"][wildcards.task]["models"] for i in range(folds)
    ]
    return {
        "metrics": [f"{f}/metrics.json" for f in folders],
        "cards": [f"{f}/model.json" for f in folders],
        "dvpt": _dvpt_inputs(wildcards),
    }


# ---------------------------------------------------------------- prostate.smk

# keys that only some prostate jobs read: left out of the others' settings (and named in
# `keep` where read, for when common.smk lists them among its stage-only keys), so that
# editing them reruns only the jobs they affect
PROSTATE_LOCAL_KEYS = ("models", "figures", "external_manifest", "external_synthetic")
PROSTATE_DIR = f"{study_dir(config)}/prostate"  # concrete paths for input functions (OUT is a pattern)
PROSTATE = config["tasks"].get("prostate", {})
PROSTATE_FOLDS = list(range(PROSTATE["folds"])) if PROSTATE else []
PROSTATE_EXTERNAL = external_manifest_path(config, "prostate") if PROSTATE else None


def prostate_fold_settings(wildcards):
    cswin = wildcards.model in CSWIN_MODELS
    drop = PROSTATE_LOCAL_KEYS + ("ssl",) + (() if cswin else ("cswin",))
    return settings("prostate", drop=drop, keep=TRAINING_KEYS + (("cswin",) if cswin else ()),
                    extra=("seed", "device", "deterministic"))


def prostate_fold_inputs(wildcards):
    inputs = {"split": f"{PROSTATE_DIR}/split.csv"}
    if cache_input("prostate"):
        inputs["cache"] = cache_input("prostate")
    if wildcards.model in SSL_MODELS:
        inputs["init"] = f"{PROSTATE_DIR}/ssl/fold{wildcards.fold}/encoder.safetensors"
    return inputs


def prostate_fold_files(name):
    return lambda w: [f"{PROSTATE_DIR}/{w.model}/fold{i}/{name}" for i in PROSTATE_FOLDS]


def prostate_summary_inputs(wildcards):
    models = PROSTATE["models"]
    inputs = {
        "split": f"{PROSTATE_DIR}/split.csv",
        "metrics": [f"{PROSTATE_DIR}/{m}/metrics.json" for m in models],
        "folds": [f"{PROSTATE_DIR}/{m}/fold{i}/predictions.csv" for m in models for i in PROSTATE_FOLDS],
    }
    if PROSTATE_EXTERNAL is not None:
        inputs["external"] = [f"{PROSTATE_DIR}/{m}/external/metrics.json" for m in models]
    return inputs


# ---------------------------------------------------------------- infer.smk

def infer_cohorts(task):
    """The task's cohorts, or none where its models have no single model folder (a
    classification task run in `folds`; prostate's folds are pooled into one ensemble package)."""
    tcfg = config["tasks"][task]
    if task != "prostate" and tcfg.get("folds", 1) > 1:
        return []
    return {c["name"]: c["input"] for c in tcfg.get("infer", [])}


def infer_inputs(wildcards):
    inputs = {
        "weights": f"{study_dir(config)}/{wildcards.task}/{wildcards.model}/model.safetensors",
        # written after evaluation has completed the package (threshold chosen on validation)
        "metrics": f"{study_dir(config)}/{wildcards.task}/{wildcards.model}/metrics.json",
    }
    source = infer_cohorts(wildcards.task)[wildcards.cohort]
    if os.path.isfile(source):  # a manifest: rescored when it changes
        inputs["manifest"] = source
    return inputs
