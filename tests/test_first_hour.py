"""The first hour of a new user: grouped help, help on every argument, stage commands that
refuse tasks they do not serve, the default workflow profile, and one GPU per job."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvit.cli import USER_COMMANDS, build_parser, main
from medvit.engine import gpu_slots

REPO = Path(__file__).resolve().parents[1]


def _actions(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + [name])
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action


def test_every_argument_has_help_text():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _actions(build_parser(), []) if not a.help]
    assert not missing


def test_help_groups_user_commands_and_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    user, rest = text.split("user commands:")[1].split("stage commands")
    for name in USER_COMMANDS:
        assert f"\n  {name} " in user
    assert "\n  train " in rest and "\n  train " not in user
    assert "examples:" in rest and "medvit infer --model" in rest


@pytest.mark.parametrize("argv, served", [
    (["ssl-pretrain", "--task", "histo", "--split", "s.csv", "--fold", "0", "--out", "o"], "prostate"),
    (["distill", "teacher", "--task", "histo", "--split", "s.csv", "--out", "o"], "brain"),
    (["pretrain", "--task", "brain", "--split", "s.csv", "--out", "o"], "xray"),
    (["cv-fold", "--task", "xray", "--model", "unet3d", "--split", "s.csv", "--fold", "0", "--out", "o"], "prostate"),
])
def test_stage_commands_refuse_tasks_they_do_not_serve(argv, served, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--config", str(REPO / "workflows/studies/demo.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"serves task {served}" in err
    assert not (tmp_path / "o").exists()


def test_default_workflow_profile_holds_only_executor_independent_keys():
    """profiles/default applies to every run, `--profile .../slurm` ones included: its keys must
    agree with both the local and the SLURM profile."""
    default = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    assert default["show-failed-logs"] is True
    for name in ("local", "slurm"):
        other = yaml.safe_load((REPO / f"workflows/profiles/{name}/config.yaml").read_text())
        assert {k: other.get(k) for k in default} == default, name


def test_gpu_slots_give_concurrent_jobs_different_gpus(tmp_path):
    env1, env2, env3 = {}, {}, {}
    try:
        assert gpu_slots.assign_gpu(2, tmp_path, env=env1) == 0 and env1["CUDA_VISIBLE_DEVICES"] == "0"
        # a second job (another process in practice; flock locks are per open file) gets GPU 1
        assert gpu_slots.assign_gpu(2, tmp_path, env=env2) == 1 and env2["CUDA_VISIBLE_DEVICES"] == "1"
        # all held: waits, then runs without a slot
        assert gpu_slots.assign_gpu(2, tmp_path, env=env3, wait_seconds=0.1, poll=0.05) is None
        assert "CUDA_VISIBLE_DEVICES" not in env3
    finally:
        gpu_slots.release_all()
    assert gpu_slots.assign_gpu(2, tmp_path, env={}) == 0  # released: free again
    gpu_slots.release_all()


def test_gpu_slot_is_released_when_the_job_process_ends(tmp_path):
    code = ("import sys; from medvit.engine import gpu_slots; env = {}; "
            "print(gpu_slots.assign_gpu(3, sys.argv[1], env=env), env['CUDA_VISIBLE_DEVICES'])")
    held = {}
    try:
        assert gpu_slots.assign_gpu(3, tmp_path, env=held) == 0
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["1", "1"]  # slot 0 is ours; the child took 1 and exited
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["1", "1"]  # the first child's slot was freed by its exit
    finally:
        gpu_slots.release_all()


def test_gpu_slots_leave_a_chosen_device_and_single_gpu_machines_alone(tmp_path):
    assert gpu_slots.assign_gpu(4, tmp_path, env={"CUDA_VISIBLE_DEVICES": "2"}) is None
    assert gpu_slots.assign_gpu(1, tmp_path, env={}) is None
    assert gpu_slots.assign_gpu(0, tmp_path, env={}) is None
