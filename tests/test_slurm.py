"""The SLURM profile on a real SLURM: tests/slurm/start_slurm.sh starts munged, slurmctld and
slurmd on this machine (installing Debian's slurm-wlm and munge when root), then two tiny
studies run at the same time through `--profile workflows/profiles/slurm` (`make studies`)
in one working directory. Checked: every job of both studies went through SLURM (its job id
in Snakemake's log, COMPLETED in `scontrol` and in SLURM's job-completion record, a per-job
SLURM log), both studies' outputs are complete and neither study's files name the other.
A second test has SLURM preempt a running training job (`scontrol requeue`: SIGTERM, back to
the queue) and checks that its second run resumes from the checkpoint written on the signal.
The daemons are stopped by PID at the end (tests/slurm/stop_slurm.sh).

Deselected by plain `pytest` and `make test` (marker `slurm`, left out by pyproject's addopts);
`make test-slurm` (`-m slurm`) and CI (.ci/run) run it. The dry run of the profile needs no
SLURM and runs with the other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, failed_job_logs

START = REPO / "tests" / "slurm" / "start_slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop_slurm.sh"


# Options a test cluster needs beyond the profile: no accounting daemon (squeue answers job
# states; the node keeps finished jobs for MinJobAge = 1 h), no account, quick polling (the
# defaults, 40 s then 10 s, are meant for busy clusters), and a 2-core node (training rules
# ask for 4 threads = --cpus-per-task 4).
TEST_CLUSTER_ARGS = ("--slurm-status-command squeue --slurm-no-account --slurm-init-seconds-before-status-checks 2 "
                     "--seconds-between-status-checks 2 --latency-wait 5 --max-threads {cpus}")

# On a heavily loaded 2-core machine the two studies took 901-1090 s (docs/cluster.md): the limit leaves
# room for a machine twice as busy; the test checks correctness, benchmarks measure speed.
TWO_STUDIES_TIMEOUT_S = 2700


def tiny_study(name: str, seed: int) -> dict:
    return {"study": name, "seed": seed, "device": "cpu", "evaluation": {"bootstrap": 20},
            "tasks": {"xray": {"synthetic": {"patients": 10, "image_size": 32}, "image_size": 32,
                               "models": ["resnet18"],
                               "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}}}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    proc = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot be set up on this machine: {proc.stderr.strip()}")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"),
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        yield state, env
    finally:
        stop = subprocess.run(["bash", str(STOP), str(state)], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert not (state / "pids").exists()


def scontrol_state(job_id: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else f"unknown ({out.strip()[:200]})"


def cluster_report(state: Path, env: dict) -> str:
    """What a failed test needs to say why jobs did not run: the node's state and reason, the
    queue with each job's reason, and the last lines of both daemons' logs."""
    parts = []
    for cmd in (["sinfo", "-N", "-o", "%N %T %E"], ["squeue", "-a", "-o", "%i %T %r %j"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
        parts.append(f"--- {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    for name in ("slurmctld.log", "slurmd.log"):
        path = state / name
        lines = path.read_text(errors="replace").splitlines()[-30:] if path.is_file() else ["(none)"]
        parts.append(f"--- {name} (last lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def cancel_all_jobs(env: dict) -> None:
    """Leave the node empty for the next test, whatever the last one left queued."""
    user = pwd.getpwuid(os.getuid()).pw_name
    subprocess.run(["scancel", "--user", user], capture_output=True, env=env, timeout=30)
    for _ in range(60):
        queue = subprocess.run(["squeue", "-h", "-u", user, "-t", "PENDING,RUNNING,COMPLETING"], capture_output=True,
                               text=True, env=env, timeout=30).stdout
        if not queue.strip():
            return
        time.sleep(1)


@pytest.mark.slurm
@pytest.mark.slow
def test_two_studies_run_through_slurm(slurm, tmp_path):
    state, env = slurm
    names = ["slurm_a", "slurm_b"]
    studies = []
    for seed, name in enumerate(names):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_study(name, seed), sort_keys=False))
        studies.append(path)
    cluster_args = TEST_CLUSTER_ARGS.format(cpus=os.cpu_count() or 1)
    args = f"-s {REPO / 'Snakefile'} --directory {tmp_path} {cluster_args}"
    cmd = ["make", "-C", str(REPO), "studies", "STAMP=", f"BIN={BIN}",
           f"STUDIES={' '.join(map(str, studies))}", f"PROFILE={REPO / 'workflows/profiles/slurm'}",
           f"SNAKEMAKE_ARGS={args}"]
    t0 = time.perf_counter()
    # its own session, so that on a timeout make, xargs and both Snakemakes stop together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TWO_STUDIES_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        log = f"(timed out after {TWO_STUDIES_TIMEOUT_S} s)\n" + log
    finally:
        if proc.poll() is None:  # interrupted (e.g. Ctrl-C): the run has its own session, so no SIGINT reached it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cancel_all_jobs(env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, log[-8000:] + failed_job_logs(tmp_path, log) + "\n" + cluster_report(state, env)
    print(f"two studies through SLURM: {wall:.0f} s")

    # Every job was submitted with sbatch: Snakemake logs the SLURM job id and the log file.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.", log)
    # per study: synth, split, train, predict, evaluate, report
    assert len(submitted) == 6 * len(names), log[-4000:]
    job_ids = [j for j, _ in submitted]
    assert len(set(job_ids)) == len(job_ids)
    completion = (state / "jobcomp.log").read_text()
    for job_id, slurm_log in submitted:
        # SLURM's own records: the controller's job table and the job-completion log.
        assert scontrol_state(job_id, env) == "COMPLETED", job_id
        assert re.search(rf"JobId={job_id} .*JobState=COMPLETED", completion), job_id
        assert Path(slurm_log).is_file(), slurm_log   # per-job log, kept (slurm-keep-successful-logs)
    assert all("/.snakemake/slurm_logs/rule_" in p for _, p in submitted)
    # The training jobs asked SLURM for what the rule requests (gpu=0: device cpu).
    for job_id, slurm_log in submitted:
        if "/rule_train/" in slurm_log:
            out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                                 env=env).stdout
            assert "MinMemoryNode=4000M" in out and "TimeLimit=04:00:00" in out, out
            assert re.search(r"NumCPUs=\d+", out) and "TRES=" in out

    # Outputs are complete, each under its own study folder, and name only their own study.
    for seed, name in enumerate(names):
        out = tmp_path / "results" / name
        folder = out / "xray" / "resnet18"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["study"] == name and metrics["task"] == "xray"
        assert (folder / "model.safetensors").stat().st_size > 0
        assert (folder / "predictions.csv").stat().st_size > 0
        html = (out / "report" / "index.html").read_text()
        other = names[1 - seed]
        assert name in html and other not in html
        assert (out / "logs" / "train" / "xray_resnet18.log").is_file()


@pytest.mark.slow
def test_profile_dry_run_shows_each_training_jobs_request(tmp_path):
    """`snakemake -n --profile workflows/profiles/slurm` (no SLURM needed) lists the resources
    each training job asks SLURM for: memory, time, a GPU unless the study says cpu, and the
    SIGTERM before the time limit."""
    study = tiny_study("dry", 0)
    study["device"] = "auto"
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--profile", str(REPO / "workflows/profiles/slurm"), "--configfile", str(path)],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    train = out[out.index("rule train:"):]
    train = train[:train.index("Shell command")]
    resources = re.search(r"resources: (.*)", train).group(1)
    assert "mem_mb=4000" in resources and "runtime=240" in resources and "gpu=1" in resources
    assert "slurm_extra=--signal=TERM@300" in resources


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_training_job_checkpoints_and_resumes_after_requeue(slurm, tmp_path):
    """SLURM itself stops a running training job (`scontrol requeue`: SIGTERM, then the job
    goes back to the queue); the job's second run resumes from the checkpoint written on the
    signal. The training script is tests/test_preemption.py's."""
    state, env = slurm
    cancel_all_jobs(env)
    spec = importlib.util.spec_from_file_location("_preemption", REPO / "tests" / "test_preemption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = tmp_path / "train.py"
    script.write_text(module.SCRIPT)
    out = tmp_path / "run"
    batch = tmp_path / "job.sh"
    batch.write_text(f"#!/bin/bash\nexec {sys.executable} {script} {out}\n")
    submit = subprocess.run(["sbatch", "--parsable", "--requeue", "--export=ALL,SLOW=0.03", "-D", str(tmp_path),
                             "-o", str(tmp_path / "slurm-%j.log"), str(batch)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    loads = out / "loads.txt"
    deadline = time.monotonic() + 1200
    while not (loads.exists() and len(loads.read_text().split()) >= 67):   # inside epoch 2
        assert time.monotonic() < deadline, scontrol_state(job_id, env) + "\n" + cluster_report(state, env)
        time.sleep(0.1)
    requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, env=env)
    assert requeue.returncode == 0, requeue.stderr
    # SLURM holds a requeued job for about two minutes (BeginTime); let it start at once.
    released = False
    while not (out / "result.json").exists():
        if not released and scontrol_state(job_id, env) == "PENDING":
            released = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                      capture_output=True, text=True, env=env).returncode == 0
        assert time.monotonic() < deadline, (scontrol_state(job_id, env),
                                             (tmp_path / f"slurm-{job_id}.log").read_text(),
                                             cluster_report(state, env))
        time.sleep(1)
    log = (out / "train.log").read_text()
    assert "SIGTERM: saved checkpoints/last at epoch 2" in log
    assert re.search(r"resumed from checkpoints/last\.safetensors \(epoch 1 of 3, batch \d+ of epoch 2\)", log)
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 1
    for _ in range(30):
        if scontrol_state(job_id, env) == "COMPLETED":
            break
        time.sleep(1)
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    assert "JobState=COMPLETED" in show and "Restarts=1" in show, show
