"""The Snakemake workflow: DAG of the shipped studies, lint, config errors before any job,
separate studies, and which jobs rerun after a study edit.

Snakemake runs in a temporary working directory (``--directory``) so these tests never touch
the repository's results/ or .snakemake/. Jobs are executed only with a small fake ``medvit``
(written below) that creates each stage's declared outputs: the real stages are tested in their
own files, and the full pipeline end to end by the demo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, job_counts

SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
DEMO = REPO / "workflows" / "studies" / "demo.yaml"
PNEUMONIA = REPO / "workflows" / "studies" / "pneumonia.yaml"
XRAY_MAE = REPO / "workflows" / "studies" / "xray_mae.yaml"

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")

FAKE_MEDVIT = """\
#!{python}
# Fake `medvit`: writes the outputs each stage declares and logs its arguments.
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_MEDVIT_CALLS"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
out = Path(args[args.index("--out") + 1])
if args[0] in ("synth", "import"):
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").write_text("patient_id,image\\n")
elif args[0] == "train":
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "model.json").write_text("{{}}")
elif args[0] == "pretrain":
    out.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.safetensors", "encoder.json", "reconstructions.png"):
        (out / name).write_text(name)
elif args[0] == "compare":
    out.mkdir(parents=True, exist_ok=True)
    for name in ("comparison.json", "accuracy_vs_flops.png"):
        (out / name).write_text(name)
else:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(args[0])
    if args[0] == "report":
        (out.parent / "figures").mkdir(exist_ok=True)
