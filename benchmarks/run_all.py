"""Run every benchmark and write benchmarks/RESULTS.md (and benchmarks/results/all_<device>.json).

    python benchmarks/run_all.py [--quick] [--device auto] [--only models,peers] [--study demo]
    python benchmarks/run_all.py --report-only --device cuda --results benchmarks/results/cuda \
        --report benchmarks/RESULTS_cuda.md      # rebuild the GPU report from its JSON files

Each benchmark runs in its own process with a time limit; one that fails or times out is
recorded with its reason and the others go on. ``--quick`` (tiny sizes, few steps) takes a
few minutes on an idle 2-core machine; without it the sizes are larger and the numbers
steadier. Runs on CPU or CUDA (``--device auto`` picks CUDA when available).

The demo study's wall time per rule comes from Snakemake's ``benchmark:`` files
(``results/<study>/benchmarks/<rule>/*.tsv``) of the last ``make demo``; run it first to
refresh them (``--run-demo`` does, before the benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SUITE = {  # name -> (script, extra args, time limit in seconds (quick, full))
    "models": ("bench_models.py", [], (900, 3600)),
    "switches": ("bench_switches.py", [], (900, 3600)),
    "data": ("bench_data.py", [], (600, 1800)),
    "peers": ("bench_peers.py", [], (1200, 3600)),
    "mae": ("bench_mae.py", [], (600, 1800)),
    "scaling": ("bench_scaling.py", [], (1200, 3600)),
    "ingest": ("bench_ingest.py", [], (900, 3600)),
    "gpu": ("bench_gpu.py", [], (600, 1800)),
}
CUDA_ONLY = {"gpu"}  # left out of the default suite on a CPU


def run_suite(names: list[str], device: str, quick: bool, results: Path) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for name in names:
        script, extra, limits = SUITE[name]
        out = results / f"{name}.json"
        cmd = [sys.executable, str(HERE / script), "--device", device, "--out", str(out), *extra]
        if quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        out.unlink(missing_ok=True)  # what is there afterwards comes from this run
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=limits[0 if quick else 1], capture_output=True, text=True)
            ok = proc.returncode == 0 and out.exists()
            reason = None if ok else f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"
            sys.stdout.write(proc.stdout)
        except subprocess.TimeoutExpired:
            ok, reason = False, f"timed out after {limits[0 if quick else 1]} s"
        status[name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1), "reason": reason,
                        "partial": not ok and out.exists()}
        if not ok:
            print(f"   {name} {'incomplete' if out.exists() else 'skipped'}: {reason}", flush=True)
    return status


def rule_times(study_dir: Path) -> list[dict[str, Any]]:
    """Wall time per rule from Snakemake's benchmark TSVs: jobs, total, max seconds, max RSS."""
    rules: dict[str, dict[str, Any]] = {}
    for tsv in sorted((study_dir / "benchmarks").glob("**/*.tsv")):
        rule = tsv.relative_to(study_dir / "benchmarks").parts[0]
        lines = tsv.read_text().strip().splitlines()
        if len(lines) < 2:
            continue
        head, values = lines[0].split("\t"), lines[-1].split("\t")
        row = dict(zip(head, values))
        try:
            s, rss = float(row["s"]), float(row.get("max_rss", "nan"))
        except ValueError:
            continue
        r = rules.setdefault(rule, {"rule": rule, "jobs": 0, "total_s": 0.0, "max_s": 0.0, "max_rss_mib": 0.0})
        r["jobs"] += 1
        r["total_s"] += s
        r["max_s"] = max(r["max_s"], s)
        if not math.isnan(rss):
            r["max_rss_mib"] = max(r["max_rss_mib"], rss)
    return sorted(({**r, "total_s": round(r["total_s"], 1)} for r in rules.values()), key=lambda r: -r["total_s"])


