"""Provenance recorded with every result: code version, config, data manifest hash,
package versions, hardware and time. Never contains patient data."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from medvit.fileio import sha256_file

_PACKAGES = ("medvit", "torch", "torchvision", "monai", "timm", "ultralytics", "numpy", "scikit-learn",
             "pydicom", "nibabel", "snakemake")
_REPO_ROOT = Path(__file__).resolve().parents[1]


def git_version(repo: Path = _REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the code that runs."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor() or None,
                            "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        info["cuda"] = None
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(config: dict | None = None, config_path: str | Path | None = None,
               manifest_path: str | Path | None = None) -> dict[str, Any]:
    """Everything needed to trace a result back to its inputs.

    Args:
        config: the study config as run (defaults filled).
        config_path: the YAML file it came from (its SHA-256 is recorded).
        manifest_path: the data manifest the result was computed from (SHA-256 recorded).
    """
    record: dict[str, Any] = {
        "created": now_iso(),
        "code": git_version(),
        "packages": package_versions(),
        "hardware": hardware(),
    }
    if config is not None:
        record["config"] = config
    if config_path is not None:
        record["config_path"] = str(config_path)
        record["config_sha256"] = sha256_file(config_path)
    if manifest_path is not None:
        record["manifest_path"] = str(manifest_path)
        record["manifest_sha256"] = sha256_file(manifest_path)
    return record
