"""A preprocessed cache on disk: the deterministic part of loading, run once per sample.

Like nnU-Net's preprocessed folder or MONAI's ``PersistentDataset``, the loading transform of
:func:`medvit.data.transforms.load_transforms` (read, per-image percentile scaling, resize,
channel stacking) runs once per sample and preprocessing setting, and its output is kept on
disk as compact arrays that every model and job of a study reads::

    <folder>/cache.json    settings, arrays (file, dtype, shape, encoding), sample count; written last
    <folder>/index.csv     one row per sample: sample_id, key, source files with size and mtime
    <folder>/image.npy     (N, C, *spatial) uint16: round(x * 65535) of the [0, 1] image
    <folder>/label.npy     (N, 1, *spatial) uint8 masks, where the setting loads masks

A sample's ``key`` is the SHA-256 of the settings and of its source files' bytes: a rebuild
(new rows, another split) copies every sample whose key it already holds instead of decoding
it again. Readers check each sample's source files by path, size and modification time, and
decode a sample whose file changed since the build instead of serving stale pixels.

Why uint16 for images: the loaded image is clipped to [0, 1], and 65535 levels are 16 times
finer than a 12-bit radiograph's own steps; a cached value differs from the float32 one by at
most 0.5 / 65535 = 7.6e-6, which no augmentation or model can tell from rounding (half the
bytes of float32, and exact steps where float16 has 11 bits of mantissa).

Why positioned reads (``os.preadv``) and not a mapping of the whole file: every process reads
the same page cache, so no worker or job holds its own copy of the dataset, and a process's
resident memory does not grow with the files it has read (pages of a long-lived mapping count
in its RSS once touched). The ``.npy`` files remain ordinary arrays:
``np.load(path, mmap_mode="r")`` opens one in any tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from medvit.errors import MedvitError
from medvit.fileio import atomic_write_json, atomic_write_text

CACHE_FORMAT = 1
"""Version of the on-disk layout and of the loading transform it stores; part of every key.
Bump it when :func:`medvit.data.transforms.load_transforms` changes what it computes."""

UNIT16_LEVELS = 65535
"""``unit16`` encoding: a value x in [0, 1] is stored as round(x * 65535) in a uint16."""

ENCODINGS = {"unit16": np.dtype(np.uint16), "uint8": np.dtype(np.uint8), "float32": np.dtype(np.float32)}
"""Array encodings: ``unit16`` (values in [0, 1], see :data:`UNIT16_LEVELS`), ``uint8``
(integers 0..255, exact, for masks), ``float32`` (exact; for anything else)."""

BUILD_CHUNK_BYTES = 256 << 20
"""At most this many bytes of decoded samples wait to be written while a cache is built."""

SOURCE_COLUMNS = ("image", "mask")
"""Manifest columns (with ``image_<channel>``) whose files a sample is loaded from."""


class CacheError(MedvitError):
    """A preprocessed cache cannot be built or read (the message names the folder and why)."""


def load_settings(spatial_size: Sequence[int], load_mask: bool) -> dict[str, Any]:
    """The settings of :func:`medvit.data.transforms.load_transforms` a cache is built for,
    with the encoding of each array it stores."""
    arrays = {"image": "unit16", **({"label": "uint8"} if load_mask else {})}
    return {"format": CACHE_FORMAT, "spatial_size": [int(s) for s in spatial_size], "load_mask": bool(load_mask),
            "encodings": arrays}


def settings_digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def source_files(row: Mapping[str, Any], root: str | os.PathLike[str]) -> list[str]:
    """Absolute paths (not resolved through links) of the files a manifest row is loaded from:
    ``image`` or the ``image_<channel>`` columns, then ``mask`` when present."""
    root = os.path.abspath(root)
    out = []
    for key, value in row.items():
        if not isinstance(key, str) or not (key in SOURCE_COLUMNS or key.startswith("image_")):
            continue
        if isinstance(value, str) and value:
            out.append(os.path.normpath(os.path.join(root, value)))
    return out


def _files_of(path: str) -> list[str]:
    # a DICOM series is a folder: its files, in a fixed order
    if os.path.isdir(path):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [path]


def file_stamp(path: str) -> list[int]:
    """``[size, mtime_ns]`` of a file, or of a folder's files (total size, latest mtime)."""
    stats = [os.stat(f) for f in _files_of(path)]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def content_digest(path: str) -> str:
    """SHA-256 of a file's bytes (of a folder: of its files' relative names and bytes)."""
    digest = hashlib.sha256()
    for f in _files_of(path):
        if f != path:
            digest.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def encode(array: Any, encoding: str, what: str) -> np.ndarray:
    """``array`` (tensor or ndarray) in ``encoding``; refuses values the encoding cannot hold."""
    x = np.asarray(array.numpy() if isinstance(array, torch.Tensor) else array)
    if encoding == "float32":
        return x.astype(np.float32)
    if not np.isfinite(x).all():
        raise CacheError(f"{what}: non-finite values cannot be cached as {encoding}")
    if encoding == "unit16":
        if x.min() < 0 or x.max() > 1:
            raise CacheError(f"{what}: values in [{x.min():.4g}, {x.max():.4g}], but the {encoding} encoding "
                             "holds [0, 1] (is the loading transform's intensity scaling off?)")
        return np.rint(x.astype(np.float64) * UNIT16_LEVELS).astype(np.uint16)
    if encoding == "uint8":
        if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
            raise CacheError(f"{what}: only integers 0..255 can be cached as {encoding}")
        return x.astype(np.uint8)
    raise CacheError(f"unknown cache encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")


