"""Typed errors. Every user-facing failure is a :class:`MedvitError`; the CLI prints its
message and exits non-zero instead of showing a traceback."""

from __future__ import annotations

from pathlib import Path


class MedvitError(Exception):
    """Base class of every error the pipeline reports to users."""


class ImageReadError(MedvitError):
    """An input file could not be read as an image.

    Attributes:
        path: the offending file or folder.
        reason: short human-readable reason (e.g. ``"truncated pixel data"``).
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(MedvitError):
    """A manifest is unusable (missing, empty, wrong columns, invalid rows)."""


class LeakageError(MedvitError):
    """A patient appears in more than one split."""

    def __init__(self, patients: list[str], detail: str = ""):
        self.patients = sorted(patients)
        shown = ", ".join(self.patients[:20]) + (" ..." if len(self.patients) > 20 else "")
        msg = f"patient-level leakage: {len(self.patients)} patient(s) appear in more than one split: {shown}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class ConfigError(MedvitError):
    """A study config is invalid; the message names the key, the value and what is allowed."""


class CheckpointError(MedvitError):
    """A checkpoint or weights file is missing, truncated or unsafe to load."""
