"""Hostile and broken study configs: every one fails with a clear ConfigError before any job
runs, nothing in it is executed, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medvit.cli import main
from medvit.config import MAX_YAML_NODES, load_study
from medvit.data.manifest import ROOTS_ENV, load_manifest, validate_manifest
from medvit.data.synth import synthesize
from medvit.errors import ConfigError, ManifestError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _error(tmp_path: Path, text: str | bytes, name: str = "study.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_study(path)
    return str(info.value)


# ------------------------------------------------------------------ malformed files


@pytest.mark.parametrize("text, words", [
    ("", ["empty"]),
    ("   \n# only a comment\n", ["empty"]),
    ("- a\n- b\n", ["mapping", "a list"]),
    ("just text", ["mapping", "a string"]),
    ("study: demo\ntasks: {xray: {}\n", ["not valid YAML", "line"]),
    ("study: [unclosed\n", ["not valid YAML"]),
    (b"study: demo\n\xff\xfe\x00tasks:", ["not UTF-8"]),
    ("\tstudy: demo\n", ["not valid YAML"]),
    ("study: demo\nstudy: other\ntasks: {xray: }\n", ["key 'study' at lines 1 and 2"]),  # PyYAML would keep the last
    ("? [a, b]\n: 1\n", ["not valid YAML"]),                  # unhashable key
])
def test_malformed_files(tmp_path, text, words):
    message = _error(tmp_path, text)
    for word in words:
        assert word in message, message


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_missing_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path)


def test_huge_file_is_refused_without_parsing(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study: demo\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="bytes; allowed: at most"):
        load_study(path)


# ------------------------------------------------------------------ wrong types and unknown keys


@pytest.mark.parametrize("study, words", [
    ({"study": 5, "tasks": {"xray": {}}}, ["study: got 5", "a string"]),
    ({"study": "s", "seed": "zero", "tasks": {"xray": {}}}, ["seed: got 'zero'", "an integer"]),
    ({"study": "s", "seed": 1.5, "tasks": {"xray": {}}}, ["seed: got 1.5"]),
    ({"study": "s", "seed": True, "tasks": {"xray": {}}}, ["seed: got true"]),
    ({"study": "s", "device": "tpu", "tasks": {"xray": {}}}, ["device: got 'tpu'", "auto, cpu, cuda"]),
    ({"study": "s", "tasks": []}, ["tasks: got []"]),
    ({"study": "s", "tasks": {"xray": {"train": {"epochs": "5"}}}}, ["tasks.xray.train.epochs: got '5'"]),
    ({"study": "s", "tasks": {"xray": {"train": {"lr": "1e-3"}}}}, ["tasks.xray.train.lr", "write 1.0e-3"]),
    ({"study": "s", "tasks": {"xray": {"models": "resnet18"}}}, ["tasks.xray.models: got 'resnet18'", "a list"]),
    ({"study": "s", "tasks": {"xray": {"models": ["resnet18; rm -rf ~"]}}}, ["tasks.xray.models[0]", "one of"]),
    ({"study": "s", "tasks": {"xray": {"train": {"epochs": -3}}}}, ["epochs: got -3", ">="]),
    ({"study": "s", "tasks": {"xray": {"image_size": [64]}}}, ["tasks.xray.image_size"]),
    ({"study": "s", "tasks": {"xray": {"trian": {}}}}, ["tasks.xray.trian: unknown key", "did you mean 'train'"]),
    ({"study": "s", "sedd": 1, "tasks": {"xray": {}}}, ["sedd: unknown key", "did you mean 'seed'"]),
    ({"study": "s", "tasks": {"ct": {}}}, ["tasks.ct: unknown task"]),
    ({"study": "s", "tasks": {"xray": {}}, 7: "x"}, ["unknown key 7"]),
    ({"tasks": {"xray": {}}}, ["study: missing"]),
])
def test_wrong_types_and_unknown_keys(tmp_path, study, words):
    message = _error(tmp_path, yaml.safe_dump(study))
    assert message.startswith("invalid study config")
    for word in words:
        assert word in message, message


def test_every_problem_is_listed_once(tmp_path):
    message = _error(tmp_path, "study: a/b\nseed: x\ndevice: tpu\ntasks: {xray: {trian: 1}}\n")
    assert "(4 problems)" in message and message.count("\n  - ") == 4


# ------------------------------------------------------------------ YAML bombs and tags


def test_billion_laughs_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    text = "study: bomb\n" + "\n".join(lines) + "\ntasks: {xray: {findings: *a9}}\n"
    start = time.perf_counter()
    message = _error(tmp_path, text)
    assert time.perf_counter() - start < 5
    assert "YAML bomb" in message and f"at most {MAX_YAML_NODES}" in message


def test_modest_anchors_still_work(tmp_path):
    text = ("study: anchors\ntrain: &t {epochs: 2, batch_size: 4}\n"
            "tasks: {xray: {train: *t}, histo: {train: *t}}\n")
    with pytest.raises(ConfigError, match="train: unknown key"):  # top-level `train` is not a key: still validated
        load_study(_write(tmp_path, text))
    text = "study: anchors\ntasks:\n  xray: &x {train: {epochs: 2}}\n  histo: {train: {epochs: 2}}\n"
    study = load_study(_write(tmp_path, text))
    assert study["tasks"]["xray"]["train"]["epochs"] == 2


def test_recursive_alias_and_deep_nesting(tmp_path):
    assert "recursive alias" in _error(tmp_path, "study: r\ntasks: &t {xray: *t}\n")
    deep = "study: d\ntasks: " + "[" * 20_000 + "]" * 20_000 + "\n"
    message = _error(tmp_path, deep)
    assert "nested too deeply" in message or "not valid YAML" in message or "tasks: got" in message


def test_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (f"!!python/object/apply:os.system ['touch {marker}']",
                    f"!!python/object/apply:subprocess.call [['touch', '{marker}']]",
                    "!!python/name:os.system"):
        message = _error(tmp_path, f"study: demo\ntasks: {{xray: {payload}}}\n")
        assert "not valid YAML" in message
    assert not marker.exists()


# ------------------------------------------------------------------ names and paths that could escape


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "demo; rm -rf ~", "$(touch pwned)", "`id`",
                                  "demo\n", "demo\nrm", "dé mo", "", " demo", "demo*", "a|b", "-rf"[1:] + "/x"])
def test_study_names_that_could_escape_or_inject(tmp_path, name):
    message = _error(tmp_path, yaml.safe_dump({"study": name, "tasks": {"xray": {}}}))
    assert "study: got" in message and "letters, digits" in message


@pytest.mark.parametrize("results_dir", ["out; touch pwned", "$(touch pwned)", "out`id`", "my results", "-rf",
                                         "out\nx", "out|x", "out>x", "out&", "~root"])
def test_results_dir_cannot_inject_into_shell_commands(tmp_path, results_dir):
    message = _error(tmp_path, yaml.safe_dump({"study": "s", "results_dir": results_dir, "tasks": {"xray": {}}}))
    assert "results_dir: got" in message and "shell" in message


def test_plain_results_dirs_are_fine(tmp_path):
    for ok in ("results", "out/runs", str(tmp_path / "out"), "../shared-results", "r_1.2+3@x"):
        assert load_study(_write(tmp_path, yaml.safe_dump({"study": "s", "results_dir": ok,
                                                           "tasks": {"xray": {}}})))["results_dir"] == ok


def _manifest_with(tmp_path: Path, image: str) -> Path:
    folder = tmp_path / "data"
    synthesize("histo", n_patients=4, out_dir=folder, seed=0, image_size=32)
    manifest = folder / "manifest.csv"
    lines = manifest.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[2].split(",")
    row[head.index("image")] = image
    lines[2] = ",".join(row)
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.parametrize("image", ["../../../../../../etc/passwd", "/etc/passwd", "images/../../outside.png",
                                   "/proc/self/environ"])
def test_manifest_paths_outside_the_allowed_roots(tmp_path, monkeypatch, image):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    (tmp_path / "outside.png").write_bytes(b"not read")
    manifest = _manifest_with(tmp_path, image)
    study = _write(tmp_path, yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": "data/manifest.csv"}}}))
    message = str(pytest.raises(ConfigError, load_study, study).value)
    assert "tasks.histo.manifest" in message and "row 2, column image" in message
    assert image in message and "outside the allowed roots" in message and ROOTS_ENV in message
    # the stage reader refuses too (if a manifest is swapped after the workflow started)
    with pytest.raises(ManifestError, match="row 2, column image"):
        load_manifest(manifest, check_files=True)
    report = validate_manifest(manifest)
    assert not report.ok and any(p.row == 2 and "outside the allowed roots" in p.reason for p in report.problems)
    # the CLI says so with exit code 2, and never prints the file's content
    assert main(["config", str(study)]) == 2


def test_data_roots_env_allows_a_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "pacs"
    synthesize("histo", n_patients=4, out_dir=shared, seed=0, image_size=32)
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.parent.mkdir()
    text = shared.joinpath("manifest.csv").read_text().replace("images/", str(shared / "images") + "/")
    manifest.write_text(text)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    with pytest.raises(ManifestError, match="outside the allowed roots"):
        load_manifest(manifest, check_files=True)
    monkeypatch.setenv(ROOTS_ENV, os.pathsep.join(["/nonexistent", str(shared)]))
    assert len(load_manifest(manifest, check_files=True).df) == len(text.splitlines()) - 1
    study = _write(tmp_path, yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": "data/manifest.csv"}}}))
    assert load_study(study)["tasks"]["histo"]["manifest"] == "data/manifest.csv"


def test_symlinks_out_of_the_manifest_folder_need_their_target_in_the_roots(tmp_path, monkeypatch):
    """A link a user placed in the data folder is followed before the containment check: its
    target must lie inside the roots (listed in MEDVIT_DATA_ROOTS). The link tree `medvit
    ingest` writes is covered by tests/test_ingest.py and tests/test_privacy.py."""
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    shared = tmp_path / "pacs"
    synthesize("histo", n_patients=4, out_dir=shared, seed=0, image_size=32)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "images").symlink_to(shared / "images")
    (folder / "manifest.csv").write_text(shared.joinpath("manifest.csv").read_text())
    with pytest.raises(ManifestError, match="symbolic link"):
        load_manifest(folder / "manifest.csv", check_files=True)
    monkeypatch.setenv(ROOTS_ENV, str(shared))
    assert load_manifest(folder / "manifest.csv", check_files=True).problems == []


# ------------------------------------------------------------------ nothing runs, nothing is written


def test_cli_config_errors_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = {"bomb.yaml": "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' + (str(i - 1) if i > 1 else '')] * 10)}]\n" for i in range(1, 8))
        + "study: s\n",
        "name.yaml": "study: ../../x\ntasks: {xray: {}}\n",
        "tag.yaml": f"study: s\ntasks: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n",
        "results.yaml": "study: s\nresults_dir: $(touch pwned)\ntasks: {xray: {}}\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    for name in bad:
        assert main(["config", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    assert _snapshot(tmp_path) == before and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, words", [
    ("study: ../escape\ntasks: {xray: {}}\n", ["study: got '../escape'"]),
    ("study: s\nresults_dir: 'x; touch pwned'\ntasks: {xray: {}}\n", ["results_dir: got"]),
    ("study: s\ntasks: {histo: {manifest: data/manifest.csv}}\n", ["outside the allowed roots"]),
])
def test_snakemake_refuses_before_any_job(tmp_path, text, words):
    folder = tmp_path / "data"
    synthesize("histo", n_patients=4, out_dir=folder, seed=0, image_size=32)
    manifest = folder / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("images/", "../../../../../../etc/", 1))
    study = tmp_path / "study.yaml"
    study.write_text(text)
    before = _snapshot(tmp_path)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop(ROOTS_ENV, None)
    proc = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--cores", "1", "--configfile", str(study)], capture_output=True, text=True,
                          timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for word in words:
        assert word in out, out[-3000:]
    assert "Job stats" not in out and "rule " not in out.split("invalid study config")[0]
    after = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(".snakemake/")}
    assert after == before and not (tmp_path / "pwned").exists() and not (tmp_path / "results").exists()
