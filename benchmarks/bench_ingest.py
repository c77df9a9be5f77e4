"""Ingest at hospital-export scale: `medvit ingest` on a generated folder of DICOM files.

The folder mimics an export: patients, each with one study of a CT series and an MR series
(copies of pydicom's shipped CT_small.dcm and MR_small.dcm with per-file PatientID,
PatientName, UIDs, InstanceNumber and slice position, so every series becomes one 3D sample)
and two radiographs (copies of a synthetic DX file written by `medvit synth xray`), plus
a few non-image files that must be quarantined. Each size is ingested in a fresh process;
reported: files per second (wall), peak memory (VmHWM) of the ingest process and of its
largest worker, their total (main + workers x largest worker: an upper bound), and the ratio
of that total between the largest and the smallest size (flat memory: < 1.5 for 10x files).

    python benchmarks/bench_ingest.py [--quick] [--sizes 1000,10000] [--workers auto]

Writes benchmarks/results/ingest_cpu.json (``--out`` to change).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERIES = 40          # slices per CT or MR series
XRAYS = 2            # radiographs per patient
FILES_PER_PATIENT = 2 * SERIES + XRAYS


def make_export(folder: Path, n_files: int) -> dict:
    """Write about ``n_files`` DICOM files (whole patients) and 3 non-image files under ``folder``."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medvit.data.synth import synthesize

    xray_dir = folder.parent / f"_xray_source_{folder.name}"
    synthesize("xray", 6, xray_dir, seed=0, image_size=64)
    xray_files = sorted(xray_dir.rglob("*.dcm"))
    if not xray_files:
        raise RuntimeError("medvit synth xray wrote no DICOM file to copy")
    sources = {"CT": pydicom.dcmread(get_testdata_file("CT_small.dcm")),
               "MR": pydicom.dcmread(get_testdata_file("MR_small.dcm")),
               "DX": pydicom.dcmread(xray_files[0])}
    rng = np.random.default_rng(0)
    n_patients = max(1, round(n_files / FILES_PER_PATIENT))
    written = 0
    for p in range(n_patients):
        pid, study = f"MRN{100000 + p}", generate_uid()
        pdir = folder / f"export_{p:05d}"  # the folder name carries no identifier
        name = f"DOE^PATIENT{p}"
        plan = [("CT", SERIES), ("MR", SERIES), ("DX", XRAYS)]
        for modality, n in plan:
            series = generate_uid()
            sdir = pdir / modality
            sdir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ds = sources[modality].copy()
                ds.PatientID, ds.PatientName, ds.StudyInstanceUID = pid, name, study
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                if modality == "DX":  # separate radiographs: each its own series
                    ds.SeriesInstanceUID = generate_uid()
                else:
                    ds.SeriesInstanceUID = series
                    ds.InstanceNumber = i + 1
                    ds.ImagePositionPatient = [0.0, 0.0, float(i) * float(getattr(ds, "SliceThickness", 1) or 1)]
                    ds.StudyDescription = str(rng.choice(["HEAD", "CHEST", "ABDOMEN"]))
                ds.save_as(sdir / f"IM{i:05d}", enforce_file_format=True)
                written += 1
    for i, text in enumerate(["report\n", "DICOMDIR placeholder\n", "notes\n"]):
        (folder / f"readme_{i}.txt").write_text(text)
    shutil.rmtree(xray_dir, ignore_errors=True)
    return {"dicom_files": written, "patients": n_patients, "other_files": 3}


# Peak memory from /proc/self/status (VmHWM): ru_maxrss of an exec'd child on Linux still
# counts the forked copy of the parent (the benchmark process, with torch loaded).
INGEST_CHILD = """
import json, os, resource, sys, time
from medvit.data.ingest import ingest
def hwm_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
t0 = time.perf_counter()
result = ingest(sys.argv[1], sys.argv[2], key="benchmark-key-0123456789", workers=sys.argv[3])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "n_files": result.n_files, "n_samples": result.n_samples,
                  "n_quarantined": result.n_quarantined, "workers": result.workers,
                  "max_rss_mib": hwm_kib() / 1024,
                  "worker_max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def ingest_once(src: Path, out: Path, workers: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", INGEST_CHILD, str(src), str(out / "manifest.csv"), workers],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"ingest failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = U.parser(__doc__)
    p.add_argument("--sizes", default=None, help="comma-separated file counts (default 1000,10000; quick 250,2500)")
    p.add_argument("--workers", default="auto,1", help="comma-separated ingest worker settings to compare "
                   "(memory growth is compared between sizes run with the same number of processes)")
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("250,2500" if args.quick else "1000,10000")).split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="medvit-ingest-") as tmp:
        for n in sizes:
            src = Path(tmp) / f"export_{n}"
            t0 = time.perf_counter()
            made = make_export(src, n)
            gen_s = time.perf_counter() - t0
            for workers in args.workers.split(","):
                r = ingest_once(src, Path(tmp) / f"out_{n}_{workers}", workers)
                files = made["dicom_files"] + made["other_files"]
                row = {"files": files, "patients": made["patients"], "workers_setting": workers,
                       "workers": r["workers"], "seconds": round(r["seconds"], 2),
                       "files_per_s": round(files / r["seconds"], 1), "samples": r["n_samples"],
                       "quarantined": r["n_quarantined"], "peak_rss_mib": round(r["max_rss_mib"], 1),
                       "worker_peak_rss_mib": round(r["worker_max_rss_mib"], 1),
                       # all processes at their peaks at once: an upper bound of the ingest's memory
                       "total_peak_mib": round(r["max_rss_mib"] + (r["workers"] * r["worker_max_rss_mib"]
                                                                   if r["workers"] > 1 else 0), 1),
                       "generate_s": round(gen_s, 1)}
                rows.append(row)
                print(f"{files:6d} files, workers {workers} ({r['workers']}): {row['seconds']} s, "
                      f"{row['files_per_s']} files/s, {row['samples']} samples, {row['quarantined']} quarantined, "
                      f"peak {row['total_peak_mib']} MiB (all processes)", flush=True)
            shutil.rmtree(src, ignore_errors=True)
    ratios = {}
    for w in sorted({r["workers"] for r in rows}):  # compare sizes at the same number of processes
        sel = [r for r in rows if r["workers"] == w]
        if len(sel) >= 2:
            small, large = min(sel, key=lambda r: r["files"]), max(sel, key=lambda r: r["files"])
            ratios[str(w)] = {"files_ratio": round(large["files"] / small["files"], 2),
                         "peak_memory_ratio": round(large["total_peak_mib"] / small["total_peak_mib"], 3)}
    device = U.device_of("cpu")
    out = U.out_path(args, "ingest", device)
    U.write_json(out, {**U.header(device, args.quick), "results": rows, "memory_growth": ratios,
                       "max_rss_self_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


if __name__ == "__main__":
    main()
