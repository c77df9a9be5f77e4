"""Speed switches (medvit.engine.speed): each one leaves the numbers unchanged, the bf16 probe
measures once and caches its verdict, and the decoded-image cache survives worker processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medvit.config import load_schema
from medvit.cpu_ops import attention as attention_mod
from medvit.data.datasets import SampleDataset
from medvit.engine import TrainConfig, Trainer, seed_everything
from medvit.engine import device as device_mod
from medvit.engine import trainer as trainer_mod
from medvit.engine.device import resolve_bf16
from medvit.engine.speed import (
    apply_channels_last,
    auto_num_workers,
    channels_last_input,
    compile_model,
    device_key,
    enable_activation_checkpointing,
    matmul_peak,
    probe_bf16,
    resolve_num_workers,
)
from medvit.errors import ConfigError


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE_DIR", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv_net(dims: int = 2) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    # no bias before the norm: its true gradient is 0, and AdamW would turn rounding noise into steps
    return nn.Sequential(conv(2, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(), conv(8, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.LazyLinear(3))


# ------------------------------------------------------------------------------ measures


def test_matmul_peak_is_in_flop_per_second_for_both_precisions():
    peak = matmul_peak("cpu", n=64, repeats=3)
    # any CPU does between a MFLOP/s and a PFLOP/s: GFLOP/s, seconds or FLOPs would fall outside
    assert set(peak) == {"fp32", "bf16"} and all(1e6 < v < 1e15 for v in peak.values()), peak


def _fake_clock(fp32_s: float, bf16_s: float):
    """A ``perf_counter`` for the bf16 probes, whose reads go: a warm-up round (fp32 start, bf16
    start, not timed), then per round fp32 start and end, bf16 start and end. Each fp32 call
    lasts ``fp32_s`` seconds, each bf16 call ``bf16_s``."""
    state = {"t": 0.0, "reads": 0}

    def perf_counter() -> float:
        k = state["reads"] - 2
        state["reads"] += 1
        if k >= 0 and k % 4 in (1, 3):
            state["t"] += fp32_s if k % 4 == 1 else bf16_s
        return state["t"]

    return perf_counter


@pytest.mark.parametrize(("fp32_s", "bf16_s", "verdict"), [(2.0, 1.0, True), (2.0, 1.9, False), (1.0, 2.0, False)])
def test_bf16_probes_choose_bf16_only_when_it_is_clearly_faster(monkeypatch, fp32_s, bf16_s, verdict):
    """bf16 needs a 10% speed-up (PROBE_MARGIN) in the matmul probe and in the step probe."""
    from types import SimpleNamespace

    from medvit.engine import speed
    from medvit.engine.speed import probe_bf16_step

    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=_fake_clock(fp32_s, bf16_s)))
    matmul = probe_bf16("cpu", use_cache=False, n=8, repeats=2)
    assert matmul.use_bf16 is verdict and matmul.speedup == pytest.approx(fp32_s / bf16_s, abs=1e-3)
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=_fake_clock(fp32_s, bf16_s)))
    step = probe_bf16_step(lambda bf16: None, "cpu", "noop|x1", use_cache=False, repeats=2)
    assert step.use_bf16 is verdict and (step.fp32_ms, step.bf16_ms) == (fp32_s * 1e3, bf16_s * 1e3)


def test_bf16_probe_measures_once_then_reads_the_cache(tmp_path):
    first = probe_bf16("cpu", n=128, repeats=2)
    assert first.source == "measured" and first.fp32_gflops > 0 and first.bf16_gflops > 0
    cached = json.loads((tmp_path / "cache" / "bf16_probe.json").read_text())
    assert device_key("cpu") in cached
    second = probe_bf16("cpu", n=128, repeats=2)
    assert second.source == "cache" and second.use_bf16 == first.use_bf16
    assert probe_bf16("cpu", use_cache=False, n=64, repeats=1).source == "measured"


@pytest.mark.parametrize("verdict", [True, False])
def test_bf16_auto_follows_the_measured_verdict(tmp_path, monkeypatch, verdict):
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: True)
    path = tmp_path / "cache" / "bf16_probe.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({device_key("cpu"): {"fp32_gflops": 100.0, "bf16_gflops": 200.0 if verdict else 50.0,
                                                    "speedup": 2.0 if verdict else 0.5, "use_bf16": verdict}}))
    assert resolve_bf16("auto", torch.device("cpu")) is verdict
    # explicit settings are never second-guessed
    assert resolve_bf16(True, torch.device("cpu")) is True and resolve_bf16(False, torch.device("cpu")) is False


def _tiny_training(tmp_path, bf16):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 2, 8, 8, generator=g)
    data = [{"image": x[i], "label": torch.tensor(i % 3)} for i in range(24)]
    model = nn.Sequential(conv_net(),
                          nn.Dropout(0.3))  # BatchNorm statistics and dropout: state the probe must not touch
    model(x[:2])
    ce = nn.CrossEntropyLoss()
    trainer = Trainer(model, data[:16], data[16:], {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0,
                                                    "bf16": bf16, "device": "cpu", "seed": 0},
                      tmp_path, loss_fn=lambda o, b: ce(o, b["label"]),
                      val_metric_fn=lambda o, t: -float(ce(o, t.long())), progress=False)
    trainer.fit(resume=False)
    return trainer, model.state_dict()


@pytest.mark.parametrize("faster", [True, False])
def test_bf16_auto_times_the_models_own_step_and_leaves_no_trace(tmp_path, monkeypatch, faster):
    import medvit.engine.speed as speed_mod

    monkeypatch.setattr(trainer_mod, "bf16_supported", lambda device: True)
    real_step_probe = speed_mod.probe_bf16_step
    calls = []

    def probe(step, device, model_key, **kwargs):
        # the real probe runs (both precisions, the model's own step); its timing verdict is
        # replaced so both branches are checked on any CPU
        measured = real_step_probe(step, device, model_key, repeats=1, use_cache=False)
        calls.append((model_key, measured))
        return speed_mod.StepProbe(measured.key, 2.0, 1.0 if faster else 4.0, 2.0 if faster else 0.5, faster,
                                   "measured")

    monkeypatch.setattr(trainer_mod, "probe_bf16_step", probe)
    auto, auto_weights = _tiny_training(tmp_path / "auto", "auto")
    assert len(calls) == 1 and calls[0][1].fp32_ms > 0 and calls[0][1].bf16_ms > 0
    assert "Sequential|" in calls[0][0] and "(8, 2, 8, 8)" in calls[0][0]
    assert auto.bf16 is faster
    assert f"bf16 {'on' if faster else 'off'}" in (tmp_path / "auto" / "train.log").read_text()
    # the probe's steps changed nothing: the run equals one with the verdict set explicitly
    _, fixed_weights = _tiny_training(tmp_path / "fixed", faster)
    for k in fixed_weights:
        torch.testing.assert_close(auto_weights[k], fixed_weights[k], rtol=0, atol=0)


def test_step_probe_measures_once_then_reads_the_cache(tmp_path):
    from medvit.engine.speed import probe_bf16_step

    model = conv_net()
    x = torch.randn(4, 2, 8, 8)
    model(x)
    seen = []

    def step(bf16):
        seen.append(bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x).float().sum().backward()

    first = probe_bf16_step(step, "cpu", "conv|x4", repeats=2)
    assert first.source == "measured" and seen == [False, True] * 3
    second = probe_bf16_step(step, "cpu", "conv|x4", repeats=2)
    assert second.source == "cache" and second.use_bf16 == first.use_bf16 and len(seen) == 6
    assert probe_bf16_step(step, "cpu", "conv|x8", repeats=1).source == "measured"  # another model or batch


def test_both_bf16_probes_keep_their_verdicts_in_one_file(tmp_path):
    """The matmul and the step verdicts share bf16_probe.json (one reader, one writer); a step
    verdict in bf16_steps.json, where earlier versions wrote it, is still read, so an upgraded
    machine keeps its choices."""
    from medvit.engine.speed import STEP_PROBE_REVISION, probe_bf16_step

    matmul = probe_bf16("cpu", n=64, repeats=1)
    step = probe_bf16_step(lambda bf16: None, "cpu", "noop|x1", repeats=1)
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["bf16_probe.json"]
    stored = json.loads((cache / "bf16_probe.json").read_text())
    assert set(stored) == {matmul.key, step.key}
    assert stored[step.key] == {"fp32_ms": step.fp32_ms, "bf16_ms": step.bf16_ms, "speedup": step.speedup,
                                "use_bf16": step.use_bf16}
    old_key = f"{device_key('cpu')}|conv|x4|steps v{STEP_PROBE_REVISION}"
    (cache / "bf16_steps.json").write_text(json.dumps({old_key: {"fp32_ms": 2.0, "bf16_ms": 1.0, "speedup": 2.0,
                                                                 "use_bf16": True}}))
    old = probe_bf16_step(lambda bf16: pytest.fail("measured again"), "cpu", "conv|x4")
    assert (old.source, old.use_bf16, old.fp32_ms) == ("cache", True, 2.0)


def test_bf16_auto_is_off_without_native_support(monkeypatch):
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: False)
    assert resolve_bf16("auto", torch.device("cpu")) is False


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_same_outputs_and_gradients(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *([8] * dims))
    ref = conv_net(dims)
    ref(x)  # materialise the lazy layer
    fast = conv_net(dims)
    fast(x)
    fast.load_state_dict(ref.state_dict())
    apply_channels_last(fast)
    weight = fast[0].weight
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()
    xl = channels_last_input(x)
    assert xl.is_contiguous(memory_format=fmt) and torch.equal(xl, x)
    out_ref, out_fast = ref(x), fast(xl)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.sum().backward()
    out_fast.sum().backward()
    torch.testing.assert_close(fast[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4)
    # the state dict holds the same values (strides differ only)
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])


def test_channels_last_input_leaves_other_tensors_alone():
    t = torch.randn(3, 4)
    assert channels_last_input(t) is t


def test_compile_keeps_outputs_and_parameter_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    expected = model(x)
    names = list(model.state_dict())
    # aot_eager traces through dynamo and AOTAutograd without the minutes of C++ compilation
    # that the default inductor backend takes on a 2-core machine (benchmarks time that one)
    compile_model(model, True, backend="aot_eager")
    torch.testing.assert_close(model(x), expected)
    assert list(model.state_dict()) == names
    plain = nn.Linear(2, 2)
    assert compile_model(plain, False) is plain and plain._compiled_call_impl is None


def test_activation_checkpointing_keeps_gradients():
    from medvit.models.vit import build_vit

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    ref = build_vit("tiny", in_chans=1, num_classes=2, img_size=32, patch_size=8)
    ckpt = build_vit("tiny", in_chans=1, num_classes=2, img_size=32, patch_size=8)
    ckpt.load_state_dict(ref.state_dict())
    assert enable_activation_checkpointing(ckpt) == len(ckpt.blocks)
    assert enable_activation_checkpointing(ckpt) == 0  # not wrapped twice
    ref.eval(), ckpt.eval()  # no dropout / drop path differences
    ref(x).sum().backward()
    ckpt(x).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_worker_counts_follow_the_machine():
    assert auto_num_workers("cpu", cpus=2) == 0
    assert auto_num_workers("cpu", cpus=16) == 4
    assert auto_num_workers("cuda", cpus=16) == 8 and auto_num_workers("cuda", cpus=2) == 1
    assert resolve_num_workers(3) == 3 and resolve_num_workers("auto") >= 0


# ------------------------------------------------------------------------------ trainer


class Blobs(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(n)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 2, 8, 8, generator=g) + self.y[:, None, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def _fit(tmp_path: Path, **cfg) -> Trainer:
    seed_everything(0)
    model = conv_net(2)
    model(torch.zeros(1, 2, 8, 8))
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_epochs=0, device="cpu", log_every=0, **cfg)
    trainer = Trainer(model, Blobs(32), Blobs(16), config, tmp_path,
                      loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]),
                      val_metric_fn=lambda out, y: float((out.argmax(1) == y).float().mean()), progress=False)
    trainer.fit()
    return trainer


def test_trainer_channels_last_trains_like_the_default(tmp_path):
    plain = _fit(tmp_path / "plain")
    fast = _fit(tmp_path / "fast", channels_last=True)
    assert fast.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (n, a), (_, b) in zip(plain.model.named_parameters(), fast.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=n)
    assert (tmp_path / "fast" / "checkpoints").is_dir()


def test_train_config_switches_are_validated():
    # the dataclass defaults are the schema's (a study that leaves them out gets the same)
    schema = load_schema()["$defs"]["train"]["properties"]
    for name in ("channels_last", "compile", "retain_freed_memory", "tf32"):
        assert getattr(TrainConfig(), name) is schema[name]["default"], name
    with pytest.raises(ConfigError, match="train.channels_last"):
        TrainConfig(channels_last="yes")
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile=1)
    with pytest.raises(ConfigError, match="train.retain_freed_memory"):
        TrainConfig(retain_freed_memory="no")
    with pytest.raises(ConfigError, match="train.tf32"):
        TrainConfig(tf32="on")


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_set_on_cuda_and_leaves_the_cpu_alone(tf32_flags):
    from medvit.engine.speed import set_tf32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert set_tf32(torch.device("cpu"), True) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    # the flags are plain process state, so the CUDA branch is checked without a GPU too
    assert set_tf32(torch.device("cuda"), True) is True
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert set_tf32(torch.device("cuda", 0), False) is True
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


@pytest.mark.parametrize("tf32", [True, False])
def test_trainer_applies_tf32_to_its_device(tmp_path, monkeypatch, tf32):
    calls = []
    monkeypatch.setattr(trainer_mod, "set_tf32", lambda device, on: calls.append((device.type, on)))
    kwargs = dict(loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]), progress=False)
    Trainer(conv_net(2), Blobs(8), None, TrainConfig(device="cpu", tf32=tf32), tmp_path, **kwargs)
    assert calls == [("cpu", tf32)]


def test_trainer_retains_freed_memory_unless_switched_off(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_mod, "retain_freed_memory", lambda: calls.append(1) or True)
    model = conv_net(2)
    kwargs = dict(loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]), progress=False)
    Trainer(model, Blobs(8), None, TrainConfig(device="cpu"), tmp_path / "a", **kwargs)
    assert calls == [1]
    Trainer(model, Blobs(8), None, TrainConfig(device="cpu", retain_freed_memory=False), tmp_path / "b", **kwargs)
    assert calls == [1]


def _counting_load(log: Path):
    def load(rec: dict) -> dict:
        with open(log, "a") as fh:  # appended from any process or thread
            fh.write(f"{rec['i']}\n")
        return {"image": np.full((2, 8, 8), float(rec["i"] % 3), dtype=np.float32), "label": rec["i"] % 3}
    return load


def test_warm_cache_decodes_each_sample_once_in_threads(tmp_path):
    log = tmp_path / "loads.txt"
    ds = SampleDataset([{"i": i} for i in range(12)], _counting_load(log))
    ds.warm_cache(num_workers=2)
    ds.warm_cache(num_workers=2)
    assert sorted(int(v) for v in log.read_text().split()) == list(range(12))
    assert all(c is not None for c in ds._cached)


def test_epochs_after_the_first_decode_nothing_with_workers(tmp_path):
    log = tmp_path / "loads.txt"
    train = SampleDataset([{"i": i} for i in range(16)], _counting_load(log))
    seed_everything(0)
    model = conv_net(2)
    model(torch.zeros(1, 2, 8, 8))
    config = TrainConfig(epochs=3, batch_size=8, warmup_epochs=0, device="cpu", log_every=0, num_workers=1)
    Trainer(model, train, None, config, tmp_path / "run",
            loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]), progress=False).fit()
    # every sample decoded exactly once over three epochs, although workers are new each epoch
    assert sorted(int(v) for v in log.read_text().split()) == list(range(16))


# ------------------------------------------------------------------------------ benchmarks


def _bench_module(name: str):
    """A script of benchmarks/ (``name`` without .py) imported as a module."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"medvit_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rule_times_sum_snakemake_benchmark_files(tmp_path):
    run_all = _bench_module("run_all")
    head = "s\th:m:s\tmax_rss\tmax_vms\n"
    for rule, name, s, rss in (("train", "a", 10.0, 500.0), ("train", "b", 4.0, 800.0), ("split", "x", 1.5, 100.0)):
        (tmp_path / "benchmarks" / rule).mkdir(parents=True, exist_ok=True)
        (tmp_path / "benchmarks" / rule / f"{name}.tsv").write_text(head + f"{s}\t0:00:10\t{rss}\t1\n")
    rows = run_all.rule_times(tmp_path)
    assert [r["rule"] for r in rows] == ["train", "split"]
    assert rows[0] == {"rule": "train", "jobs": 2, "total_s": 14.0, "max_s": 10.0, "max_rss_mib": 800.0}


