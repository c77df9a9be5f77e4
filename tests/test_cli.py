"""Every command answers bad input with `error: ...` on stderr and a non-zero exit, never a
traceback: missing files, empty manifests and folders, invalid configs, unknown tasks,
models of the wrong kind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import medvit
from medvit.cli import main


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.csv").write_text("patient_id,image\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "not.npz").write_text("not the dataset")
    (tmp_path / "study.yaml").write_text("study: x\ntasks:\n  xray:\n    manifest: empty.csv\n  histo: {}\n")
    return tmp_path


KEY = "cli-test-key-5f1e9a3c7b2d4e60"
CASES = [
    (["manifest", "validate", "missing.csv"], 1, "manifest not found"),
    (["manifest", "validate", "empty.csv"], 1, "no data rows"),
    (["ingest", "emptydir", "--out", "m.csv", "--key", KEY], 2, "holds no files"),
    (["ingest", "nodir", "--out", "m.csv", "--key", KEY], 2, "does not exist"),
    (["synth", "xray", "--patients", "2", "--out", "o"], 2, "at least 4 patients"),
    (["import", "pneumoniamnist", "not.npz", "--out", "o"], 2, "SHA-256"),
    (["config", "missing.yaml"], 2, "not found"),
    (["split", "--config", "study.yaml", "--task", "xray", "--out", "s.csv"], 2, "no data rows"),
    (["split", "--config", "study.yaml", "--task", "brain", "--out", "s.csv"], 2, "not in study"),
    (["train", "--config", "study.yaml", "--task", "xray", "--model", "resnet18", "--split", "no.csv", "--out", "m"],
     2, "not found"),
    (["train", "--config", "study.yaml", "--task", "xray", "--model", "unet3d", "--split", "no.csv", "--out", "m"],
     2, "3D model"),
    (["predict", "--config", "study.yaml", "--task", "xray", "--model", "resnet18", "--split", "no.csv",
      "--weights", "w.safetensors", "--out", "p.csv"], 2, "not found"),
    (["evaluate", "--config", "study.yaml", "--task", "xray", "--model", "resnet18", "--predictions", "no.csv",
      "--out", "m.json"], 2, "not found"),
    (["report", "--config", "study.yaml", "--out", "r.html", "no.json"], 2, "not found"),
]


@pytest.mark.parametrize("argv,code,message", CASES, ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_clear_error(workdir, capsys, monkeypatch, argv, code, message):
    monkeypatch.delenv("MEDVIT_PSEUDONYM_KEY", raising=False)
    assert main(argv) == code
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
    if code == 2:
        assert captured.err.startswith("error: ")


def test_no_traceback_from_the_console_command(workdir):
    exe = Path(sys.executable).parent / "medvit"
    proc = subprocess.run([str(exe), "split", "--config", "study.yaml", "--task", "xray", "--out", "s.csv"],
                          capture_output=True, text=True, cwd=workdir, env=dict(os.environ), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_console_command_keeps_the_exit_code_and_flushes_before_its_fast_exit(monkeypatch, capsys):
    import torch  # noqa: F401  (as in every model job)

    import medvit.cli as cli
    exits = []
    monkeypatch.setattr(cli, "main", lambda argv=None: print("last line", end="") or 3)
    monkeypatch.setattr(os, "_exit", exits.append)
    cli.console_main()
    assert exits == [3]
    assert capsys.readouterr().out == "last line"


def test_console_command_without_torch_exits_normally(monkeypatch):
    import medvit.cli as cli

    monkeypatch.setattr(cli, "main", lambda argv=None: 2)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("os._exit without torch"))
    with pytest.raises(SystemExit) as info:
        cli.console_main()
    assert info.value.code == 2


def test_the_medvit_command_runs_this_checkout(tmp_path):
    """The venv's `medvit` command (which every workflow job runs) imports the code under test,
    not another checkout's: `--version` names where it runs from."""
    exe = Path(sys.executable).parent / "medvit"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    repo = Path(__file__).resolve().parents[1]
    assert proc.returncode == 0 and proc.stdout.strip() == f"medvit {medvit.__version__} from {repo / 'medvit'}", (
        proc.stdout + proc.stderr)