def decode(stored: np.ndarray, encoding: str) -> np.ndarray:
    """float32 values of a stored array (exact for ``uint8`` and ``float32``)."""
    if encoding == "unit16":
        return stored.astype(np.float32) / np.float32(UNIT16_LEVELS)
    return stored.astype(np.float32)


class PreprocessedCache:
    """A built cache folder, opened for reading (see the module docstring).

    Safe to share with DataLoader workers: files are opened lazily in each process and read
    with positioned reads, and the object pickles without its file descriptors.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "cache.json").read_text())
            index = pd.read_csv(self.folder / "index.csv", dtype={"sample_id": str, "key": str}, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.folder}: not a readable preprocessed cache ({exc})") from None
        if self.meta.get("format") != CACHE_FORMAT or len(index) != self.meta.get("count"):
            raise CacheError(f"{self.folder}: cache format {self.meta.get('format')} with {len(index)} index rows for "
                             f"{self.meta.get('count')} samples; this medvit writes format {CACHE_FORMAT}: rebuild it")
        self.settings = self.meta["settings"]
        self.arrays: dict[str, dict[str, Any]] = self.meta["arrays"]
        self._rows = {sid: i for i, sid in enumerate(index["sample_id"])}
        # kept as the index's JSON text: a few strings per sample, not lists of objects
        self._sources: list[str] = list(index["sources"])
        self._stamps: list[str] = list(index["stamps"])
        self.keys: list[str] = list(index["key"])
        # opened now, before DataLoader workers fork: every process reads this build's files,
        # even after a rebuild has replaced them by name (positioned reads share no offset)
        self._fds = {name: os.open(self.folder / spec["file"], os.O_RDONLY) for name, spec in self.arrays.items()}

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> PreprocessedCache | None:
        """The cache in ``folder``, or None when there is none (not built, or being replaced)."""
        return cls(folder) if (Path(folder) / "cache.json").is_file() else None

    def __len__(self) -> int:
        return len(self._rows)

    def serves(self, settings: Mapping[str, Any]) -> bool:
        """Whether this cache holds what :func:`load_settings` ``settings`` load (a cache with
        masks also serves loaders without them)."""
        mine = self.settings
        return (mine["format"] == settings["format"] and mine["spatial_size"] == settings["spatial_size"]
                and all(mine["encodings"].get(k) == v for k, v in settings["encodings"].items()))

    def row_of(self, sample_id: str, sources: Sequence[str]) -> int | None:
        """The row of a sample, when it was built from these files and they have not changed
        since (same paths, sizes and modification times)."""
        row = self._rows.get(str(sample_id))
        if row is None or self._sources[row] != json.dumps(list(sources)):
            return None
        try:
            if [file_stamp(p) for p in sources] != json.loads(self._stamps[row]):
                return None
        except OSError:
            return None
        return row

    def read(self, row: int, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The decoded float32 arrays of ``row`` (``keys``: a subset of the stored ones)."""
        out = {}
        for name in self.arrays if keys is None else keys:
            spec = self.arrays[name]
            stored = np.empty(spec["shape"], ENCODINGS[spec["encoding"]])
            offset = spec["offset"] + row * stored.nbytes
            got = os.preadv(self._fds[name], [memoryview(stored).cast("B")], offset)
            if got != stored.nbytes:
                raise CacheError(f"{self.folder / spec['file']}: truncated at sample {row} "
                                 f"(read {got} of {stored.nbytes} bytes): rebuild the cache")
            out[name] = torch.from_numpy(decode(stored, spec["encoding"]))
        return out

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a spawned process (no inherited descriptors): the files by name, if still this build
        self.__dict__.update(state)
        now = PreprocessedCache(self.folder)
        if now.meta.get("build") != self.meta.get("build"):
            raise CacheError(f"{self.folder} was rebuilt while a job was reading it: rerun the job")
        self._fds, now._fds = now._fds, {}

    def __del__(self) -> None:
        self.close()