def test_results_page_reports_failures_and_missing_parts():
    run_all = _bench_module("run_all")
    page = run_all.render({"created": "now", "quick": True, "device_type": "cpu", "note": "under load",
                           "machine": {"cpu": "X", "cores": 2}, "benchmarks": {}, "rules": {},
                           "status": {"models": {"ok": False, "seconds": 1.0, "reason": "timed out after 9 s"}}})
    assert "models (FAILED" in page and "timed out after 9 s" in page and "> under load" in page
    assert "make demo" in page


def test_models_benchmark_reports_the_median_pass_and_the_range():
    run_all, bench_models = _bench_module("run_all"), _bench_module("bench_models")
    base = {"model": "cswin_unet", "input": [3, 32, 32, 32], "batch": 4, "bf16_train_speedup": 1.05,
            "train_samples_per_s_fp32": 1.0, "train_samples_per_s_bf16": 1.0}
    runs = [{**base, "train_fraction_of_peak_fp32": f, "train_fraction_of_peak_bf16": f / 2, "pass": i}
            for i, f in enumerate((0.31, 0.27, 0.32))]
    row = bench_models.median_pass(runs)
    assert row["pass"] == 0 and row["passes"] == 3
    assert row["train_fraction_of_peak_fp32_passes"] == [0.31, 0.27, 0.32]
    assert bench_models.median_pass(runs[:2])["pass"] == 1  # even count: the lower middle
    page = run_all.render({"created": "now", "quick": False, "device_type": "cpu", "machine": {"cpu": "X", "cores": 2},
                           "rules": {}, "status": {}, "benchmarks": {"models": {"results": [row]}}})
    assert "31.0 [27.0-32.0]" in page  # the models table: median pass, range over the passes
    target = next(line for line in page.splitlines() if line.startswith("| cswin_unet training with `bf16: false`"))
    assert "31.0%" in target and "median of 3 passes" in target and target.endswith("| yes |")


