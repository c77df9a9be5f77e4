"""Faults: a full disk or a crash during a write never leaves a file that
is taken as valid, and a training job killed with SIGKILL mid-epoch resumes under
``snakemake`` from its last checkpoint to the same metrics as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import BIN, run_snakemake, start_snakemake, strip_volatile
from torch import nn

import medvit.engine.checkpoint as ckpt_mod
from medvit.engine.checkpoint import (
    CorruptCheckpointError,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    save_weights,
)
from medvit.fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ full disk, crash during a write


def test_full_disk_during_a_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"auc": 0.9})
    real_write = os.write

    class DiskFull:
        """A file object whose writes fail half-way, as on a full disk."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
            return False

    import builtins

    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return DiskFull(fh) if "w" in mode and str(file).endswith(".tmp") else fh

    monkeypatch.setattr(builtins, "open", failing_open)
    for write in (lambda: atomic_write_json(target, {"auc": 0.1, "pad": "x" * 10000}),
                  lambda: atomic_write_text(target, "garbage"),
                  lambda: atomic_write_bytes(target, b"\0" * 5000)):
        with pytest.raises(OSError) as info:
            write()
        assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(builtins, "open", real_open)
    assert json.loads(target.read_text()) == {"auc": 0.9}
    assert _leftovers(tmp_path) == []
    assert os.write is real_write


def test_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "predictions.csv"
    atomic_write_text(target, "a,b\n1,2\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between the write and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "a,b\n3,")
    monkeypatch.undo()
    assert target.read_text() == "a,b\n1,2\n" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "a,b\n1,2\n" and _leftovers(tmp_path) == []


def test_weights_cut_short_by_a_full_disk_are_refused_and_the_old_ones_survive(tmp_path, monkeypatch):
    path = save_weights(tmp_path / "model.safetensors", _net(0), {"epoch": 1})
    real_save = ckpt_mod.save_file

    def half_then_enospc(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", half_then_enospc)
    with pytest.raises(OSError):
        save_weights(path, _net(1), {"epoch": 2})
    monkeypatch.undo()
    assert load_weights(path, _net(5))["epoch"] == 1 and _leftovers(tmp_path) == []


def test_crash_between_tensors_and_sidecar_is_never_taken_as_valid(tmp_path, monkeypatch):
    stem = tmp_path / "checkpoints" / "last"
    save_checkpoint(stem, _net(0), state={"epoch": 1})

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "atomic_write_json", crash)  # tensors replaced, sidecar not
    with pytest.raises(OSError):
        save_checkpoint(stem, _net(1), state={"epoch": 2})
    monkeypatch.undo()
    with pytest.raises(CorruptCheckpointError, match="SHA-256|bytes"):
        read_checkpoint(stem)
    # a brand-new checkpoint whose sidecar never got written is refused too
    monkeypatch.setattr(ckpt_mod, "atomic_write_json", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "checkpoints" / "other", _net(1), state={"epoch": 1})
    monkeypatch.undo()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_checkpoint(tmp_path / "checkpoints" / "other")


# ------------------------------------------------------------------ kill -9 under snakemake (slow)

STUDY = {
    "study": "faults", "seed": 0, "device": "cpu", "evaluation": {"bootstrap": 50},
    "tasks": {"histo": {"synthetic": {"patients": 8, "image_size": 32}, "image_size": 32, "models": ["resnet10t"],
                        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
                        "train": {"epochs": 4, "batch_size": 8, "warmup_epochs": 1}}},
}
def _train_process(root: psutil.Process) -> psutil.Process | None:
    for child in root.children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if any(Path(c).name == "medvit" for c in cmd[:2]) and "train" in cmd:
            return child
    return None


def _workdir(tmp_path: Path, name: str) -> tuple[Path, Path]:
    work = tmp_path / name
    work.mkdir()
    study = work / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    return work, study


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_resumes_to_identical_metrics(tmp_path):
    model_dir = Path("results/faults/histo/resnet10t")
    # 1. uninterrupted reference run
    ref, ref_study = _workdir(tmp_path, "reference")
    run_snakemake(ref, ref_study)
    # 2. the same study, its training job killed with SIGKILL once a checkpoint exists
    work, study = _workdir(tmp_path, "killed")
    proc = start_snakemake(work, study)
    ckpts = work / model_dir / "checkpoints"
    killed_at = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            train = _train_process(psutil.Process(proc.pid))
            if train is not None and (ckpts / "last.json").is_file():
                time.sleep(0.3)  # into the next epoch
                sidecar = json.loads((ckpts / "last.json").read_text())
                killed_at = sidecar.get("state", {}).get("epoch")
                train.send_signal(signal.SIGKILL)
                break
            time.sleep(0.1)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed_at is not None, "training finished before a checkpoint appeared; make the study longer"
    assert proc.returncode != 0, out[-2000:]
    assert not (work / model_dir / "model.safetensors").exists() and not (work / model_dir / "metrics.json").exists()
    assert (ckpts / "last.safetensors").is_file()
    # 3. rerun: it resumes and finishes
    run_snakemake(work, study, "--rerun-incomplete")
    log = (work / model_dir / "train.log").read_text()
    assert "resum" in log.lower(), log[-2000:]
    a = json.loads((ref / model_dir / "metrics.json").read_text())
    b = json.loads((work / model_dir / "metrics.json").read_text())
    assert strip_volatile(a) == strip_volatile(b)
    assert (ref / model_dir / "predictions.csv").read_text() == (work / model_dir / "predictions.csv").read_text()
    print(f"\nkill -9 after the checkpoint of epoch {killed_at}: rerun resumed; metrics and predictions identical "
          "to the uninterrupted run")
    # 4. a weights file cut short afterwards is refused by the next stage with a clear error
    weights = work / model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    bad = subprocess.run([str(BIN / "medvit"), "predict", "--config", str(study), "--task", "histo", "--model",
                          "resnet10t", "--split", str(work / "results/faults/histo/split.csv"), "--weights",
                          str(weights), "--out", str(tmp_path / "p.csv")], capture_output=True, text=True,
                         cwd=work, env=env, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "truncated" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "p.csv").exists()
