"""Study configs: defaults, validation messages (key, value, allowed), helpers, CLI, docs."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvit.config import (
    SCHEMA_PATH,
    TASKS,
    load_schema,
    load_study,
    manifest_origin,
    schema_markdown,
    study_dir,
    task_config,
    task_manifest_path,
    validate_study,
)
from medvit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, text))
    return str(info.value)


# ------------------------------------------------------------------------------ defaults
def test_short_study_gets_every_default(tmp_path):
    study = load_study(write(tmp_path, """\
study: mini
tasks:
  xray: {train: {epochs: 2}}
  prostate:
  histo: {models: [resnet10t, resnet18]}
"""))
    assert study["seed"] == 0 and study["device"] == "auto" and study["deterministic"] is True
    assert study["results_dir"] == "results"
    assert study["evaluation"] == {"bootstrap": 1000, "ci": 0.95, "aggregate": "max", "top_k": 3,
                                   "threshold": "youden", "subgroups": [],
                                   "prevalence": {"xray": None, "brain": None, "prostate": None, "histo": None}}
    assert list(study["tasks"]) == ["xray", "prostate", "histo"]  # brain absent stays absent
    xray = study["tasks"]["xray"]
    assert xray["train"]["epochs"] == 2                               # given value kept
    assert xray["train"]["batch_size"] == 16 and xray["train"]["bf16"] is False  # siblings filled
    assert xray["synthetic"] == {"patients": 40, "image_size": 64}
    assert xray["split"] == {"val_fraction": 0.2, "test_fraction": 0.2}
    assert xray["models"] == ["densenet121"] and xray["findings"] == [] and xray["manifest"] is None
    assert xray["source"] is None and xray["label_column"] == "labels"
    prostate = study["tasks"]["prostate"]                             # `prostate:` (null) = all defaults
    assert prostate["synthetic"]["image_size"] == 32 and prostate["roi_size"] == [32, 32, 32]
    assert prostate["folds"] == 5 and prostate["positive_class"] == "cspca" and prostate["models"] == ["unet3d"]
    assert study["tasks"]["histo"]["models"] == ["resnet10t", "resnet18"]
    assert study["tasks"]["histo"]["train"]["epochs"] == 5
    # filled defaults are independent copies, never shared between tasks or with the schema
    study["tasks"]["prostate"]["train"]["epochs"] = 99
    assert study["tasks"]["histo"]["train"]["epochs"] == 5
    assert load_study(tmp_path / "study.yaml")["tasks"]["prostate"]["train"]["epochs"] == 5


def test_brain_defaults_and_validate_does_not_modify_input():
    raw = {"study": "b", "tasks": {"brain": {}}}
    before = copy.deepcopy(raw)
    study = validate_study(raw)
    assert raw == before
    brain = study["tasks"]["brain"]
    assert brain["anomaly_ratio"] == 0.1 and brain["resample_by"] == "patient"
    assert brain["label_column"] == "label" and brain["positive_class"] == "tumor"
    assert brain["models"] == ["resnet18"]


def test_snakemake_validate_uses_the_same_schema_and_agrees():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    raw = {"study": "s", "tasks": {t: {} for t in TASKS}}
    ours = validate_study(raw)
    theirs = copy.deepcopy(raw)
    validate(theirs, str(SCHEMA_PATH), set_default=True)
    assert theirs == ours
    with pytest.raises(WorkflowError):
        validate({"study": "s", "tasks": {"xray": {"epochs": 3}}}, str(SCHEMA_PATH), set_default=True)


def test_schema_uses_only_known_keywords():
    # a YAML slip (e.g. an unquoted comma in a flow mapping) would add a silent junk keyword
    known = {"$schema", "$defs", "$ref", "title", "description", "type", "additionalProperties", "required",
             "properties", "default", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
             "enum", "minProperties", "items", "uniqueItems", "minItems", "maxItems", "minLength"}
    odd = []

    def walk(node, where: str, is_map_of_schemas: bool) -> None:
        if isinstance(node, dict):
            if not is_map_of_schemas:
                odd.extend(f"{where}: {k}" for k in set(node) - known)
            for k, v in node.items():
                if k in ("properties", "$defs") and not is_map_of_schemas:
                    walk(v, f"{where}/{k}", True)
                elif k not in ("default", "enum"):
                    walk(v, f"{where}/{k}", False)

    walk(load_schema(), "", False)
    assert odd == []


def test_every_schema_key_has_default_and_description():
    schema = load_schema()
    missing = []

    def walk(prefix: str, node: dict) -> None:
        if "$ref" in node:
            target = schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = {**target, **node}
        if node.get("type") == "object" or "properties" in node:
            assert node.get("additionalProperties") is False, f"{prefix or 'top level'} allows unknown keys"
        for name, sub in node.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            exempt = key == "study" or (prefix == "tasks")  # required name; tasks are absent by default
            if "description" not in sub and "$ref" not in sub:
                missing.append(f"{key}: description")
            if "default" not in sub and not exempt:
                missing.append(f"{key}: default")
            walk(key, sub)

    walk("", schema)
    assert missing == []


# ------------------------------------------------------------------------------ invalid configs
@pytest.mark.parametrize(
    "text, expected",
    [
        ("study: s\nseed: seven\ntasks: {xray: {}}\n", ["seed", "'seven'", "an integer >= 0"]),
        ("study: s\ntasks: {xray: {train: {epochs: 2.5}}}\n",
         ["tasks.xray.train.epochs", "2.5", "an integer >= 1"]),
        ("study: s\nwandb: true\ntasks: {xray: {}}\n", ["wandb", "unknown key", "study, seed, device"]),
        ("study: s\ntasks: {xray: {train: {epoch: 3}}}\n",
         ["tasks.xray.train.epoch", "unknown key", "did you mean 'epochs'", "batch_size"]),
        ("study: s\nevaluation: {aggregate: median}\ntasks: {xray: {}}\n",
         ["evaluation.aggregate", "'median'", "one of max, mean, topk"]),
        ("study: ../x\ntasks: {xray: {}}\n", ["study", "'../x'", "letters, digits, '_' and '-' only"]),
        ("study: a b;rm\ntasks: {xray: {}}\n", ["study", "'a b;rm'", "^[A-Za-z0-9_-]+$"]),
        ("study: s\ntasks: {mri: {}}\n", ["tasks.mri", "unknown task 'mri'", "xray, brain, prostate, histo"]),
        ("study: s\ntasks: {brain: {models: [resnet18, vit_b]}}\n",
         ["tasks.brain.models[1]", "'vit_b'", "one of resnet18, resnet10t"]),
        ("study: s\ntasks: {prostate: {models: [resnet18]}}\n", ["tasks.prostate.models[0]", "one of unet3d"]),
        ("study: s\ndevice: gpu\ntasks: {xray: {}}\n", ["device", "'gpu'", "one of auto, cpu, cuda"]),
        ("study: s\ntasks: {brain: {anomaly_ratio: 1.5}}\n", ["tasks.brain.anomaly_ratio", "1.5", "> 0 and < 1"]),
        ("study: s\ntasks: {xray: {train: {lr: 1e-3}}}\n", ["tasks.xray.train.lr", "'1e-3'", "write 1.0e-3"]),
        ("study: s\ntasks: {xray: {train: {bf16: sometimes}}}\n", ["tasks.xray.train.bf16",
                                                                   "one of true, false, auto"]),
        ("study: s\ntasks: {prostate: {roi_size: [32, 32]}}\n", ["tasks.prostate.roi_size", "[32, 32]", "exactly 3"]),
        ("study: s\ntasks: {xray: {synthetic: {patients: 2}}}\n",
         ["tasks.xray.synthetic.patients", "got 2", "an integer >= 4"]),
        ("study: s\ntasks: {xray: {source: kaggle}}\n", ["tasks.xray.source", "'kaggle'", "pneumoniamnist"]),
        ("study: s\ntasks: xray\n", ["tasks", "'xray'", "a mapping of keys"]),
        ("seed: 1\ntasks: {xray: {}}\n", ["study: missing", "required"]),
        ("study: s\n", ["tasks: no task given", "xray, brain, prostate, histo"]),
        ("study: s\ntasks: {histo: {split: {val_fraction: 0.5, test_fraction: 0.5}}}\n",
         ["tasks.histo.split", "= 1", "below 1"]),
        ("study: s\ntasks: {xray: {label_column: labels, positive_class: pneumonia}}\n",
         ["tasks.xray.positive_class", "'pneumonia'", "allowed: null"]),
    ],
)
def test_invalid_config_names_key_value_and_allowed(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert message.startswith(f"invalid study config {tmp_path / 'study.yaml'}")
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_all_errors_reported_at_once(tmp_path):
    message = error_of(tmp_path, "study: x/y\nseed: -1\ntasks: {xray: {train: {epochs: 0}}, histo: {colour: 1}}\n")
    assert "(4 problems)" in message
    for key in ("study:", "seed:", "tasks.xray.train.epochs:", "tasks.histo.colour:"):
        assert f"  - {key}" in message


def test_manifest_must_exist_and_is_relative_to_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(tmp_path, "study: s\ntasks: {xray: {manifest: data/missing.csv}}\n")
    assert "tasks.xray.manifest" in message and "data/missing.csv" in message and "not found" in message
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "missing.csv").write_text("patient_id,image\n")
    study = load_study(tmp_path / "study.yaml")
    assert task_manifest_path(study, "xray") == Path("data/missing.csv")
    assert manifest_origin(study, "xray") == "manifest"


def test_manifest_and_source_are_exclusive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("patient_id,image\n")
    message = error_of(tmp_path, "study: s\ntasks: {xray: {manifest: m.csv, source: pneumoniamnist}}\n")
    assert "tasks.xray:" in message and "'m.csv'" in message and "'pneumoniamnist'" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- study: s\n", "must be a mapping of keys"),
        ("just text\n", "must be a mapping of keys"),
        ("study: [unclosed\n", "is not valid YAML at line"),
        ("study: !!python/object/apply:os.system [echo hi]\n", "is not valid YAML"),  # safe_load refuses tags
    ],
)
def test_unusable_files(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="study config not found"):
        load_study(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------ helpers
def test_paths_and_task_helpers(tmp_path):
    study = load_study(write(tmp_path, f"study: run-1\nresults_dir: {tmp_path / 'out'}\n"
                                       "tasks: {brain: {}, xray: {source: pneumoniamnist}}\n"))
    assert study_dir(study) == tmp_path / "out" / "run-1"
    assert task_manifest_path(study, "brain") == tmp_path / "out" / "run-1" / "data" / "brain" / "manifest.csv"
    assert task_manifest_path(study, "xray") == tmp_path / "out" / "run-1" / "data" / "xray" / "manifest.csv"
    assert manifest_origin(study, "brain") == "synthetic"
    assert manifest_origin(study, "xray") == "pneumoniamnist"
    assert task_config(study, "brain")["positive_class"] == "tumor"
    with pytest.raises(ConfigError, match="task 'histo' is not in study 'run-1'; its tasks: xray, brain"):
        task_config(study, "histo")


def test_shipped_studies_are_valid():
    for path in sorted((REPO / "workflows" / "studies").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        study = validate_study({k: v for k, v in raw.items()})
        assert study["study"] == path.stem


# ------------------------------------------------------------------------------ CLI and docs
def test_cli_config_error_exits_2_without_traceback(tmp_path):
    bad = write(tmp_path, "study: s\ntasks: {xray: {train: {epochs: many}}}\n")
    proc = subprocess.run([sys.executable, "-m", "medvit.cli", "config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid study config")
    assert "tasks.xray.train.epochs" in proc.stderr and "'many'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_config_prints_filled_study(tmp_path, capsys):
    from medvit.cli import main

    assert main(["config", str(write(tmp_path, "study: s\ntasks: {histo: {}}\n"))]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tasks"]["histo"]["train"]["lr"] == 0.001
    assert validate_study(printed) == printed  # the output is itself a valid, complete study


def test_docs_list_every_key_from_the_schema():
    docs = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    generated = schema_markdown()
    assert generated in docs, "docs/config.md is out of date: regenerate it (see the note at its top)"
    for key in ("tasks.xray.findings", "tasks.<task>.train.bf16", "evaluation.aggregate", "tasks.brain.anomaly_ratio"):
        assert f"`{key}`" in generated


def test_unknown_subgroup_columns_are_refused_at_config_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("patient_id,image,label,sex,site\np1,a.png,normal,F,A\n")
    good = load_study(write(tmp_path, "study: s\nevaluation: {subgroups: [sex, site]}\n"
                                      "tasks:\n  brain: {manifest: m.csv}\n"))
    assert good["evaluation"]["subgroups"] == ["sex", "site"]
    with pytest.raises(ConfigError) as err:
        load_study(write(tmp_path,
                         "study: s\nevaluation: {subgroups: [sex, age]}\ntasks:\n  brain: {manifest: m.csv}\n"))
    assert 'evaluation.subgroups: got ["age"], not column(s) of the brain manifest m.csv' in str(err.value)
    assert "patient_id, image, label, sex, site" in str(err.value)
    with pytest.raises(ConfigError):
        load_study(write(tmp_path, "study: s\nevaluation: {prevalence: {brain: 1.5}}\ntasks:\n  brain: {}\n"))