def test_gpu_benchmark_section_and_targets_are_rendered():
    run_all = _bench_module("run_all")
    mae = {"case": "mae_vit_base 224px/16, mask 0.75", "input": [1, 224, 224], "batch": 512, "step_s": 0.08,
           "samples_per_s": 6400.0, "gflop_per_sample": 26.6, "speedup_vs_fp32": 4.2}
    gpu = {"matmul_peak_gflops": {"fp32": 49000.0, "tf32": 380000.0, "bf16": 730000.0},
           "paper": [{**mae, "precision": "fp32", "fraction_of_matmul_peak": 0.835},
                     {**mae, "precision": "tf32", "fraction_of_matmul_peak": 0.323},
                     {**mae, "precision": "bf16", "fraction_of_matmul_peak": 0.52},
                     {**mae, "precision": "bf16_compiled", "fraction_of_matmul_peak": 0.6, "compile_s": 55.0}],
           "heads": [{"batch": 4, "side": 32, "precision": "fp32", "unpadded_s": 0.04, "pad8_speedup": 1.02,
                      "pad16_speedup": 0.99}],
           "syncs": [{"case": "vit_tiny 64px b32", "none_ms": 20.1, "two_ms": 19.5, "one_ms": 20.1,
                      "two_over_none": 0.97, "one_over_none": 1.0}]}
    page = run_all.render({"created": "now", "quick": False, "device_type": "cuda",
                           "results_dir": "benchmarks/results/cuda",
                           "machine": {"gpu": "G"}, "rules": {}, "status": {}, "benchmarks": {"gpu": gpu}})
    assert "## GPU at paper sizes" in page and "| bf16_compiled | 6400 |" in page and "| 55 |" in page
    assert "padded for the CUDA flash kernel" in page and "benchmarks/results/cuda/all_cuda.json" in page
    assert "| vit_tiny 64px b32 | 20.1 | 19.5 | 20.1 | 0.97 | 1 |" in page
    targets = [line for line in page.splitlines() if line.startswith("| MAE pretraining at the MAE paper setting")]
    assert len(targets) == 2  # TF32 (the fp32 default) and bf16; not the reference fp32 or compiled rows
    assert targets[0].endswith("| 32.3% | no |") and targets[1].endswith("| 52.0% | yes |")


