"""The paper-scale example studies (workflows/studies/examples/): each validates, chooses the
disk cache at its size, and dry-runs through the SLURM profile with its own workflow profile,
each job asking for the GPU, cores, memory and time its profile gives. The user's data is not
needed: a manifest of the paper's size (rows only, no image files) stands in for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvit.config import MEMORY_CACHE_BYTES, estimated_image_bytes, load_study

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLES = REPO / "workflows" / "studies" / "examples"
CXR14_FINDINGS = ["Atelectasis", "Effusion", "Pleural_Thickening", ""]


def _cxr14(i: int) -> str:
    return f"cxr{i // 4},images/{i:08d}.png,{CXR14_FINDINGS[i % 4]},{'test' if i % 5 == 0 else 'train'}"


def _bpmri(i: int) -> str:
    case = f"cases/{i:05d}"
    files = ",".join(f"{case}_{part}.nii.gz" for part in ("t2w", "adc", "hbv", "mask"))
    return f"pc{i},{files},{'cspca' if i % 3 else 'none'}"


def _breakhis(i: int) -> str:
    return f"bh{i % 82},img/{i:05d}.png,{'malignant' if i % 82 < 58 else 'benign'},{'ductal' if i % 2 else 'adenosis'}"


# example -> (manifest path in the study, header, row, rows at the paper's size)
FAKE_DATA = {
    "chestxray14_mae": ("data_manifests/chestxray14/manifest.csv", "patient_id,image,labels,split", _cxr14, 112_120),
    "bpmri_cswin": ("data_manifests/bpmri/manifest.csv", "patient_id,image_t2w,image_adc,image_hbv,mask,label",
                    _bpmri, 1500),
    "breakhis_histo": ("data_manifests/breakhis/manifest.csv", "patient_id,image,label,subtype", _breakhis, 7909),
}
# example -> training rule whose SLURM request is checked, and the request
TRAINING_JOB = {"chestxray14_mae": ("train", {"mem_mb": "64000", "runtime": "720", "gpu": "1"}),
                "bpmri_cswin": ("prostate_fold", {"mem_mb": "64000", "runtime": "1440", "gpu": "1"}),
                "breakhis_histo": ("train_fold", {"mem_mb": "32000", "runtime": "240", "gpu": "1"})}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()) == sorted(FAKE_DATA)


def _workdir(tmp_path: Path, name: str) -> Path:
    path, header, row, n = FAKE_DATA[name]
    manifest = tmp_path / path
    manifest.parent.mkdir(parents=True)
    manifest.write_text(header + "\n" + "\n".join(row(i) for i in range(n)) + "\n")
    return tmp_path


@pytest.mark.parametrize("name", sorted(FAKE_DATA))
def test_example_validates_and_needs_the_disk_cache(tmp_path, monkeypatch, name):
    monkeypatch.chdir(_workdir(tmp_path, name))
    study = load_study(EXAMPLES / name / "study.yaml")
    task = next(iter(study["tasks"]))
    assert study["cache"] == "disk" and study["device"] == "cuda"
    # what `cache: auto` would choose at this size too
    assert estimated_image_bytes(study, task) > MEMORY_CACHE_BYTES


def _job_block(out: str, rule: str) -> str:
    block = out[out.index(f"rule {rule}:"):]
    return block[:block.index("Shell command")]


@pytest.mark.parametrize("name", sorted(FAKE_DATA))
def test_example_dry_runs_on_slurm_with_its_resources(tmp_path, name):
    work = _workdir(tmp_path, name)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                           "--profile", str(REPO / "workflows/profiles/slurm"),
                           "--workflow-profile", str(EXAMPLES / name / "slurm"),
                           "--configfile", str(EXAMPLES / name / "study.yaml"),
                           # a dry run caps threads at the local cores; a node has 16
                           "--cores", "16"],
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out[out.index("Job stats:"):], re.M))
    assert counts.get("preprocess") == "1", counts  # the cache is built once for every job of the study
    rule, wanted = TRAINING_JOB[name]
    job = _job_block(out, rule)
    assert "cache/" in re.search(r"input: (.*)", job).group(1)  # training waits for the cache
    assert re.search(r"threads: 16\b", job), job
    resources = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", job).group(1).split(", "))
    assert {k: resources.get(k) for k in wanted} == wanted
    assert resources.get("slurm_extra") == "--signal=TERM@300"
    study = yaml.safe_load((EXAMPLES / name / "study.yaml").read_text())
    assert f"results/{study['study']}/" in out