print("fake", args[0])
"""


def snakemake(workdir: Path, *args: str, path_first: Path | None = None, env: dict | None = None):
    environ = dict(os.environ, **(env or {}))
    environ["PATH"] = os.pathsep.join(str(p) for p in (path_first, BIN) if p) + os.pathsep + environ.get("PATH", "")
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=environ)
    return proc.returncode, proc.stdout + proc.stderr


def fake_runner(workdir: Path, study: Path):
    """``run(*args)``: snakemake on ``study`` in ``workdir`` with the fake ``medvit`` first on
    PATH; the fake logs each call to ``workdir/calls.jsonl``."""
    fake_bin = workdir / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "medvit").write_text(FAKE_MEDVIT.format(python=sys.executable))
    (fake_bin / "medvit").chmod(0o755)
    env = {"FAKE_MEDVIT_CALLS": str(workdir / "calls.jsonl")}

    def run(*args: str):
        return snakemake(workdir, "--cores", "2", "--configfile", str(study), *args, path_first=fake_bin, env=env)

    return run


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_demo_dry_run_lists_every_stage(tmp_path):
    rc, out = snakemake(tmp_path, "-n", "--cores", "2", "-p", "--configfile", str(DEMO))
    assert rc == 0, out
    demo = yaml.safe_load(DEMO.read_text())
    n_tasks = len(demo["tasks"])
    n_models = sum(len(t.get("models", [1])) for t in demo["tasks"].values())
    n_mae = sum(any(m.endswith("_mae") for m in t.get("models", [])) for t in demo["tasks"].values())
    prostate = demo["tasks"]["prostate"]
    cv_models = len(prostate["models"])
    jobs = job_counts(out)
    # the generic train/predict rules serve every task but the cross-validated one
    expected = {"synth": n_tasks, "split": n_tasks, "train": n_models - cv_models, "predict": n_models - cv_models,
                "prostate_fold": cv_models * prostate["folds"], "prostate_cv_pool": cv_models, "report": 1, "all": 1,
                **({"pretrain": n_mae} if n_mae else {})}
    assert {k: jobs.get(k) for k in expected} == expected
    assert jobs["evaluate"] >= n_models  # one per model, plus the stages evaluated the same way
    # each task's own stages are in the run
    assert {"adapt_xray", "adapt_compare_xray", "brain_detect", "brain_ptp", "brain_distill", "brain_cascade",
            "prostate_ssl", "prostate_cv_summary", "compare"} <= set(jobs)
    # every job is one `medvit <stage>` call that logs to results/demo/logs/
    shell = [line for line in out.splitlines() if line.startswith("Shell command: medvit")]
    assert len(shell) == sum(job_counts(out).values()) - 1
    assert all(re.search(r"> results/demo/logs/\w+/\w+\.log 2>&1$", line) for line in shell), shell
    assert f"--config {DEMO}" in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_profile_dry_run_sizes_model_jobs_to_the_machine(tmp_path):
    local = str(REPO / "workflows" / "profiles" / "local")
    rc, out = snakemake(tmp_path, "-n", "--profile", local, "--configfile", str(DEMO), "--cores", "8")
    assert rc == 0, out
    model_jobs = [j for j in jobs(out) if j["rule"] in ("train", "predict", "pretrain")]
    data_jobs = [j for j in jobs(out) if j["rule"] in ("synth", "split", "evaluate")]
    assert model_jobs and data_jobs
    assert all("gpu=0" in j["resources"] for j in data_jobs)
    if not any(Path(f"/dev/nvidia{i}").exists() for i in range(16)):
        # device auto on a CPU-only machine: no GPU to wait for, a quarter of the cores each
        assert all("gpu=0" in j["resources"] and j.get("threads") == "2" for j in model_jobs)
    # a study that names CUDA asks the scheduler for a GPU and 4 threads per model job
    cuda = write_study(tmp_path / "cuda.yaml", {**yaml.safe_load(DEMO.read_text()), "device": "cuda"})
    rc, out = snakemake(tmp_path, "-n", "--profile", local, "--configfile", str(cuda), "--cores", "8")
    assert rc == 0, out
    model_jobs = [j for j in jobs(out) if j["rule"] in ("train", "predict", "pretrain")]
    assert model_jobs and all("gpu=1" in j["resources"] and j.get("threads") == "4" for j in model_jobs)


def test_hidden_gpus_count_as_none(monkeypatch):
    from medvit.system import host_has_nvidia_gpu

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert host_has_nvidia_gpu() is False


def test_lint_is_clean(tmp_path):
    rc, out = snakemake(tmp_path, "--lint", "--cores", "1", "--configfile", str(DEMO))
    assert rc == 0, out
    assert "Lints for" not in out and "Congratulations" in out


def jobs(output: str) -> list[dict[str, str]]:
    """The job blocks of a dry run (`rule X:` then indented `key: value` lines)."""
    blocks = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m.group(2), re.M))
        blocks.append({"rule": m.group(1), **fields})
    return blocks


def test_xray_mae_dry_run_pretrains_once_before_the_mae_model(tmp_path):
    rc, out = snakemake(tmp_path, "-n", "--cores", "2", "-p", "--configfile", str(XRAY_MAE))
    assert rc == 0, out
    assert job_counts(out) == {"synth": 1, "split": 1, "pretrain": 1, "train": 3, "predict": 3, "evaluate": 3,
                               "report": 1, "all": 1}
    encoder = "results/xray_mae/xray/mae/encoder.safetensors"
    pretrain = [j for j in jobs(out) if j["rule"] == "pretrain"]
    assert len(pretrain) == 1 and encoder in pretrain[0]["output"]
    assert pretrain[0]["input"] == "results/xray_mae/xray/split.csv"   # training split only, no other data
    trains = {j["wildcards"]: j for j in jobs(out) if j["rule"] == "train"}
    mae_job = trains["task=xray, model=vit_tiny_mae"]
    assert encoder in mae_job["input"] and encoder in mae_job["reason"]   # waits for the pretraining
    assert encoder not in trains["task=xray, model=vit_tiny"]["input"]    # from scratch
    assert encoder not in trains["task=xray, model=densenet121"]["input"]
    assert "medvit pretrain --config " in out and " --out results/xray_mae/xray/mae" in out


def test_xray_mae_lint_is_clean(tmp_path):
    rc, out = snakemake(tmp_path, "--lint", "--cores", "1", "--configfile", str(XRAY_MAE))
    assert rc == 0, out
    assert "Lints for" not in out and "Congratulations" in out


def test_pneumonia_study_imports_the_shipped_dataset(tmp_path):
    # the dry run only needs the dataset file to exist; an empty stand-in keeps the test tiny
    npz = tmp_path / "data_manifests" / "pneumoniamnist" / "pneumoniamnist.npz"
    npz.parent.mkdir(parents=True)
    npz.touch()
    rc, out = snakemake(tmp_path, "-n", "--cores", "2", "-p", "--configfile", str(PNEUMONIA))
    assert rc == 0, out
    counts = job_counts(out)
    assert counts["import_pneumoniamnist"] == 1 and "synth" not in counts
    assert ("medvit import pneumoniamnist data_manifests/pneumoniamnist/pneumoniamnist.npz"
            " --out results/pneumonia/data/xray") in out


def test_given_manifest_is_used_without_synthesis(tmp_path):
    (tmp_path / "mine.csv").write_text("patient_id,image\n")
    study = write_study(tmp_path / "own.yaml", {"study": "own", "tasks": {"histo": {"manifest": "mine.csv"}}})
    rc, out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(study))
    assert rc == 0, out
    assert "synth" not in job_counts(out)
    assert re.search(r"input: mine\.csv\s+output: results/own/histo/split\.csv", out)


@pytest.mark.parametrize(
    "study, expected",
    [
        ({"study": "bad", "tasks": {"xray": {"train": {"epochs": "five"}}}},
         ["tasks.xray.train.epochs", "'five'", "an integer >= 1"]),
        ({"study": "../escape", "tasks": {"xray": {}}}, ["study", "'../escape'", "pattern"]),
        ({"study": "bad", "tasks": {"xray": {"manifest": "missing.csv"}}}, ["tasks.xray.manifest", "missing.csv"]),
    ],
)
def test_invalid_study_fails_before_any_job(tmp_path, study, expected):
    path = write_study(tmp_path / "bad.yaml", study)
    rc, out = snakemake(tmp_path, "--cores", "1", "--configfile", str(path))  # a real run, not -n
    assert rc != 0
    for part in expected:
        assert part in out, out
    assert "Building DAG" not in out
    assert not (tmp_path / "results").exists()


def test_overrides_and_merged_configfiles_are_refused(tmp_path):
    rc, out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(DEMO), "--config", "seed=3")
    assert rc != 0 and "--config KEY=VALUE overrides are not supported" in out
    rc, out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(DEMO), str(PNEUMONIA))
    assert rc != 0 and "give exactly one study" in out


def summary_outputs(workdir: Path, study: Path) -> set[str]:
    rc, out = snakemake(workdir, "--cores", "1", "--summary", "--configfile", str(study))
    assert rc == 0, out
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert rows[0][0] == "output_file"
    return {row[0] for row in rows[1:]}


def test_two_studies_have_disjoint_outputs(tmp_path):
    other = yaml.safe_load(DEMO.read_text()) | {"study": "demo2"}
    first = summary_outputs(tmp_path, DEMO)
    second = summary_outputs(tmp_path, write_study(tmp_path / "demo2.yaml", other))
    assert len(first) == len(second) > 10
    assert first.isdisjoint(second)
    assert all(p.startswith("results/demo/") for p in first)
    assert all(p.startswith("results/demo2/") for p in second)


@pytest.mark.slow
def test_run_with_fake_stages_and_rerun_only_what_changed(tmp_path):
    study = {"study": "mini", "device": "cpu",
             "tasks": {"brain": {"models": ["resnet18"]}, "histo": {"models": ["resnet18", "resnet10t"]}}}
    path = write_study(tmp_path / "mini.yaml", study)
    run = fake_runner(tmp_path, path)
    calls = tmp_path / "calls.jsonl"

    rc, out = run()
    assert rc == 0, out
    root = tmp_path / "results" / "mini"
    for rel in ("report/index.html", "histo/resnet10t/metrics.json", "histo/resnet18/model.json",
                "brain/split.csv", "data/brain/manifest.csv", "logs/train/histo_resnet10t.log",
                "benchmarks/train/histo_resnet10t.tsv"):
        assert (root / rel).is_file(), rel
    assert (root / "logs" / "train" / "histo_resnet18.log").read_text().strip() == "fake train"
    lines = calls.read_text().splitlines()
    # synth, split, (train, predict, evaluate) x models, the histo model comparison (2 models), report
    assert len(lines) == 2 + 2 + 3 * 3 + 1 + 1
    # stages get the study file, relative to the working directory when it lies inside it
    assert all('"--config", "mini.yaml"' in line for line in lines if '"synth"' not in line)

    rc, out = run("-n")
    assert rc == 0 and "Nothing to be done" in out, out

    # a comment changes nothing; a training setting reruns that task's models only
    path.write_text("# edited\n" + path.read_text())
    rc, out = run("-n")
    assert rc == 0 and "Nothing to be done" in out, out
    study["tasks"]["histo"]["train"] = {"epochs": 7}
    write_study(path, study)
    rc, out = run("-n")
    assert rc == 0, out
    assert job_counts(out) == {"train": 2, "predict": 2, "evaluate": 2, "compare": 1, "report": 1, "all": 1}
    assert "brain_resnet18" not in out
    # without the params trigger (workflows/README.md: keeping models after an upgrade that
    # adds a setting) the changed settings rerun nothing
    rc, out = run("-n", "--rerun-triggers", "mtime", "input")
    assert rc == 0 and "Nothing to be done" in out, out

    # adding a model trains just that model; evaluation settings re-evaluate without retraining
    study["tasks"]["histo"]["train"] = {}
    study["tasks"]["brain"]["models"] = ["resnet18", "resnet10t"]
    study["evaluation"] = {"bootstrap": 50}
    write_study(path, study)
    rc, out = run("-n")
    assert rc == 0, out
    assert job_counts(out) == {"train": 1, "predict": 1, "evaluate": 4, "compare": 1, "report": 1, "all": 1}
    assert "logs/train/brain_resnet10t.log" in out and "logs/train/brain_resnet18.log" not in out

    # the task's augmentation retrains its models, never its split or the other task
    rc, out = run()
    assert rc == 0, out
    study["tasks"]["histo"]["augment"] = {"flips": False}
    write_study(path, study)
    rc, out = run("-n")
    assert rc == 0, out
    assert job_counts(out) == {"train": 2, "predict": 2, "evaluate": 2, "compare": 1, "report": 1, "all": 1}
    assert "brain_resnet" not in out


@pytest.mark.slow
def test_mae_study_reruns_only_what_a_vit_setting_changes(tmp_path):
    study = {"study": "mae", "device": "cpu",
             "tasks": {"xray": {"models": ["densenet121", "vit_tiny", "vit_tiny_mae"], "pretrain": {"patch_size": 8}}}}
    path = write_study(tmp_path / "mae.yaml", study)
    run = fake_runner(tmp_path, path)

    rc, out = run()
    assert rc == 0, out
    assert (tmp_path / "results/mae/xray/mae/reconstructions.png").is_file()
    rc, out = run("-n")
    assert rc == 0 and "Nothing to be done" in out, out

    # the fine-tuning recipe retrains the ViTs only, never the pretraining or the DenseNet
    study["tasks"]["xray"]["finetune"] = {"layer_decay": 0.65}
    write_study(path, study)
    rc, out = run("-n")
    assert rc == 0, out
    assert job_counts(out) == {"train": 2, "predict": 2, "evaluate": 2, "report": 1, "all": 1}
    assert "xray_densenet121" not in out
    rc, out = run()
    assert rc == 0, out

    # an MAE setting (the mask-ratio ablation) reruns the pretraining and the model it initialises
    study["tasks"]["xray"]["pretrain"]["mask_ratio"] = 0.75
    write_study(path, study)
    rc, out = run("-n")
    assert rc == 0, out
    assert job_counts(out) == {"pretrain": 1, "train": 1, "predict": 1, "evaluate": 1, "report": 1, "all": 1}
    assert "logs/train/xray_vit_tiny_mae.log" in out and "logs/train/xray_vit_tiny.log" not in out


def test_conda_env_pins_match_pyproject():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {d.split(";")[0].strip() for d in pyproject["project"]["dependencies"]
              if not d.startswith("snakemake")}  # snakemake runs the workflow, not inside the jobs
    env = yaml.safe_load((REPO / "workflows" / "envs" / "medvit.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == wanted
    assert "python=3.11" in env["dependencies"]