def test_cuda_only_benchmarks_stay_out_of_the_cpu_suite(monkeypatch, tmp_path):
    run_all = _bench_module("run_all")
    ran = []
    monkeypatch.setattr(run_all, "run_suite", lambda names, *a: ran.extend(names) or {})
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--device", "cpu", "--results", str(tmp_path / "r"),
                                      "--report", str(tmp_path / "R.md"), "--study", "none"])
    run_all.main()
    assert ran and "gpu" not in ran and set(ran) == set(run_all.SUITE) - run_all.CUDA_ONLY
    assert (tmp_path / "R.md").exists() and (tmp_path / "r" / "all_cpu.json").exists()


def test_num_workers_auto_is_sized_by_the_machine(tmp_path, monkeypatch):
    import medvit.engine.speed as speed_mod

    monkeypatch.setattr(speed_mod, "auto_num_workers", lambda device="cpu", cpus=None: 3)
    data = [{"image": torch.zeros(2, 4, 4), "label": torch.tensor(0)}] * 4
    common = {"epochs": 1, "batch_size": 2, "device": "cpu"}
    make = lambda workers: Trainer(nn.Linear(2, 2), data, None, {**common, "num_workers": workers}, tmp_path,  # noqa: E731
                                   loss_fn=lambda o, b: o.sum(), progress=False)
    assert make("auto").num_workers == 3 and make(1).num_workers == 1
    with pytest.raises(ConfigError, match="num_workers"):
        TrainConfig.from_dict({**common, "num_workers": "many"})


