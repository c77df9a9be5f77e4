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


class DiskFullError(MedvitError, OSError):
    """An output could not be written because its file system is full (or over quota).

    An ``OSError`` with ``errno`` ENOSPC (or EDQUOT) as well, so callers that handle write
    errors still do; its message names the file and the space left, and the CLI prints it as
    an ``error:`` line. The previous version of the file is intact (writes are atomic).
    """

    def __init__(self, path: str | Path, free_bytes: int | None, code: int):
        self.path = Path(path)
        self.free_bytes = free_bytes
        free = "unknown free space" if free_bytes is None else f"{_size(free_bytes)} free"
        self.message = (f"no space left on the device writing {self.path} ({free} on its file system); the previous "
                        "version of the file, if any, is intact: free some space and run the command again")
        OSError.__init__(self, code, self.message)

    def __str__(self) -> str:
        return self.message


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover
