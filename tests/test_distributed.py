"""Multi-process training: the global-batch sampler, and a real 2-process gloo run under
torchrun (DistributedDataParallel) that must end where a single-process run with the same
global batch ends, with rank 0 alone writing the log and the checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvit.engine.distributed import (
    DistInfo,
    GlobalBatchSampler,
    all_reduce_sum,
    any_process,
    setup_distributed,
)

# A deterministic problem with no BatchNorm (per-process statistics are the one documented
# difference on CPU) and no dropout: 23 training samples in global batches of 5 (the last
# one, 3 samples, splits 2 + 1 across two processes), two micro-batches per optimizer step.
SCRIPT = r'''
import json, os, sys
from pathlib import Path
import torch
from torch import nn
from safetensors.torch import save_file
from medvit.engine import Trainer, seed_everything
from medvit.engine.distributed import current

out = Path(sys.argv[1])
g = torch.Generator().manual_seed(7)
x = torch.randn(31, 1, 4, 4, generator=g)
y = (x.mean(dim=(1, 2, 3)) > 0).long()
train = [{"image": x[i], "label": y[i]} for i in range(23)]
val = [{"image": x[i], "label": y[i]} for i in range(23, 31)]
seed_everything(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 2))
ce = nn.CrossEntropyLoss()
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / "init.safetensors"))
trainer = Trainer(model, train, val, {"epochs": 3, "batch_size": 5, "accumulate": 2, "lr": 0.05, "warmup_epochs": 1,
                                      "device": os.environ.get("DEVICE", "cpu"), "log_every": 1},
                  out, loss_fn=lambda o, b: ce(o, b["label"]),
                  val_metric_fn=lambda o, t: -float(ce(o, t.long())), progress=False)
result = trainer.fit()
info = current()
if info.is_main:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
    (out / "result.json").write_text(json.dumps({"history": result.history, "best_epoch": result.best_epoch,
                                                  "world_size": info.world_size, "backend": info.backend,
                                                  "steps": trainer.global_step}))
(out / f"rank{info.rank}.done").write_text("")
'''


def test_global_batches_are_split_across_processes_without_loss_or_overlap():
    single = list(GlobalBatchSampler(23, 5, seed=11))
    assert [len(b) for b in single] == [5, 5, 5, 5, 3]
    for world in (2, 3):
        shards = [list(GlobalBatchSampler(23, 5, seed=11, rank=r, world_size=world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1          # every process takes the same number of steps
        for b, batch in enumerate(single):
            parts = [s[b] for s in shards]
            assert sorted(i for p in parts for i in p) == sorted(batch)   # union = the global batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # the order depends on the seed only, and resuming skips whole global batches
    assert list(GlobalBatchSampler(23, 5, seed=11, start_batch=3)) == single[3:]
    assert list(GlobalBatchSampler(23, 5, seed=12)) != single
    # a last batch smaller than the number of processes would leave one without data: dropped
    s = GlobalBatchSampler(21, 5, seed=0, rank=1, world_size=2)
    assert len(s) == len(list(s)) == 4 and s.global_sizes() == [5, 5, 5, 5]
    assert len(GlobalBatchSampler(21, 5, seed=0, drop_last=True)) == 4
    assert GlobalBatchSampler(23, 5, seed=0, start_batch=2).global_sizes() == [5, 5, 3]


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, device = setup_distributed(torch.device("cpu"))
    assert info == DistInfo() and not info.enabled and info.is_main and device == torch.device("cpu")
    assert all_reduce_sum([1.5, 2.0], info) == [1.5, 2.0]
    assert any_process(True, info) and not any_process(False, info)


def _run(cmd: list[str], out: Path, device: str = "cpu") -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, DEVICE=device))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    ref = _run([sys.executable, str(script), str(one)], one)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(script), str(two)], two)
    assert ref["world_size"] == 1 and ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert (two / "rank0.done").exists() and (two / "rank1.done").exists()
    # same optimizer steps (5 global batches, 2 per step -> 3 steps an epoch), same losses, same weights
    assert ref["steps"] == ddp["steps"] == 9
    for a, b in zip(ref["history"], ddp["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_metric"] == pytest.approx(b["val_metric"], rel=1e-5, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert ref["best_epoch"] == ddp["best_epoch"]
    wa, wb = load_file(str(one / "final.safetensors")), load_file(str(two / "final.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # training moved the weights: the comparison is not between two untouched inits
    init = load_file(str(one / "init.safetensors"))
    assert not torch.allclose(wa["1.weight"], init["1.weight"], atol=1e-3)
    # rank 0 alone wrote the log (one start line, one line per step) and the checkpoints
    log = (two / "train.log").read_text()
    assert log.count(" start: ") == 1 and log.count(" step ") == 9
    assert (two / "checkpoints" / "last.safetensors").exists() and (two / "checkpoints" / "best.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_processes_match_one_gpu(tmp_path):
    """The GPU path: NCCL, one GPU per process (LOCAL_RANK), against one process on one GPU."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    ref = _run([sys.executable, str(script), str(one)], one, device="cuda")
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(script), str(two)], two, device="cuda")
    assert ddp["world_size"] == 2 and ddp["backend"] == "nccl" and ref["steps"] == ddp["steps"]
    wa, wb = load_file(str(one / "final.safetensors")), load_file(str(two / "final.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


def test_only_rank_0_writes_the_model_files(tmp_path, monkeypatch):
    """Under torchrun every rank leaves ``fit_and_save`` with the same weights; a rank other
    than 0 must not write model.safetensors / model.json (they would race on one path)."""
    import medvit.tasks.training as training

    class FittedTrainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self, resume=True):
            return None

    monkeypatch.setattr(training, "is_main_process", lambda: False)
    path = training.fit_and_save(None, "m", tmp_path / "split.csv", tmp_path, None, torch.nn.Linear(2, 2), [], [],
                                 loss_fn=None, val_metric_fn=None, trainer_cls=FittedTrainer)
    assert path == tmp_path / "model.safetensors"
    assert list(tmp_path.iterdir()) == []
