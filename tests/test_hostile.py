"""What a hostile user tries against configs, manifests, image files, ingest, checkpoints,
processes and the disk: each attack fails cleanly (a clear error, a quarantined row or a
warning), nothing it smuggles in runs, and nothing it points at is read. docs/security.md
lists every guarantee with the test here that proves it."""

from __future__ import annotations

import errno
import gzip
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medvit.cli import main
from medvit.config import load_study
from medvit.data.manifest import ROOTS_ENV, load_manifest, validate_manifest
from medvit.data.synth import synthesize
from medvit.errors import ConfigError, ImageReadError, ManifestError, MedvitError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env.pop(ROOTS_ENV, None)
    return env


def _histo(folder: Path, patients: int = 4) -> Path:
    return synthesize("histo", n_patients=patients, out_dir=folder, seed=0, image_size=32)


# ------------------------------------------------------------------ 1. shell injection through paths


def _shell_commands() -> list[tuple[str, str]]:
    """(file, line) of every line of every rule's shell command."""
    found = []
    for smk in sorted((REPO / "workflows" / "rules").glob("*.smk")):
        in_shell = False
        for line in smk.read_text().splitlines():
            text = line.strip()
            if text == "shell:":
                in_shell = True
            elif in_shell and text.startswith('"'):
                found.append((smk.name, text))
            else:
                in_shell = False
    return found


def test_every_value_in_a_rule_shell_command_is_quoted():
    commands = _shell_commands()
    assert len(commands) > 40  # every rule file was read
    unquoted = [(f, field) for f, text in commands for field in re.findall(r"\{([^{}]*)\}", text)
                if not field.endswith(":q")]
    assert unquoted == [], f"shell command fields without :q (pasted unquoted into bash): {unquoted}"


def test_study_path_with_command_substitution_and_spaces_runs_nothing(tmp_path):
    """`snakemake --configfile 'cfg/x$(touch PWNED)y z.yaml'`: the split job (which gets the
    study path) runs with the path as one argument; nothing in it is executed."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    study = cfg / "x$(touch PWNED)y z.yaml"
    study.write_text("study: s\ntasks:\n  histo:\n    synthetic: {patients: 4, image_size: 32}\n")
    target = "results/s/histo/split.csv"
    proc = subprocess.run([str(BIN / "snakemake"), target, "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "1", "--configfile", str(study)],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists(), out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / target).is_file()
