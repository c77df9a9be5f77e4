"""Files written atomically and hashed: every output of the pipeline goes through here, so a
reader sees the old file or the new one, never a half-written one (crash, full disk, kill -9).
Torch-free, so light stages (evaluation, reports) import it cheaply."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medvit.errors import DiskFullError, MedvitError


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For libraries that write to a file name themselves (``safetensors.torch.save_file``,
    ``DataFrame.to_csv``)::

        with atomic_path("out/model.safetensors") as tmp:
            save_file(tensors, tmp)

    The temporary file is created with the usual permissions (0666 minus the umask), fsynced
    before the rename, and removed if the block raises. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode & 0o777          # 0666 minus the umask
    try:
        yield tmp
        os.chmod(tmp, mode)                     # writers that recreate the file (safetensors) make it 0600
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = _disk_full(exc)
        if code is not None:
            raise DiskFullError(path, _free_bytes(path.parent), code) from exc
        raise
    _fsync_dir(path.parent)


def _disk_full(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT when ``exc`` says the file system is full: an ``OSError``, or a library's
    own error wrapping one (safetensors' ``SafetensorError: ... No space left on device``)."""
    if isinstance(exc, DiskFullError):
        return None  # already reported with its path
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exc.errno
    text = str(exc)
    if "No space left on device" in text or "StorageFull" in text:
        return errno.ENOSPC
    if "Disk quota exceeded" in text or "QuotaExceeded" in text:
        return errno.EDQUOT
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "numel") and hasattr(obj, "item") and obj.numel() == 1:  # one-element tensor
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _nan_to_null(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, nan_as_null: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    NumPy scalars and arrays, paths, sets and one-element tensors are converted. Non-finite
    floats are written as ``NaN``/``Infinity`` (Python's ``json`` reads them back), or as
    ``null`` with ``nan_as_null`` (strict JSON, for results other tools read).
    """
    if nan_as_null:
        obj = _nan_to_null(json.loads(json.dumps(obj, default=_json_default)))
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default,
                                              allow_nan=not nan_as_null) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file is absent or unreadable (a stage's
    optional output, read by the report)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


LOCK_FILE = ".medvit.lock"
"""Name of the lock file :func:`folder_lock` keeps in an output folder (it holds the owner's pid)."""
_HELD: dict[str, list[int]] = {}  # real folder -> [fd, depth]


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder while the block runs (``flock`` on
    ``<folder>/.medvit.lock``; the kernel releases it when the process exits, however it exits).

    Re-entrant within a process. A second process that asks for the same folder is refused at
    once, so two trainers never write one model folder.

    Raises:
        MedvitError: another process holds the lock (its pid is named).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is None:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise MedvitError(f"{folder} is being written by another process (pid {owner}); two trainers must not "
                              "write one output folder: wait for it to finish, or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        held = _HELD[key] = [fd, 0]
    held[1] += 1
    try:
        yield folder
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # releases the lock; the file stays (harmless, reused next time)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
