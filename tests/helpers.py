"""Helpers shared by the test modules (fixtures live in conftest.py): running the workflow,
reading its output, comparing result files and rendering a report in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _snakemake_env(extra: dict | None = None) -> dict:
    return dict(os.environ, **(extra or {}), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _snakemake_command(workdir: Path, study: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
            "--configfile", str(study), *args]


def run_snakemake(workdir: Path, study: Path, *args: str, timeout: int = 900, env: dict | None = None) -> str:
    """Run this repository's workflow on ``study`` in ``workdir`` (2 cores, this venv's
    `medvit` first on PATH); assert it succeeded, showing the failed jobs' own logs if not."""
    proc = subprocess.run(_snakemake_command(workdir, study, *args), capture_output=True, text=True,
                          timeout=timeout, env=_snakemake_env(env))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:] + failed_job_logs(workdir, output)
    return output


def failed_job_logs(workdir: Path, output: str, lines: int = 40) -> str:
    """The last ``lines`` lines of each failed job's own log (Snakemake's `Error in rule`
    blocks name it): the job's traceback, which Snakemake's output does not show. Empty when
    no failed job names a log."""
    parts = []
    for block in output.split("Error in rule")[1:]:
        match = re.search(r"^\s*log: (\S+)", block[:3000], re.M)
        if not match:
            continue
        path = Path(match.group(1))
        path = path if path.is_absolute() else workdir / path
        text = path.read_text(errors="replace") if path.is_file() else "(no log file)"
        parts.append(f"\n--- {path} (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:]))
    return "".join(dict.fromkeys(parts))


def job_counts(output: str) -> dict[str, int]:
    """The first `Job stats:` table of a snakemake run: rule -> number of jobs."""
    assert "Job stats:" in output, f"no jobs in the Snakemake output:\n{output[-4000:]}"
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def start_snakemake(workdir: Path, study: Path, *args: str) -> subprocess.Popen:
    """The same Snakemake run as :func:`run_snakemake`, started in its own session (output on
    its stdout) for a test that interrupts it."""
    return subprocess.Popen(_snakemake_command(workdir, study, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_snakemake_env(), start_new_session=True)


# Fields that measure time or name the machine/run rather than the result.
_VOLATILE = ("seconds", "time", "created", "date", "duration", "latency", "host", "pid", "provenance", "path")


def strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if not any(w in k.lower() for w in _VOLATILE)}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def dicom_dataset(sop_class: str = CTImageStorage) -> Dataset:
    """An empty image dataset of ``sop_class`` (default CT) with its file meta (explicit VR
    little endian) and a fresh SOP instance UID: the start of every DICOM file the tests write."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target.src)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const p = document.createElement('pre');
  p.id = 'probe';
  p.textContent = JSON.stringify({images: imgs.length, broken: bad, errors: window.__errors});
  document.body.appendChild(p);
});
</script>"""


def render_in_chromium(html: Path, tmp_path: Path) -> Path:
    """Open ``html`` in headless Chromium: assert every image loads and the page raises no
    error or console error; return a screenshot (kept in $MEDVIT_SCREENSHOT_DIR if set)."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("MEDVIT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (MEDVIT_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does)")
    # the report has no script; a copy gets a probe that records image loads and page errors
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("<head>", "<head>" + _PROBE, 1))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    state = json.loads(found.group(1).replace("&quot;", '"'))
    assert state["images"] >= 1 and state["broken"] == 0 and state["errors"] == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ":ERROR:" in line.upper()]
    assert console == []
    shot = tmp_path / f"{html.parent.parent.name}_report.png"
    subprocess.run([*flags, "--window-size=1400,2000", f"--screenshot={shot}", html.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("MEDVIT_SCREENSHOT_DIR")
    if keep:  # for a person to look at
        shutil.copy(shot, Path(keep) / shot.name)
    return shot