class CachedLoadd:
    """A loading transform served from a :class:`PreprocessedCache`.

    ``d["row"]`` is replaced by the sample's cached arrays when the cache holds the row's
    files unchanged (keys ``keys``), else by ``load(d)``: the cache only ever saves time.

    Args:
        load: the loading transform the cache was built with (for samples it lacks).
        cache: the opened cache.
        root: the manifest's folder (paths in rows are relative to it).
        keys: arrays to read (``image``, plus ``label`` for masks).
    """

    def __init__(self, load: Callable[[dict], dict], cache: PreprocessedCache, root: str | os.PathLike[str],
                 keys: Sequence[str] = ("image",)):
        self.load = load
        self.cache = cache
        self.root = os.path.abspath(root)
        self.keys = list(keys)
        self.decoded = 0  # samples loaded from their files instead (not in the cache, or changed)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        row = self.cache.row_of(data.get("sample_id", ""), source_files(data["row"], self.root))
        if row is None:
            self.decoded += 1
            return self.load(data)
        d = {k: v for k, v in data.items() if k != "row"}
        d.update(self.cache.read(row, self.keys))
        return d


# ---------------------------------------------------------------------------- building


def _npy_file(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Create a sparse ``.npy`` file of ``shape``; returns the byte offset of its data."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = int(arr.offset)
    del arr
    return offset


def _previous(folder: Path) -> tuple[dict[str, int], dict[str, tuple[str, int, np.dtype, tuple[int, ...]]]]:
    """Key -> row and array name -> (file, offset, dtype, sample shape) of an earlier build in
    ``folder`` (cache.json may be gone: Snakemake removes a job's outputs before rerunning it)."""
    try:
        index = pd.read_csv(folder / "index.csv", dtype={"key": str}, keep_default_na=False)
        arrays = {}
        for path in folder.glob("*.npy"):
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: no data page is read
            if mapped.shape[0] != len(index):
                return {}, {}
            arrays[path.stem] = (str(path), int(mapped.offset), mapped.dtype, tuple(mapped.shape[1:]))
            del mapped
        return {k: i for i, k in enumerate(index["key"])}, arrays
    except (OSError, ValueError, KeyError):
        return {}, {}


def build_cache(folder: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], load: Callable[[dict], dict],
                settings: Mapping[str, Any], root: str | os.PathLike[str], workers: int = 0,
                desc: str = "preprocessing") -> PreprocessedCache:
    """Run ``load`` once per record and write the cache into ``folder`` (replacing one there).

    Samples whose key (settings + source bytes) an earlier build in ``folder`` holds are copied
    from it instead of decoded. The new cache is written beside ``folder`` and moved into place
    when complete, so a reader sees the old cache or the new one, never a part-written one.

    Args:
        folder: the cache folder.
        records: dicts with ``row`` (manifest row) and ``sample_id``, as the loader reads them.
        load: the deterministic loading transform (:func:`load_transforms`).
        settings: :func:`load_settings` of ``load``.
        root: the manifest's folder.
        workers: threads decoding in parallel (0: this thread; image decoders release the GIL).

    Raises:
        CacheError: samples of different shapes, or values an encoding cannot hold.
        ImageReadError: a source file is unreadable.
    """
    folder = Path(folder)
    if not records:
        raise CacheError(f"{folder}: no samples to cache")
    sids = [str(r["sample_id"]) for r in records]
    if len(set(sids)) != len(sids):
        raise CacheError(f"{folder}: sample_id values repeat; a cache needs one row per sample")
    base = settings_digest(settings)
    root = os.path.abspath(root)
    sources = [source_files(r["row"], root) for r in records]
    encodings: dict[str, str] = dict(settings["encodings"])
    old_keys, old_arrays = _previous(folder)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.build-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        def identify(i: int) -> tuple[str, list[list[int]]]:
            # stamps first: a file changing while it is hashed then fails the readers' check
            stamps = [file_stamp(p) for p in sources[i]]
            digest = hashlib.sha256(base.encode())
            for p in sources[i]:
                digest.update(content_digest(p).encode())
            return digest.hexdigest(), stamps

        def prepare(i: int) -> dict[str, np.ndarray]:
            sample = load({k: v for k, v in records[i].items()})
            missing = [k for k in encodings if k not in sample]
            if missing:
                raise CacheError(f"{folder}: the loading transform gave no {missing} for sample {sids[i]}")
            return {k: encode(sample[k], enc, f"sample {sids[i]} `{k}`") for k, enc in encodings.items()}

        with ThreadPoolExecutor(max(1, workers)) as pool:
            ids = list(tqdm(pool.map(identify, range(len(records))), total=len(records), desc="hashing sources",
                            unit="sample", leave=False, disable=len(records) < 200))
            keys = [k for k, _ in ids]
            reuse = {i: old_keys[k] for i, k in enumerate(keys) if k in old_keys}
            if reuse and set(old_arrays) != set(encodings):
                reuse = {}
            first = (prepare(0) if 0 not in reuse else
                     {n: _read_old(old_arrays[n], reuse[0]) for n in encodings})
            specs, fds = {}, {}
            for name, arr in first.items():
                if name in old_arrays and old_arrays[name][3] != arr.shape:
                    reuse = {}
                offset = _npy_file(tmp / f"{name}.npy", arr.dtype, (len(records), *arr.shape))
                specs[name] = {"file": f"{name}.npy", "encoding": encodings[name], "dtype": arr.dtype.name,
                               "shape": list(arr.shape), "offset": offset}
                fds[name] = os.open(tmp / f"{name}.npy", os.O_WRONLY)

            def write(i: int, arrays: Mapping[str, np.ndarray]) -> None:
                for name, arr in arrays.items():
                    spec = specs[name]
                    if list(arr.shape) != spec["shape"]:
                        raise CacheError(f"{folder}: sample {sids[i]} `{name}` has shape {list(arr.shape)}, sample "
                                         f"{sids[0]} {spec['shape']}; every sample of a cache has one shape")
                    os.pwrite(fds[name], np.ascontiguousarray(arr).tobytes(), spec["offset"] + i * arr.nbytes)

            try:
                write(0, first)
                for i, j in reuse.items():
                    if i:
                        write(i, {n: _read_old(old_arrays[n], j) for n in encodings})
                todo = [i for i in range(1, len(records)) if i not in reuse]
                bar = tqdm(total=len(todo), desc=desc, unit="sample", leave=False, disable=len(todo) < 200)
                # bounded memory: a chunk of decoded samples (float32) waits to be written, at most
                # 256 samples or 256 MiB (a few 3D volumes), never fewer than the threads
                per_sample = 4 * sum(int(np.prod(a.shape)) for a in first.values())
                step = max(1, workers, min(256, BUILD_CHUNK_BYTES // max(1, per_sample)))
                for start in range(0, len(todo), step):
                    chunk = todo[start:start + step]
                    for i, arrays in zip(chunk, pool.map(prepare, chunk)):
                        write(i, arrays)
                        bar.update()
                bar.close()
            finally:
                for fd in fds.values():
                    os.close(fd)

        index = pd.DataFrame({"sample_id": sids, "key": keys,
                              "sources": [json.dumps(s) for s in sources],
                              "stamps": [json.dumps(st) for _, st in ids]})
        atomic_write_text(tmp / "index.csv", index.to_csv(index=False))
        atomic_write_json(tmp / "cache.json", {"format": CACHE_FORMAT, "build": uuid.uuid4().hex,
                                               "settings": dict(settings), "count": len(sids),
                                               "arrays": specs, "reused": len(reuse),
                                               "decoded": len(records) - len(reuse),
                                               "bytes": sum(os.path.getsize(tmp / s["file"]) for s in specs.values())})
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreprocessedCache(folder)


def _read_old(spec: tuple[str, int, np.dtype, tuple[int, ...]], row: int) -> np.ndarray:
    path, offset, dtype, shape = spec
    out = np.empty(shape, dtype)
    with open(path, "rb") as fh:
        fh.seek(offset + row * out.nbytes)
        fh.readinto(memoryview(out).cast("B"))
    return out


def _publish(tmp: Path, folder: Path) -> None:
    """Move the finished build ``tmp`` to ``folder``: the old cache goes first (a reader that has
    its files open keeps reading them), then the new one takes its name."""
    if folder.exists():
        try:
            folder.rmdir()  # an empty folder (Snakemake makes an output's folder before the job)
        except OSError:
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        # another job published the same cache meanwhile: keep theirs
        if not (folder / "cache.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CACHE_FORMAT", "CacheError", "CachedLoadd", "PreprocessedCache", "build_cache", "content_digest",
           "decode", "encode", "file_stamp", "load_settings", "source_files"]