def test_cpu_bf16_autocast_computes_attention_unfused(monkeypatch):
    """Inside medvit's CPU bf16 autocast every F.scaled_dot_product_attention call (here a timm
    ViT block's) goes to the unfused composition; outside it, nothing is rerouted."""
    from timm.models.vision_transformer import Block

    from medvit.engine.device import autocast_context

    calls = []
    real = attention_mod.unfused_attention
    monkeypatch.setattr(attention_mod, "unfused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    block = Block(32, 4)
    assert block.attn.fused_attn  # timm calls F.scaled_dot_product_attention
    x = torch.randn(2, 9, 32)
    fused = block(x)
    assert calls == []
    with autocast_context(torch.device("cpu"), True):
        out = block(x)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = block(x)  # fused kernel, same precision policy
    torch.testing.assert_close(out.float(), reference.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(out.float(), fused, atol=0.1, rtol=0.1)
    with autocast_context(torch.device("cpu"), False):
        block(x)
    assert len(calls) == 1
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    with autocast_context(torch.device("cpu"), True):  # grouped-query attention: the fused kernel
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert len(calls) == 1


def test_trainer_uses_the_fused_adamw_step_on_the_cpu(tmp_path):
    from medvit.engine.speed import fused_adamw_supported

    config = TrainConfig(epochs=1, batch_size=8, device="cpu", log_every=0)
    trainer = Trainer(conv_net(2), Blobs(8), None, config, tmp_path, progress=False,
                      loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]))
    optimizer = trainer.build_optimizer()
    assert optimizer.defaults["fused"] is True
    assert not fused_adamw_supported([{"params": [torch.zeros(2, dtype=torch.int64)]}])
    assert not fused_adamw_supported([{"params": []}])
