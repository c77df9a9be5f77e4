"""Preemption: a training process that gets SIGTERM (SLURM preempting the job, or
`--signal=TERM@<s>` before its time limit) writes a checkpoint at the next optimizer step
and stops; rerunning the same command resumes from that step and ends with exactly the
weights and history of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvit.engine import read_checkpoint

pytestmark = pytest.mark.slow

# 40 samples, batch 4 -> 10 optimizer steps an epoch, 3 epochs; every sample load is logged
# to loads.txt (and slowed when SLOW is set) so the test can signal in the middle of epoch 2.
SCRIPT = r'''
import json, os, sys, time
from pathlib import Path
import torch
from torch import nn
from safetensors.torch import save_file
from medvit.engine import Trainer, seed_everything
from medvit.engine.trainer import TrainingInterrupted

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
slow = float(os.environ.get("SLOW", "0"))
slow_val = float(os.environ.get("SLOW_VAL", slow))

class Data(torch.utils.data.Dataset):
    def __init__(self, n, offset, delay):
        self.delay = delay
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n + offset, 1, 6, 6, generator=g)[offset:]
        self.y = (self.x[:, 0, :3].mean(dim=(1, 2)) > self.x[:, 0, 3:].mean(dim=(1, 2))).long()
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
            with open(out / "loads.txt", "a") as fh:
                fh.write(f"{i}\n")
        return {"image": self.x[i], "label": self.y[i]}

seed_everything(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
ce = nn.CrossEntropyLoss()
trainer = Trainer(model, Data(40, 0, slow), Data(12, 40, slow_val),
                  {"epochs": 3, "batch_size": 4, "lr": 0.01, "device": "cpu"}, out,
                  loss_fn=lambda o, b: ce(o, b["label"]),
                  val_metric_fn=lambda o, t: -float(ce(o, t.long())), progress=False)
try:
    result = trainer.fit(resume=True)
except TrainingInterrupted as exc:
    print(f"interrupted: {exc}", file=sys.stderr)
    sys.exit(128 + 15)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
(out / "result.json").write_text(json.dumps({"history": result.history, "best_epoch": result.best_epoch,
                                              "resumed_from": result.resumed_from}))
'''


def _start(script: Path, out: Path, slow: float = 0.0, slow_val: float | None = None) -> subprocess.Popen:
    env = dict(os.environ, SLOW=str(slow), SLOW_VAL=str(slow if slow_val is None else slow_val))
    return subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigterm_checkpoints_mid_epoch_and_rerun_resumes_to_identical_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    rc, err = _finish(_start(script, ref_dir))
    assert rc == 0, err

    # Slowed run: SIGTERM once the 55th training sample of the run is loaded (epoch 2, step 4).
    proc = _start(script, run_dir, slow=0.03)
    loads = run_dir / "loads.txt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        # validation loads (12 per epoch) are logged too: 40 train + 12 val + 15 train = 67
        if loads.exists() and len(loads.read_text().split()) >= 67:
            break
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the slowed run never reached epoch 2")
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 128 + 15, err
    assert "training stopped by SIGTERM at epoch 2, after batch" in err and "checkpoint saved" in err

    # The checkpoint written on the signal records the step inside epoch 2.
    state = read_checkpoint(run_dir / "checkpoints" / "last").state
    assert state["epoch"] == 1 and 0 < state["batch"] < 10
    assert state["global_step"] == 10 + state["batch"]
    assert state["partial"]["samples"] == 4 * state["batch"]
    assert "SIGTERM: saved checkpoints/last at epoch 2" in (run_dir / "train.log").read_text()
    assert not (run_dir / "result.json").exists()

    # Rerun (the scheduler's requeue, or Snakemake's retry): resumes at that step.
    rc, err = _finish(_start(script, run_dir))
    assert rc == 0, err
    log = (run_dir / "train.log").read_text()
    assert f"(epoch 1 of 3, batch {state['batch']} of epoch 2)" in log
    ref = json.loads((ref_dir / "result.json").read_text())
    got = json.loads((run_dir / "result.json").read_text())
    assert got["resumed_from"] == 1
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ref["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in got["history"]]
    assert got["best_epoch"] == ref["best_epoch"]
    a, b = load_file(str(ref_dir / "final.safetensors")), load_file(str(run_dir / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = read_checkpoint(run_dir / "checkpoints" / "last").state
    assert final["epoch"] == 3 and final.get("batch", 0) == 0


def test_sigterm_between_epochs_keeps_the_epoch_checkpoint(tmp_path):
    """A signal that lands while validating stops after the epoch's own checkpoint."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = _start(script, out, slow=0.03, slow_val=0.3)   # validation takes 3.6 s
    loads = out / "loads.txt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (loads.exists() and len(loads.read_text().split()) >= 43):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)   # during epoch 1's validation (train samples 1-40 loaded)
    rc, err = _finish(proc)
    assert rc == 128 + 15, err
    state = read_checkpoint(out / "checkpoints" / "last").state
    assert state["epoch"] == 1 and state.get("batch", 0) == 0 and len(state["history"]) == 1