def _pss_kib(pids: list[int]) -> int:
    """Proportional set size of these processes (shared library pages split between them)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
                total += next((int(ln.split()[1]) for ln in fh if ln.startswith("Pss:")), 0)
        except (OSError, ValueError):
            pass
    return total


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def run_demo(study_dir: Path) -> dict[str, Any]:
    """``make demo`` from an empty study folder: wall seconds and the peak memory of the whole
    run (the sum of the PSS of make, Snakemake and every job, sampled every second)."""
    import shutil
    import threading

    shutil.rmtree(study_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["make", "demo"], cwd=ROOT)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_kib(_tree(proc.pid)))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    return {"exit_code": code, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_memory_mib": round(peak[0] / 1024, 1), "memory_method": "sum of PSS of the process tree, 1 s samples"}


def demo_wall_from_log(study: str) -> dict[str, Any] | None:
    """The wall time of the newest complete Snakemake run of ``study`` (its log in .snakemake/log)."""
    import datetime as dt
    import re

    for log in sorted((ROOT / ".snakemake" / "log").glob("*.snakemake.log"), reverse=True):
        text = log.read_text(errors="replace")
        done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", text)
        if f"results/{study}/" not in text or not done:
            continue
        start = re.search(r"Date: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
        stamps = re.findall(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", text, re.M)
        if not start or not stamps:
            continue
        t0 = dt.datetime.strptime(start.group(1), "%Y-%m-%d %H:%M:%S")
        t1 = dt.datetime.strptime(" ".join(stamps[-1].split()), "%a %b %d %H:%M:%S %Y")
        return {"log": log.name, "wall_s": (t1 - t0).total_seconds(), "jobs": int(done[-1][1])}
    return None


# ------------------------------------------------------------------------------ report

def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    if not rows:
        return "_(no rows)_\n"
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if isinstance(v, float):
                cells.append(f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}")
            else:
                cells.append("" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 1)


def _pass_range(row: dict[str, Any], dtype: str) -> str:
    """A models row's range of the training fraction of the ``dtype`` peak over its passes, in
    %: ``[27.4-31.8]``; empty for one pass."""
    runs = row.get(f"train_fraction_of_peak_{dtype}_passes") or []
    return f"[{_pct(min(runs))}-{_pct(max(runs))}]" if len(runs) > 1 else ""


def _pct_passes(row: dict[str, Any], dtype: str) -> str | float | None:
    """A models row's training fraction of the ``dtype`` peak in %, with its range over the
    passes when there were several: ``30.8 [27.4-31.8]``."""
    value = _pct(row.get(f"train_fraction_of_peak_{dtype}"))
    spread = _pass_range(row, dtype)
    return f"{value} {spread}" if value is not None and spread else value


def _passes_sentence(models: dict[str, Any]) -> str:
    passes = max((r.get("passes", 1) for r in models["results"]), default=1)
    if passes == 1:
        return " Each model ran once."
    return (" A neighbour's memory traffic slows the memory-bound models more than the cache-resident matmul, so "
            f"each model ran {passes} times in fresh processes taken in turn: a row is the pass with the median fp32 "
            "fraction, with the range over the passes in brackets.")


def _gpu_section(d: dict[str, Any]) -> list[str]:
    """bench_gpu.py's tables: paper sizes per precision, and CSwin-UNet's head padding."""
    lines: list[str] = []
    pk = d.get("matmul_peak_gflops") or {}
    if d.get("paper"):
        lines += ["## GPU at paper sizes: precision, TF32, torch.compile", "",
                  f"Matmul peaks (8192 x 8192, interleaved): fp32 {pk.get('fp32')} GFLOP/s with TF32 off, TF32 "
                  f"{pk.get('tf32')}, bf16 {pk.get('bf16')}. Each precision's fraction is of its own peak (bf16 rows: "
                  "of the bf16 peak). `tf32` is fp32 with `train.tf32: true` (the default); `fp32` has it off. "
                  "Steps interleaved (`bench_gpu.py`); the compiled row is timed after its compile.", ""]
        rows = [{**r, "inp": "x".join(map(str, r["input"])), "frac": _pct(r["fraction_of_matmul_peak"])}
                for r in d["paper"]]
        lines.append(_table(rows, [("case", "model"), ("inp", "input"), ("batch", "batch"), ("precision", "precision"),
                                   ("samples_per_s", "samples/s"), ("step_s", "s/step"),
                                   ("gflop_per_sample", "GFLOP/sample"), ("frac", "% of peak"),
                                   ("speedup_vs_fp32", "x fp32"), ("compile_s", "compile s")]))
        lines.append("")
    subsections = [  # (key, heading, text, columns)
        ("heads", "CSwin-UNet: attention heads padded for the CUDA flash kernel",
         "Head dim 6, zero-padded to 8 (flash's multiple) or 16 with the scale of 6 kept (the same function): "
         "speed-up of the training step over unpadded (> 1 helps).",
         [("batch", "batch"), ("side", "side (voxels)"), ("precision", "precision"), ("unpadded_s", "unpadded s/step"),
          ("pad8_speedup", "pad to 8"), ("pad16_speedup", "pad to 16")]),
        ("syncs", "Host waits on the GPU inside a training step",
         "ms per step (10 steps in a row, interleaved, TF32 on): the host never waiting, waiting twice per step as "
         "the Trainer does (the loss's finiteness check before backward, `float(loss)` after it), and once after "
         "backward.",
         [("case", "case"), ("none_ms", "no wait"), ("two_ms", "two waits"), ("one_ms", "one wait"),
          ("two_over_none", "two / none"), ("one_over_none", "one / none")])]
    for key, heading, text, cols in subsections:
        if d.get(key):
            lines += [f"### {heading}", "", text, "", _table(d[key], cols), ""]
    return lines


def _skips(data: dict[str, Any]) -> str:
    skipped = data.get("skipped") or {}
    return "".join(f"- skipped `{k}`: {v}\n" for k, v in skipped.items())


def _targets(all_data: dict[str, Any]) -> list[str]:
    """The performance targets against what this run measured (rows only for what was measured)."""
    b = all_data.get("benchmarks", {})
    rows: list[dict[str, Any]] = []

    def add(target: str, value: Any, ok: bool | None) -> None:
        rows.append({"target": target, "measured": value, "met": "n/a" if ok is None else ("yes" if ok else "no")})

    from medvit.engine.speed import PROBE_MARGIN

    def auto_dtype(bf16_speedup: float) -> str:  # what `bf16: auto` would use, from the measured step
        return "bf16" if bf16_speedup >= PROBE_MARGIN else "fp32"

    by_model = {r["model"]: r for r in (b.get("models") or {}).get("results", [])}
    for model, need in (("mae_vit_tiny", 0.5), ("vit_tiny", 0.5), ("cswin_unet", 0.3), ("dct_histo_tiny", 0.3)):
        r = by_model.get(model)
        if r:
            # the dtype a study uses: fp32 by default (`train.bf16: false`); with `bf16: auto`, bf16
            # where its step measured faster, judged then against the (higher) bf16 peak
            speedup = r["bf16_train_speedup"]
            both = f"(fp32 {r['train_fraction_of_peak_fp32']:.1%}, bf16 {r['train_fraction_of_peak_bf16']:.1%})"
            for setting, dtype in (("false", "fp32"), ("auto", auto_dtype(speedup))):
                if setting == "auto" and dtype == "fp32":
                    continue  # auto keeps fp32: the row above
                frac = r[f"train_fraction_of_peak_{dtype}"]
                spread = _pass_range(r, dtype)
                passes = f"; median of {r['passes']} passes, {dtype} range {spread}%" if spread else ""
                add(f"{model} training with `bf16: {setting}` >= {need:.0%} of the {dtype} matmul peak (bf16 step "
                    f"x{speedup:.2f})", f"{frac:.1%} {both}{passes}", frac >= need)
    for r in (b.get("scaling") or {}).get("scaling", []):
        # how the fraction grows with the width (one in-process pass each): evidence, not a
        # second verdict on the default width, which the models rows above judge over their passes
        if r["family"] == "cswin_unet" and r["axis"] == "model_size" and r.get("fraction_of_peak_fp32") is not None:
            add(f"cswin_unet at embed_dim {r['value']} (batch {r['batch']}, {r['image_size']}^3) training, fraction "
                "of the fp32 matmul peak (scaling benchmark, one pass; for reference)",
                f"{r['fraction_of_peak_fp32']:.1%}", None)
    for r in (b.get("mae") or {}).get("results", []):
        if r["config"].startswith("vit_small 224") and r["precision"] == auto_dtype(r["bf16_speedup"]):
            add(f"MAE pretraining at the Medical MAE setting (ViT-S/16, 224 px, mask 0.9) >= 50% of the matmul peak "
                f"of the dtype used ({r['precision']}: bf16 step x{r['bf16_speedup']:.2f})",
                f"{r['fraction_of_matmul_peak']:.1%}", r["fraction_of_matmul_peak"] >= 0.5)
    for r in (b.get("gpu") or {}).get("paper", []):
        if r["case"].startswith("mae") and r["precision"] in ("tf32", "bf16"):
            setting = "`bf16: true`" if r["precision"] == "bf16" else "fp32 with the default `tf32: true`"
            add(f"MAE pretraining at the MAE paper setting on the GPU ({r['case']}, batch {r['batch']}) >= 50% of the "
                f"{r['precision']} matmul peak ({setting})",
                f"{r['fraction_of_matmul_peak']:.1%}", r["fraction_of_matmul_peak"] >= 0.5)
    data = b.get("data") or {}
    if data.get("loader_over_model"):
        worst = min(data["loader_over_model"].values())
        add("data loading after the first epoch >= 10x the model's consumption", f"x{worst:.1f} (slowest model)",
            worst >= 10)
    demo = all_data.get("demo") or {}
    if demo.get("wall_s"):
        add("demo study end to end <= 10 min on this machine", f"{demo['wall_s'] / 60:.1f} min", demo["wall_s"] <= 600)
    if demo.get("peak_memory_mib"):
        add("peak memory of the whole demo run <= 4 GiB", f"{demo['peak_memory_mib'] / 1024:.2f} GiB",
            demo["peak_memory_mib"] <= 4096)
    for r in (b.get("peers") or {}).get("results", []):
        add(f"overhead vs {r['peer']} ({r['comparison']}) <= 1.10", f"x{r['overhead_ratio']}",
            r["overhead_ratio"] <= 1.10)
    ingest = b.get("ingest") or {}
    largest = max(ingest.get("results", []), key=lambda r: (r["files"], r["files_per_s"]), default=None)
    if largest:
        add(f"ingest >= 500 files/s ({largest['files']} files, workers {largest['workers_setting']})",
            f"{largest['files_per_s']} files/s", largest["files_per_s"] >= 500)
    for w, g in (ingest.get("memory_growth") or {}).items():
        add(f"ingest memory flat: {g['files_ratio']}x the files -> < 1.5x the peak ({w} process(es))",
            f"x{g['peak_memory_ratio']}", g["peak_memory_ratio"] < 1.5)
    if not rows:
        return []
    return ["## Targets", "", _table(rows, [("target", "target"), ("measured", "measured"), ("met", "met")])]


def kept_sections(report: Path) -> str:
    """Sections that scripts outside the suite write into the report between their own
    ``<!-- NAME: start -->`` and ``<!-- NAME: end -->`` markers (bench_scale.py's study-scale
    table: an hour's run of its own), carried over when the report is rebuilt."""
    text = report.read_text() if report.is_file() else ""
    spans = re.finditer(r"^<!-- ([\w-]+): start -->\n.*?^<!-- \1: end -->\n", text, re.S | re.M)
    return "".join("\n" + m.group(0) for m in spans)


def render(all_data: dict[str, Any]) -> str:
    m = all_data.get("machine") or {}
    lines = ["# Benchmark results", "",
             f"Generated by `python benchmarks/run_all.py{' --quick' if all_data['quick'] else ''}` on "
             f"{all_data['created']}. Raw numbers: `{all_data.get('results_dir', 'benchmarks/results')}/"
             f"all_{all_data['device_type']}.json` and one JSON per benchmark beside it.", "",
             "## Machine", "",
             f"- CPU: {m.get('cpu')} ({m.get('cores')} cores usable, {m.get('torch_threads')} torch threads, "
             f"native bf16: {m.get('cpu_native_bf16')})",
             f"- GPU: {m.get('gpu') or 'none'}; device used: {m.get('device')}",
             f"- torch {m.get('torch')}, Python {m.get('python')}; 1-minute load average at start: "
             f"{m.get('load_average_1min')}", ""]
    if all_data.get("note"):
        lines += [f"> {all_data['note']}", ""]
    st = all_data["status"]
    lines += ["Benchmarks run: " + ", ".join(
        f"{k} ({'ok' if v['ok'] else 'FAILED'}, " + (f"{v['seconds']} s)" if v.get("seconds") is not None
                                                    else f"{v.get('reason')})") for k, v in st.items()), ""]
    for k, v in st.items():
        if not v["ok"]:
            kept = " (the rows it finished are shown)" if v.get("partial") else ""
            lines.append(f"- `{k}` did not finish: {v['reason']}{kept}")
    b = all_data.get("benchmarks", {})
    if "models" in b:
        d = b["models"]
        pk = d.get("matmul_peak_gflops", {})
        import torch

        from medvit.engine.speed import default_matmul_size

        n = default_matmul_size(torch.device(all_data.get("device_type", "cpu")))
        lines += ["## Models: throughput, fraction of the matmul peak, memory", "",
                  f"Matmul peak ({n} x {n}, best of 5 at the start): fp32 "
                  f"{pk.get('fp32')} GFLOP/s, bf16 {pk.get('bf16')} "
                  "GFLOP/s. Fractions are training FLOPs (forward + backward, attention included) per second over the "
                  "matmul rate timed in the same interleaved rounds as that model's fp32 and bf16 steps (the `peak` "
                  "columns, medians), so a slow spell of the machine moves both alike." + _passes_sentence(d), ""]
        rows = [{**r, "f32": _pct_passes(r, "fp32"), "fb16": _pct_passes(r, "bf16"),
                 "pk32": (r.get("matmul_peak_gflops") or {}).get("fp32"),
                 "pk16": (r.get("matmul_peak_gflops") or {}).get("bf16"),
                 "inp": "x".join(map(str, r["input"]))} for r in d["results"]]
        lines.append(_table(rows, [("model", "model"), ("inp", "input"), ("batch", "batch"),
                                   ("train_samples_per_s_fp32", "train/s fp32"), ("train_samples_per_s_bf16",
                                                                                  "train/s bf16"),
                                   ("pk32", "peak fp32 GFLOP/s"), ("f32", "% peak fp32"),
                                   ("pk16", "peak bf16 GFLOP/s"), ("fb16", "% peak bf16"),
                                   ("infer_samples_per_s_fp32", "infer/s fp32"), ("infer_samples_per_s_bf16",
                                                                                  "infer/s bf16"),
                                   ("bf16_train_speedup", "bf16 speed-up"), ("peak_train_memory_mib",
                                                                             "peak MiB (train)"),
                                   ("activations_mib", "activations MiB")]))
        lines.append(_skips(d))
        from _util import ZOO

        missing = [n for n in ZOO if n not in {r["model"] for r in d["results"]} and n not in (d.get("skipped") or {})]
        if missing:
            lines.append(f"- not reached before the time limit: {', '.join(missing)}\n")
    if "switches" in b:
        d = b["switches"]
        pr = d.get("bf16_probe", {})
        lines += ["## Speed switches: the gain each brings", "",
                  f"bf16 probe (what `bf16: auto` measures): fp32 {pr.get('fp32_gflops')} GFLOP/s, bf16 "
                  f"{pr.get('bf16_gflops')} GFLOP/s (x{pr.get('speedup')}) -> auto chooses "
                  f"**{'bf16' if pr.get('auto_chooses_bf16') else 'fp32'}** here. Per-model bf16 gains are in the "
                  "table above.",
                  "",
                  "Speed-up = seconds per training step without / with the switch (> 1 helps), interleaved medians; "
                  "`retain_freed_memory` is process-wide, so its settings run in child processes taken in turn "
                  "(medians over the processes) and its rows give the page faults per step.", ""]
        lines.append(_table(d["results"], [("switch", "switch"), ("model", "model"), ("batch", "batch"),
                                           ("off_s", "off s/step"), ("on_s", "on s/step"), ("speedup", "speed-up"),
                                           ("compile_seconds", "compile s"), ("break_even_steps", "break-even steps"),
                                           ("page_faults_per_step_off", "page faults/step off"),
                                           ("page_faults_per_step_on", "on")]))
        lines.append(_skips(d))
    if "data" in b:
        d = b["data"]
        ds = d.get("dataset", {})
        lines += ["## Data loading vs the model's consumption", "",
                  f"{ds.get('samples')} {ds.get('modality')} images at {ds.get('image_size')} px, batch "
                  f"{ds.get('batch')}; "
                  f"decode + percentile scaling + resize (cached) + flips (per epoch). `auto` workers here: "
                  f"{d.get('auto_num_workers')}.", ""]
        lines.append(_table(d["loading"], [("workers", "workers"), ("cache", "cache"),
                                           ("cache_fill_samples_per_s", "cache fill/s"),
                                           ("first_epoch_samples_per_s", "epoch 1 samples/s"),
                                           ("later_epoch_samples_per_s", "later epochs samples/s")]))
        cons = d.get("model_train_samples_per_s", {})
        lines += ["", "Model training consumption at this size: " + ", ".join(
            f"{k} {v}/s (loader/model x{d['loader_over_model'][k]})" for k, v in cons.items()), ""]
    if "peers" in b:
        d = b["peers"]
        lines += ["## Side by side with the libraries' own loops", "",
                  "Overhead = our time / peer time (1.0: none; < 1: ours faster), interleaved runs. The peer "
                  "writes the checkpoint its library's own script writes after each epoch (timm's train.py: model "
                  "and optimizer; MONAI's tutorials: the model); `bare` is the same loop writing nothing.", ""]
        lines.append(_table(d["results"], [("comparison", "comparison"), ("peer", "peer"), ("samples", "samples"),
                                           ("batch", "batch"), ("epochs", "epochs"), ("ours_s", "ours s"),
                                           ("peer_s", "peer s"), ("overhead_ratio", "overhead"),
                                           ("bare_s", "bare s"), ("overhead_vs_bare", "vs bare")]))
        lines.append(_skips(d))
    if "mae" in b:
        d = b["mae"]
        lines += ["## MAE pretraining at larger inputs", "",
                  "Training step of the MAE (mask ratio 0.9) in fp32 and bf16 autocast, timed interleaved with the "
                  "matmul peak (`bench_mae.py`).", ""]
        lines.append(_table(d["results"], [("config", "config"), ("batch", "batch"), ("precision", "precision"),
                                           ("images_per_s", "images/s"), ("gflop_per_image", "GFLOP/image"),
                                           ("achieved_gflops", "GFLOP/s"), ("matmul_peak_gflops", "peak GFLOP/s"),
                                           ("fraction_of_matmul_peak", "fraction of peak"),
                                           ("bf16_speedup", "bf16 step speed-up")]))
        lines.append("")
    if "scaling" in b:
        d = b["scaling"]
        lines += ["## Scaling: image size, patients, model size", ""]
        rows = [{**r, "t": r.get("step_s", r.get("epoch_s")), "frac": _pct(r.get("fraction_of_peak_fp32")),
                 "unit": "s/step" if "step_s" in r else "s/epoch"} for r in d["scaling"]]
        lines.append(_table(rows, [("family", "model"), ("axis", "grows with"), ("value", "value"),
                                   ("image_size", "at image size"), ("batch", "batch"), ("params", "params"),
                                   ("t", "time"), ("unit", "unit"), ("gflop_per_step", "GFLOP/step"),
                                   ("frac", "% fp32 peak")]))
        lines.append("\nModel-size rows: the step's median in rounds interleaved with the matmul peak, and its "
                     "fraction of that peak (fp32).\n")
        lines += ["", "### Memory of paper-size models (one training step, AdamW)", ""]
        mem = [{**r, "inp": "x".join(map(str, r["input"]))} for r in d["memory"]]
        lines.append(_table(mem, [("model", "model"), ("inp", "input"), ("batch", "batch"),
                                  ("activation_checkpointing", "activation checkpointing"),
                                  ("blocks_checkpointed", "blocks"), ("peak_mib", "peak MiB (step)"),
                                  ("activations_mib", "activations MiB"), ("method", "measured by")]))
        lines.append(_skips(d))
    if "ingest" in b:
        d = b["ingest"]
        lines += ["## Ingest at hospital-export scale", "",
                  "`medvit ingest` on a generated export (CT and MR series of 40 slices, 2 radiographs per "
                  "patient, copies of shipped and synthetic DICOM files with their own tags; 3 non-image files). "
                  "Each run in a fresh process; total peak = main process + workers x the largest worker (an upper "
                  "bound).", ""]
        lines.append(_table(d["results"], [("files", "files"), ("patients", "patients"),
                                           ("workers_setting", "workers"), ("workers", "processes"),
                                           ("seconds", "s"), ("files_per_s", "files/s"), ("samples", "samples"),
                                           ("quarantined", "quarantined"), ("peak_rss_mib", "main peak MiB"),
                                           ("worker_peak_rss_mib", "worker peak MiB"),
                                           ("total_peak_mib", "total peak MiB")]))
        for w, g in (d.get("memory_growth") or {}).items():
            lines.append(f"- {w} process(es): {g['files_ratio']}x the files -> {g['peak_memory_ratio']}x the total "
                         "peak memory")
        lines.append("")
    if "gpu" in b:
        lines += _gpu_section(b["gpu"])
    demo = all_data.get("demo") or {}
    if demo:
        how = ("`--run-demo`: `make demo` from an empty results folder" if "log" not in demo
               else f"the newest complete Snakemake log of the study ({demo.get('log')}, {demo.get('jobs')} jobs)")
        lines += ["## Demo study end to end", "",
                  f"Wall time {demo['wall_s'] / 60:.1f} min" +
                  (f", peak memory of the whole run {demo['peak_memory_mib'] / 1024:.2f} GiB ({demo['memory_method']})"
                   if demo.get("peak_memory_mib") else "") + f"; from {how}.", ""]
    lines += _targets(all_data)
    lines += ["## Demo study: wall time per rule (Snakemake `benchmark:`)", ""]
    for study, rows in (all_data.get("rules") or {}).items():
        lines += [f"`results/{study}/benchmarks/` ({sum(r['jobs'] for r in rows)} jobs, "
                  f"{round(sum(r['total_s'] for r in rows), 1)} s of job time):", ""]
        lines.append(_table(rows, [("rule", "rule"), ("jobs", "jobs"), ("total_s", "total s"), ("max_s",
                                                                                                "slowest job s"),
                                   ("max_rss_mib", "max RSS MiB")]))
    if not all_data.get("rules"):
        lines.append("_No Snakemake benchmark files found: run `make demo` (or `--run-demo`) first._\n")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(SUITE) + " (default: all; "
                   + ", ".join(sorted(CUDA_ONLY)) + " only on CUDA)")
    p.add_argument("--results", default=str(HERE / "results"),
                   help="folder of the JSON files (default: benchmarks/results)")
    p.add_argument("--report", default=str(HERE / "RESULTS.md"),
                   help="the Markdown report (default: benchmarks/RESULTS.md)")
    p.add_argument("--study", action="append", default=None, help="study folder(s) under results/ (default: demo)")
    p.add_argument("--run-demo", action="store_true", help="run `make demo` first to refresh the per-rule times")
    p.add_argument("--note", default="", help="a line printed under the machine (e.g. 'taken under load')")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md from the JSON files only")
    args = p.parse_args()
    import torch
    from _util import device_of, machine, write_json

    from medvit.provenance import now_iso

    # --report-only renders JSON files: a GPU run's report can be rebuilt on a machine without one
    device = torch.device(args.device) if args.report_only and args.device != "auto" else device_of(args.device)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    default = [n for n in SUITE if device.type == "cuda" or n not in CUDA_ONLY]
    names = [n for n in (args.only.split(",") if args.only else default) if n]
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        sys.exit(f"error: unknown benchmark(s) {unknown}; choose from {list(SUITE)}")
    studies = args.study or ["demo"]
    # --run-demo measures wall time and the whole run's peak memory; otherwise the wall time of
    # the newest complete run comes from Snakemake's log, and memory from the last --run-demo.
    if args.run_demo:
        demo = {**run_demo(ROOT / "results" / "demo"), "measured": now_iso()}
        write_json(results / "demo_run.json", demo)
    else:
        demo = demo_wall_from_log(studies[0])
        last = results / "demo_run.json"
        if demo is not None and last.exists():
            measured = json.loads(last.read_text())
            demo["peak_memory_mib"] = measured.get("peak_memory_mib")
            demo["memory_method"] = f"the last --run-demo ({measured.get('measured')})"
    if args.report_only:
        status = {n: {"ok": (results / f"{n}.json").exists(), "seconds": 0.0, "reason": "no JSON"} for n in names}
        for n in names:
            if status[n]["ok"]:
                created = json.loads((results / f"{n}.json").read_text()).get("created", "?")
                status[n]["reason"], status[n]["seconds"] = f"from the JSON of {created}", None
    else:
        status = run_suite(names, args.device, args.quick, results)
    # a benchmark stopped by its time limit keeps what it wrote before (bench_models saves per model)
    benchmarks = {n: json.loads((results / f"{n}.json").read_text()) for n in names if (results / f"{n}.json").exists()}
    # --report-only: the machine (and its load average) as the first benchmark recorded it
    # when it ran, not as it is while rendering
    recorded = [d["machine"] for d in benchmarks.values() if isinstance(d.get("machine"), dict)]
    mach = recorded[0] if args.report_only and recorded else machine(device)
    try:
        shown = results.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(results)
    all_data = {"created": now_iso(), "quick": args.quick, "device_type": device.type, "machine": mach,
                "results_dir": shown,
                "note": args.note, "status": status, "benchmarks": benchmarks,
                "rules": {s: rule_times(ROOT / "results" / s) for s in studies if (ROOT / "results" / s).is_dir()},
                "torch": torch.__version__, "demo": demo}
    write_json(results / f"all_{device.type}.json", all_data)
    from medvit.fileio import atomic_write_text

    atomic_write_text(Path(args.report), render(all_data) + kept_sections(Path(args.report)))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
