"""Read and validate data manifests (Contract 1 in DESIGN.md).

A manifest is a CSV with one row per sample (a 2D image or a 3D volume); paths are relative
to the manifest's folder. Validation has three layers:

1. the file itself (exists, UTF-8 text, parses as CSV, has a header and rows, has the required
   columns) -- failing any of these makes the manifest unusable (:class:`ManifestError`);
2. every row against ``workflows/schemas/manifest.schema.yaml`` (the same JSON Schema that
   ``snakemake.utils.validate`` can apply to a pandas sheet), plus row checks a schema cannot
   express: files exist, are readable images (``check_files``), masks share the image grid,
   box files are YOLO format, sample ids are unique -- a row failing any of these is
   *quarantined*: reported with its row number and reason and left out, and the run goes on;
3. manifest-wide rules: a patient never appears in two splits (:class:`LeakageError`).

Row numbers are 1-based data rows: row 1 is the first line after the header.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medvit.data.io import read_image, read_sample
from medvit.errors import ConfigError, ImageReadError, LeakageError, ManifestError

logger = logging.getLogger(__name__)

#: The per-row JSON Schema (kept with the workflow so Snakemake rules can use it too).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflows" / "schemas" / "manifest.schema.yaml"
SPLITS = ("train", "val", "test", "unlabeled")
"""Values of the ``split`` column. ``unlabeled`` rows are read by self-supervised pretraining
only (never trained on with labels, validated or tested); a patient has one split, so an
unlabeled patient never reaches validation or test either."""
SUPERVISED_SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("patient_id",)
KNOWN_COLUMNS = ("patient_id", "sample_id", "study_id", "image", "label", "labels", "mask", "boxes", "split")
CHANNEL_RE = re.compile(r"^image_.+$")  # as medvit.data.io.read_sample reads them
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
#: Columns medvit adds; a CSV must not bring its own.
RESERVED_COLUMNS = ("_row",)
#: Environment variable listing extra folders (``os.pathsep``-separated) that manifest paths may
#: point into, besides the manifest's own folder (docs/security.md).
ROOTS_ENV = "MEDVIT_DATA_ROOTS"


@dataclass
class Problem:
    """One thing wrong with a manifest.

    Attributes:
        row: 1-based data row number (CSV line minus the header), or None for a problem of the
            whole manifest (e.g. a patient in two splits).
        column: the column at fault, or None.
        reason: human-readable reason.
    """

    row: int | None
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


@dataclass
class Manifest:
    """A loaded manifest.

    Attributes:
        df: usable rows; every CSV column as strings (empty cells are ``""``, surrounding
            whitespace stripped), plus ``sample_id`` (the CSV's, else ``"r<row>"``) and
            ``_row`` (int, 1-based data row). Quarantined rows are not in it.
        path: the manifest file.
        root: folder that relative paths are resolved against (the manifest's folder).
        problems: every problem found; each one with a row number quarantined that row.
    """

    df: pd.DataFrame
    path: Path
    root: Path
    problems: list[Problem] = field(default_factory=list)

    @property
    def quarantined_rows(self) -> list[int]:
        """Sorted row numbers that were left out."""
        return sorted({p.row for p in self.problems if p.row is not None})


@dataclass
class ValidationReport:
    """Result of :func:`validate_manifest`.

    Attributes:
        path: the manifest file.
        ok: True when no problem was found.
        problems: every problem, rows in order, manifest-wide problems last.
        summary: :func:`manifest_summary` of the usable rows plus ``rows`` (data rows read),
            ``quarantined`` (rows left out) and ``checked_files`` (whether images were opened).
        warnings: things that do not stop the pipeline but should be fixed (patient ids that
            look like names, MRNs or dates: :func:`identifying_id_warnings`).
    """

    path: Path
    ok: bool
    problems: list[Problem]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _read(path: str | Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a manifest CSV as strings and check its columns, without judging row values.

    Args:
        path: the CSV file (UTF-8, optionally with a byte-order mark, comma-separated).

    Returns:
        The rows -- every column as ``str`` with surrounding whitespace stripped, empty cells as
        ``""``, plus ``_row`` (line number minus one; blank lines are skipped) -- and one
        problem per row whose number of fields differs from the header (those rows are
        quarantined: their cells cannot be assigned to columns safely).

    Raises:
        ManifestError: missing file, empty file, binary or non-UTF-8 file, malformed CSV,
            unnamed or duplicate columns, no data rows, or missing required columns.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if not path.is_file():
        raise ManifestError(f"manifest {path} is a folder, not a CSV file")
    raw = path.read_bytes()
    if not raw.strip():
        raise ManifestError(f"manifest {path} is empty; expected a CSV header with at least "
                            f"patient_id and image (or image_<channel>) columns, then one row per sample")
    if b"\x00" in raw[:65536]:
        raise ManifestError(f"manifest {path} is a binary file, not a CSV text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text (undecodable byte 0x{raw[exc.start]:02x} at "
                            f"offset {exc.start}); save it as 'CSV UTF-8'") from None

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote must not swallow the file
    records: list[list[str]] = []
    rows: list[int] = []
    problems: list[Problem] = []
    try:
        header = next(reader)
        while not any(h.strip() for h in header):
            header = next(reader)
        header_line = reader.line_num
        last = header_line
        for record in reader:
            start, last = last + 1, reader.line_num
            if not any(v.strip() for v in record):
                continue  # blank line
            row = start - header_line
            if len(record) != len(header):
                problems.append(Problem(row, None, f"has {len(record)} fields but the header has {len(header)}"))
                continue
            records.append([v.strip() for v in record])
            rows.append(row)
    except csv.Error as exc:
        hint = " (a quote opened and never closed?)" if "end of data" in str(exc) else ""
        raise ManifestError(f"manifest {path} is not a readable CSV (line {reader.line_num}): {exc}{hint}") from None
    except StopIteration:
        header = []

    names = [h.strip() for h in header]
    unnamed = [i + 1 for i, n in enumerate(names) if not n]
    if unnamed:
        raise ManifestError(f"manifest {path}: column(s) {', '.join(map(str, unnamed))} of the header have no name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"manifest {path}: duplicate column(s) in the header: {', '.join(dupes)}")
    df = pd.DataFrame(records, columns=names, dtype=object)
    _check_columns(df, path, header_line=",".join(header))
    if df.empty and not problems:
        raise ManifestError(f"manifest {path} has a header but no data rows")
    df["_row"] = pd.Series(rows, dtype="int64")
    return df, problems


def _check_columns(df: pd.DataFrame, path: Path, header_line: str = "") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if "image" not in df.columns and not channel_columns(df):
        missing.append("image (or image_<channel> columns)")
    reserved = [c for c in RESERVED_COLUMNS if c in df.columns]
    if reserved:
        raise ManifestError(f"manifest {path}: column name(s) {', '.join(reserved)} are reserved for medvit; rename "
                            "them")
    if missing:
        hint = ""
        for sep, name in (("\t", "tab"), (";", "semicolon")):
            if sep in header_line and len(df.columns) == 1:
                hint = f" (the header looks {name}-separated; medvit reads comma-separated CSV)"
        # The header is not shown: a file without the required columns may not be a manifest at
        # all (a key file, /etc/shadow), and its first line would end up in logs and results.
        raise ManifestError(f"manifest {path}: missing required column(s): {', '.join(missing)}; its first line has "
                            f"{len(df.columns)} comma-separated field(s), not shown (this may not be a manifest)"
                            f"{hint}")


def channel_columns(df: pd.DataFrame) -> list[str]:
    """``image_<channel>`` columns in column order (e.g. ``image_t2w, image_adc, image_hbv``)."""
    return [c for c in df.columns if CHANNEL_RE.match(str(c))]


def image_columns(df: pd.DataFrame) -> list[str]:
    """The column(s) holding the image: ``["image"]`` if present, else the channel columns."""
    return ["image"] if "image" in df.columns else channel_columns(df)


# --------------------------------------------------------------------------- schema


@lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema

    if not SCHEMA_PATH.is_file():
        raise ManifestError(f"manifest schema not found at {SCHEMA_PATH}; install medvit from its source "
                            f"tree (pip install -e .) so workflows/schemas is available")
    schema = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def manifest_schema() -> dict[str, Any]:
    """The per-row JSON Schema (``workflows/schemas/manifest.schema.yaml``) as a dict."""
    return _schema_validator().schema


def _schema_problems(df: pd.DataFrame) -> list[Problem]:
    validator = _schema_validator()
    columns = [c for c in df.columns if c not in RESERVED_COLUMNS]
    problems: list[Problem] = []
    for row, values in zip(df["_row"], df[columns].itertuples(index=False, name=None)):
        seen: set[str | None] = set()
        for err in sorted(validator.iter_errors(dict(zip(columns, values))), key=lambda e: list(e.absolute_path)):
            column = str(err.absolute_path[0]) if err.absolute_path else None
            if column in seen:  # e.g. "" fails both minLength and pattern: report the cell once
                continue
            seen.add(column)
            hint = str(err.schema.get("x-hint", "")).strip() if isinstance(err.schema, dict) else ""
            if err.instance == "":
                reason = f"empty value ({hint})" if hint else "empty value"
            elif column is not None:
                reason = f"invalid value {err.instance!r}: {hint or err.message}"
            else:
                reason = err.message
            problems.append(Problem(int(row), column, reason))
    return problems


# --------------------------------------------------------------------------- row checks


def _duplicate_problems(df: pd.DataFrame) -> list[Problem]:
    if "sample_id" not in df.columns:
        return []
    first: dict[str, int] = {}
    problems = []
    for row, sid in zip(df["_row"], df["sample_id"]):
        if sid == "":
            continue  # already a schema problem
        if sid in first:
            problems.append(Problem(int(row), "sample_id",
                                    f"duplicate sample_id {sid!r} (first used in row {first[sid]})"))
        else:
            first[sid] = int(row)
    return problems


def check_boxes_file(path: Path) -> str | None:
    """Check a YOLO box file: one ``class cx cy w h`` line per box, normalised to 0..1.

    Args:
        path: the ``.txt`` file. An empty file means "no boxes" (a normal image) and is valid.

    Returns:
        None when the file is valid, else the reason it is not.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "boxes file is not UTF-8 text"
    except OSError as exc:
        return f"boxes file unreadable: {exc.strerror or exc}"
    for i, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            return f"boxes file line {i}: expected 5 values 'class cx cy w h', found {len(parts)}"
        if not parts[0].isdigit():
            return f"boxes file line {i}: class {parts[0]!r} is not a non-negative integer"
        try:
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            return f"boxes file line {i}: cx cy w h must be numbers, found {' '.join(parts[1:])!r}"
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            return f"boxes file line {i}: cx cy w h must be normalised to 0..1, found {' '.join(parts[1:])}"
        if w <= 0.0 or h <= 0.0:
            return f"boxes file line {i}: box width and height must be > 0, found w={w} h={h}"
    return None


def _file_problems(df: pd.DataFrame, root: Path, check_files: bool,
                   pixels: dict[int, str] | None = None) -> list[Problem]:
    """Missing files always; with ``check_files`` also unreadable images, grid mismatches, bad boxes.

    Images are read with :func:`medvit.data.io.read_sample` -- the reader training uses -- so a
    row that passes here is a row the datasets can load (channels stacked, one grid). With
    ``pixels``, the SHA-256 of every non-constant image's decoded array is stored there by row
    (to find the same image under two patient ids, whatever its file header says).
    """
    img_cols = image_columns(df)
    extra = [c for c in ("mask", "boxes") if c in df.columns]
    problems: list[Problem] = []
    layouts: dict[int, tuple[int, int]] = {}  # row -> (channels, spatial dims)
    records = df[["_row"] + img_cols + extra].to_dict("records")
    if check_files:
        from tqdm import tqdm

        records = tqdm(records, desc="checking files", unit="row", disable=None, leave=False)
    for rec in records:
        row = int(rec["_row"])
        absent = set()
        for col in img_cols + extra:
            value = rec[col]
            if value == "":  # empty image cells are schema problems; empty mask/boxes mean "none"
                absent.add(col)
            elif not (root / value).exists():
                problems.append(Problem(row, col, f"file not found: {value}"))
                absent.add(col)
        if not check_files:
            continue
        sample = None
        if not absent & set(img_cols):
            try:
                sample = read_sample({c: rec[c] for c in img_cols}, root)
            except ImageReadError as exc:
                problems.append(Problem(row, _column_of(exc.path, rec, img_cols, root), f"unreadable: {exc.reason}"))
            except ConfigError:
                raise  # a bad setting (e.g. $MEDVIT_MAX_PIXELS) is the run's problem, not the row's
            except Exception as exc:  # noqa: BLE001 -- one odd file must not stop the run; the reason is reported
                problems.append(Problem(row, img_cols[0], f"unreadable: {type(exc).__name__}: {exc}"))
            if sample is not None and pixels is not None and np.ptp(sample.array) > 0:  # blank images are not evidence
                pixels[row] = _pixel_digest(sample.array)
            if sample is not None:
                layouts[row] = (sample.shape[0], len(sample.shape) - 1)
        if "mask" in extra and "mask" not in absent:
            try:
                mask = read_image(root / rec["mask"])
            except ImageReadError as exc:
                problems.append(Problem(row, "mask", f"unreadable: {exc.reason}"))
            else:
                values = np.unique(mask.array)
                bad = values[(values < 0) | (values != np.round(values))]
                if mask.shape[0] != 1:
                    problems.append(Problem(row, "mask", f"mask has {mask.shape[0]} channels; expected one channel "
                                                         "of integer labels"))
                elif bad.size:
                    problems.append(Problem(row, "mask", f"mask holds {bad.size} value(s) that are not labels "
                                                         f"(non-negative integers), e.g. {float(bad[0]):g}"))
                elif sample is not None and (mask.shape[1:] != sample.shape[1:]
                                           or not np.allclose(mask.spacing, sample.spacing, rtol=1e-3, atol=1e-4)):
                    problems.append(Problem(row, "mask", f"mask grid {mask.shape[1:]} (spacing {mask.spacing}) differs "
                                                         f"from image grid {sample.shape[1:]} (spacing "
                                                         f"{sample.spacing})"))
        if "boxes" in extra and "boxes" not in absent:
            reason = check_boxes_file(root / rec["boxes"])
            if reason:
                problems.append(Problem(row, "boxes", reason))
    return problems + _layout_problems(layouts, img_cols[0])


def _pixel_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's shape and values, hashed in place (no copy of the pixels)."""
    digest = hashlib.sha256(str(tuple(array.shape)).encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _layout_problems(layouts: dict[int, tuple[int, int]], column: str) -> list[Problem]:
    """Rows whose image differs in channels or dimensionality from most rows (a 4D series
    among 3D volumes, an RGB image among grayscale ones): one model cannot take both."""
    if not layouts:
        return []
    counts: dict[tuple[int, int], int] = {}
    for layout in layouts.values():
        counts[layout] = counts.get(layout, 0) + 1
    (channels, dims), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return [Problem(row, column, f"image has {c} channel(s) and {d} spatial dimensions, but most rows have "
                                 f"{channels} channel(s) and {dims}; one model cannot take both")
            for row, (c, d) in sorted(layouts.items()) if (c, d) != (channels, dims)]


def _column_of(path: Path, rec: dict[str, Any], columns: list[str], root: Path) -> str:
    """The image column whose file raised (read errors name the file); the first one otherwise."""
    for col in columns:
        if rec[col] and Path(path) == root / rec[col]:
            return col
    return columns[0]


# --------------------------------------------------------------------------- allowed roots


def path_columns(df: pd.DataFrame) -> list[str]:
    """Columns holding file paths: the image column(s), ``mask`` and ``boxes``."""
    return image_columns(df) + [c for c in ("mask", "boxes") if c in df.columns]


def allowed_roots(manifest: str | Path, extra: Iterable[str | Path] = ()) -> list[Path]:
    """Folders a manifest's paths may point into: its own folder, the folders listed in
    ``$MEDVIT_DATA_ROOTS`` (``os.pathsep``-separated) and ``extra``. Absolute, normalised."""
    env = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    roots = [Path(manifest).resolve().parent, *(Path(r) for r in env), *(Path(r) for r in extra)]
    return list(dict.fromkeys(Path(os.path.abspath(r)) for r in roots))


def _inside(candidate: str, roots: Sequence[Path]) -> bool:
    for root in roots:
        for form in {os.path.normpath(str(root)), os.path.realpath(root)}:
            if candidate == form or candidate.startswith(form.rstrip(os.sep) + os.sep):
                return True
    return False


#: File that marks a link tree written by ``medvit ingest`` (``medvit.data.ingest``).
LINK_TREE_MARKER = ".medvit-ingest"


def _in_link_tree(folder: str, roots: Sequence[Path]) -> bool:
    """Whether ``folder`` (a real path inside ``roots``) lies in a link tree of ``medvit ingest``."""
    current = Path(folder)
    while _inside(str(current), roots):
        if (current / LINK_TREE_MARKER).is_file():
            return True
        if current.parent == current:
            break
        current = current.parent
    return False


def real_location(path: str | Path, roots: Sequence[Path]) -> str:
    """Where ``path`` really leads: every symbolic link resolved (so ``link/..`` is the folder
    above the link's target, as the OS reads it). One exception: a link to a file inside a link
    tree of ``medvit ingest`` (a folder with :data:`LINK_TREE_MARKER`, inside ``roots``) is
    taken as it stands; those links point at the ingested sources by design."""
    joined = os.fspath(path)
    if not os.path.isabs(joined):
        joined = os.path.join(os.getcwd(), joined)  # not normalised: `..` must apply after each link
    real = os.path.realpath(joined)
    if real == joined or not os.path.islink(joined):
        return real
    parent = os.path.realpath(os.path.dirname(joined))
    if _inside(parent, roots) and _in_link_tree(parent, roots):
        return os.path.join(parent, os.path.basename(joined))
    return real


def outside_root_problems(df: pd.DataFrame, root: Path, roots: Sequence[Path]) -> list[Problem]:
    """One problem per path cell that leaves the allowed roots.

    A path is joined to ``root`` (the manifest's folder) and resolved with every symbolic link
    followed (:func:`real_location`), so ``../../etc/passwd``, ``/etc/passwd`` and
    ``link/../../etc/passwd`` or ``link/passwd`` through a folder link ``link -> /etc`` all leave
    the roots, while the link tree of ``medvit ingest`` stays inside. Nothing is opened.
    """
    problems: list[Problem] = []
    cols = [c for c in path_columns(df) if c in df.columns]
    if not cols or not len(df):
        return problems
    shown = ", ".join(str(r) for r in roots)
    for rec in df[["_row", *cols]].to_dict("records"):
        for col in cols:
            value = rec[col]
            if not isinstance(value, str) or value == "":
                continue
            if "\x00" in value:
                problems.append(Problem(int(rec["_row"]), col, f"path {value!r} contains a NUL character"))
                continue
            lexical = os.path.normpath(os.path.join(str(root), value))
            candidate = real_location(os.path.join(str(root), value), roots)
            if not _inside(candidate, roots):
                how = "resolves to" if candidate == lexical else "leads through a symbolic link to"
                problems.append(Problem(int(rec["_row"]), col,
                                        f"path {value!r} {how} {candidate}, outside the allowed roots "
                                        f"({shown}); paths must stay inside the manifest's folder, or list the "
                                        f"data folder in ${ROOTS_ENV}"))
    return problems


def manifest_roots(study_file: str | Path | None = None) -> list[Path]:
    """Folders a study's manifest file may lie in: the working directory, the study file's
    folder and the folders of ``$MEDVIT_DATA_ROOTS``."""
    env = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    roots = [Path.cwd(), *([Path(study_file).resolve().parent] if study_file is not None else []), *map(Path, env)]
    return list(dict.fromkeys(Path(os.path.abspath(r)) for r in roots))


def manifest_outside_roots(path: str | Path, roots: Sequence[Path]) -> str | None:
    """Where a manifest path really leads (symbolic links followed) when that is outside
    ``roots``; None when it is inside. Nothing is opened."""
    real = real_location(path, roots)
    return None if _inside(real, roots) else real


def _raise_outside(path: Path, problems: list[Problem]) -> None:
    shown = "\n  ".join(str(p) for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ManifestError(f"manifest {path}: {len(problems)} path(s) point outside the allowed roots; nothing was "
                        f"read from them:\n  {shown}{more}")


# --------------------------------------------------------------------------- identifying patient ids

_ID_DATE = re.compile(r"(?<!\d)(?:(?:19|20)\d{2}[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])"
                      r"|(?:0[1-9]|[12]\d|3[01])[-/.](?:0[1-9]|1[0-2])[-/.](?:19|20)\d{2}"
                      r"|(?:0[1-9]|1[0-2])[-/.](?:0[1-9]|[12]\d|3[01])[-/.](?:19|20)\d{2})(?!\d)")
_ID_DIGITS = re.compile(r"\d{6,}")
_MEDVIT_PSEUDONYM = re.compile(r"[PSX][A-Z2-7]{16}")  # medvit.data.ingest.Pseudonymizer's ids
_ID_KINDS = {"space": "spaces (a name?)", "caret": "'^' (a DICOM person name?)", "date": "a date (a birth date?)",
             "digits": "a run of 6 or more digits (an MRN or accession number?)"}
PSEUDONYMIZE_HINT = ("replace them by keyed pseudonyms with `medvit manifest pseudonymize MANIFEST --out NEW.csv` "
                     "(key in $MEDVIT_PSEUDONYM_KEY, kept secret) and use NEW.csv; `identifying_patient_ids: error` "
                     "in the study refuses such ids")
"""How to fix patient ids that look identifying (appended to every such warning)."""


def identifying_id_kinds(value: str) -> list[str]:
    """Why a patient id looks like a name, an MRN or a date: any of ``space``, ``caret``,
    ``date``, ``digits`` (a run of 6+ digits); empty for ids such as ``pat-0042`` or a medvit
    pseudonym."""
    kinds = []
    if re.search(r"\s", value):
        kinds.append("space")
    if "^" in value:
        kinds.append("caret")
    if not _MEDVIT_PSEUDONYM.fullmatch(value):
        if _ID_DATE.search(value):
            kinds.append("date")
        elif _ID_DIGITS.search(value):
            kinds.append("digits")
    return kinds


def identifying_id_warnings(df: pd.DataFrame, hint: bool = True) -> list[str]:
    """Warnings about ``patient_id`` values that look like names, MRNs or dates (they reach
    split.csv and predictions.csv). The values themselves are never shown, only their rows.

    Returns:
        One line per kind of look-alike (spaces, carets, dates, long digit runs) with the
        number of patients and their first rows, then :data:`PSEUDONYMIZE_HINT`; empty when
        every id looks like a code.
    """
    if "patient_id" not in df.columns or not len(df):
        return []
    rows = df["_row"].tolist() if "_row" in df.columns else list(range(1, len(df) + 1))
    hits: dict[str, dict[str, list[int]]] = {k: {} for k in _ID_KINDS}
    for row, pid in zip(rows, df["patient_id"].astype(str)):
        for kind in identifying_id_kinds(pid):
            hits[kind].setdefault(pid, []).append(int(row))
    n_patients = df["patient_id"].nunique()
    lines = []
    for kind, ids in hits.items():
        if ids:
            first = sorted(r for rs in ids.values() for r in rs)
            lines.append(f"patient_id: {len(ids)} of {n_patients} patients have ids with {_ID_KINDS[kind]}, e.g. "
                         f"row{'s' * (len(first) > 1)} "
                         f"{', '.join(map(str, first[:5]))}{' ...' if len(first) > 5 else ''}")
    if lines and hint:
        lines.append(f"patient_id: ids should be codes, not names, MRNs or dates: {PSEUDONYMIZE_HINT}")
    return lines


# --------------------------------------------------------------------------- duplicate images


def duplicate_image_problems(df: pd.DataFrame, fingerprints: dict[int, str],
                             column: str = "split") -> tuple[list[Problem], list[str]]:
    """Identical images under different patient ids (the same patient entered twice?).

    Args:
        df: manifest rows with ``patient_id`` and ``_row``.
        fingerprints: ``{row: content hash}`` (the pixel hashes ``check_files`` computes).
        column: the split column; identical images of different patients in different splits
            are leakage.

    Returns:
        (one manifest-wide problem per group of identical images naming its patients and rows,
        the sorted patients whose identical images sit in different splits).
    """
    groups: dict[str, list[int]] = {}
    for row, digest in fingerprints.items():
        groups.setdefault(digest, []).append(row)
    by_row = df.set_index("_row")
    has_split = column in df.columns
    problems, leaking = [], set()
    for rows in groups.values():
        patients = sorted({str(by_row.at[r, "patient_id"]) for r in rows})
        if len(patients) < 2:
            continue
        rows = sorted(rows)
        splits = sorted({str(by_row.at[r, column]) for r in rows} - {""}) if has_split else []
        where = ", ".join(f"row {r} ({by_row.at[r, 'patient_id']}"
                          + (f", {by_row.at[r, column]}" if has_split and by_row.at[r, column] else "") + ")"
                          for r in rows[:10])
        crosses = len(splits) > 1
        if crosses:
            leaking.update(patients)
        problems.append(Problem(None, "image", f"identical image content under {len(patients)} patient ids "
                                               f"{', '.join(patients[:10])}: {where}; the same patient entered "
                                               "under two ids?" + (" They are in different splits: leakage"
                                                                   if crosses else "")))
    return problems, sorted(leaking)


def leakage_problems(df: pd.DataFrame, column: str = "split") -> list[Problem]:
    """One problem per patient whose rows name more than one split (empty cells are ignored)."""
    if column not in df.columns or "patient_id" not in df.columns:
        return []
    given = df[df[column].isin(SPLITS)]  # invalid values are schema problems, not splits
    per_patient = given.groupby("patient_id", sort=True)[column].unique()
    problems = []
    for patient, splits in per_patient.items():
        if len(splits) > 1:
            rows = given.loc[given["patient_id"] == patient, "_row"].tolist() if "_row" in given.columns else []
            where = f" (rows {', '.join(map(str, rows[:10]))}{' ...' if len(rows) > 10 else ''})" if rows else ""
            problems.append(Problem(None, column, f"patient {patient} appears in more than one split: "
                                                  f"{', '.join(sorted(map(str, splits)))}{where}"))
    return problems


def _collect_problems(df: pd.DataFrame, root: Path, check_files: bool, read_problems: list[Problem],
                      roots: Sequence[Path] | None = None, pixels: dict[int, str] | None = None) -> list[Problem]:
    columns = list(df.columns)
    # Paths outside the allowed roots are reported and never opened (not even checked for existence).
    outside = outside_root_problems(df, root, roots) if roots is not None else []
    inside = df[~df["_row"].isin({p.row for p in outside})]
    pixels = {} if pixels is None else pixels
    row_problems = (read_problems + _schema_problems(df) + _duplicate_problems(df) + outside
                    + _file_problems(inside, root, check_files, pixels if check_files else None))
    row_problems.sort(key=lambda p: (p.row, columns.index(p.column) if p.column in columns else -1))
    bad = {p.row for p in row_problems}
    duplicates, _ = duplicate_image_problems(df, {r: d for r, d in pixels.items() if r not in bad})
    return row_problems + leakage_problems(df) + duplicates


def _add_sample_id(df: pd.DataFrame) -> pd.DataFrame:
    if "sample_id" not in df.columns:
        df.insert(len(df.columns) - 1, "sample_id", [f"r{r}" for r in df["_row"]])
    return df


# --------------------------------------------------------------------------- public API


def load_manifest(path: str | Path, check_files: bool = False, min_rows: int = 1,
                  confine: bool | None = None) -> Manifest:
    """Load a manifest, quarantining bad rows.

    Args:
        path: the manifest CSV; relative paths inside it are resolved against its folder.
        check_files: also open every image and mask (``medvit.data.io.read_image``) and parse
            every box file; without it only their existence is checked.
        min_rows: fewest usable rows accepted.
        confine: refuse paths outside :func:`allowed_roots` before any file is touched.
            Default: ``check_files``, i.e. where a user's manifest enters the pipeline
            (``medvit split``); the split manifests medvit writes under ``results/`` point
            back into that checked manifest's folder.

    Returns:
        The :class:`Manifest`; ``problems`` lists every quarantined row with its reason, and
        (manifest-wide, with ``check_files``; also logged as warnings) identical images found
        under different patient ids, marked as leakage when they sit in different splits.

    Raises:
        ManifestError: the manifest is unusable, a path leaves the allowed roots (``confine``),
            or fewer than ``min_rows`` rows remain.
        LeakageError: a ``split`` column puts a patient in more than one split.
    """
    path = Path(path)
    df, read_problems = _read(path)
    root = path.resolve().parent
    if check_files if confine is None else confine:
        outside = outside_root_problems(df, root, allowed_roots(path))
        if outside:
            _raise_outside(path, outside)
    problems = _collect_problems(df, root, check_files, read_problems)
    leaking = leaking_patients(df)
    if leaking:
        raise LeakageError(leaking,
                           detail=f"manifest {path}, column split; all samples of a patient must be in one split")
    bad_rows = {p.row for p in problems if p.row is not None}
    n_rows = len(df) + len({p.row for p in read_problems})
    keep = df[~df["_row"].isin(bad_rows)].reset_index(drop=True)
    for p in problems:
        if p.row is None and p.column == "image":  # identical images under several ids: flagged, not refused
            logger.warning("manifest %s: %s", path, p)
    if bad_rows:
        logger.warning("manifest %s: quarantined %d of %d rows", path, len(bad_rows), n_rows)
        for p in problems:
            if p.row is not None:
                logger.warning("  %s", p)
    if len(keep) < max(min_rows, 1):
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"manifest {path}: only {len(keep)} of {n_rows} rows are usable "
                            f"(at least {max(min_rows, 1)} needed); problems:\n  {shown}{more}")
    return Manifest(df=_add_sample_id(keep), path=path, root=root, problems=problems)


def leaking_patients(df: pd.DataFrame, column: str = "split") -> list[str]:
    """Sorted patients whose rows name more than one split (empty cells are ignored)."""
    if column not in df.columns:
        return []
    given = df[df[column].isin(SPLITS)]
    counts = given.groupby("patient_id")[column].nunique()
    return sorted(map(str, counts[counts > 1].index))


def validate_manifest(path: str | Path, check_files: bool = True) -> ValidationReport:
    """Check a manifest and summarise it; never raises for a bad manifest.

    Args:
        path: the manifest CSV.
        check_files: open every image/mask and parse every box file (else existence only).

    Returns:
        A :class:`ValidationReport`. An unusable manifest (missing, empty, not a CSV, missing
        required columns) gives ``ok=False`` with one manifest-wide problem and an empty summary.
    """
    path = Path(path)
    try:
        df, read_problems = _read(path)
    except ManifestError as exc:
        return ValidationReport(path=path, ok=False, problems=[Problem(None, None, str(exc))], summary={})
    problems = _collect_problems(df, path.resolve().parent, check_files, read_problems, roots=allowed_roots(path))
    bad_rows = {p.row for p in problems if p.row is not None}
    usable = _add_sample_id(df[~df["_row"].isin(bad_rows)].reset_index(drop=True))
    n_rows = len(df) + len({p.row for p in read_problems})
    summary = {"rows": n_rows, "quarantined": len(bad_rows), "checked_files": check_files, **manifest_summary(usable)}
    return ValidationReport(path=path, ok=not problems, problems=problems, summary=summary,
                            warnings=identifying_id_warnings(df))


def _counts(df: pd.DataFrame, groups: dict[str, pd.Series]) -> dict[str, dict[str, int]]:
    return {name: {"patients": int(df.loc[mask, "patient_id"].nunique()), "samples": int(mask.sum())}
            for name, mask in groups.items()}


def finding_sets(df: pd.DataFrame) -> pd.Series:
    """Per-row set of findings from the ``labels`` column (empty set for no finding)."""
    return df["labels"].map(lambda v: frozenset(t for t in str(v).split("|") if t))


def manifest_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Counts that describe a manifest (also used by the report).

    Args:
        df: manifest rows (e.g. ``Manifest.df``).

    Returns:
        ``patients``, ``samples``, ``image_columns``, ``extra_columns`` (unknown columns,
        kept and ignored); ``studies`` with a ``study_id`` column; ``classes``
        (``{class: {"patients", "samples"}}``) with a ``label`` column; ``findings`` (same form,
        plus ``"(no finding)"``) with a ``labels`` column; ``splits`` (same form per split,
        ``"(unassigned)"`` for empty cells) with a ``split`` column.
    """
    out: dict[str, Any] = {
        "patients": int(df["patient_id"].nunique()) if "patient_id" in df.columns else 0,
        "samples": int(len(df)),
        "image_columns": image_columns(df),
        "extra_columns": [c for c in df.columns if c not in KNOWN_COLUMNS and c not in RESERVED_COLUMNS
                          and c not in channel_columns(df)],
    }
    if "study_id" in df.columns:
        out["studies"] = int(df.loc[df["study_id"] != "", "study_id"].nunique())
    if "label" in df.columns:
        out["classes"] = _counts(df, {c: df["label"] == c for c in class_names(df)})
    if "labels" in df.columns:
        sets = finding_sets(df)
        groups = {f: sets.map(lambda s, f=f: f in s) for f in finding_names(df)}
        groups["(no finding)"] = sets.map(len) == 0
        out["findings"] = _counts(df, groups)
    if "split" in df.columns:
        groups = {s: df["split"] == s for s in SPLITS if (df["split"] == s).any()}
        if (df["split"] == "").any():
            groups["(unassigned)"] = df["split"] == ""
        out["splits"] = _counts(df, groups)
    return out


def _fmt_counts(counts: dict[str, dict[str, int]]) -> list[str]:
    width = max([16] + [len(n) for n in counts])
    return ([f"    {'':<{width}} {'patients':>9} {'samples':>9}"]
            + [f"    {name:<{width}} {c['patients']:>9} {c['samples']:>9}" for name, c in counts.items()])


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def format_report(report: ValidationReport) -> str:
    """Render a :class:`ValidationReport` for the terminal (``medvit manifest validate``)."""
    s = report.summary
    status = "OK" if report.ok else f"NOT OK ({_n(len(report.problems), 'problem')}"
    if s.get("quarantined"):
        status += f", {s['quarantined']} of {s['rows']} rows quarantined"
    status += "" if report.ok else ")"
    lines = [f"manifest: {report.path}", f"status:   {status}"]
    if s:
        lines.append(f"usable:   {_n(s['samples'], 'sample')} from {_n(s['patients'], 'patient')}"
                     + (f", {_n(s['studies'], 'study', 'studies')}" if "studies" in s else "")
                     + f" ({_n(s['rows'], 'row')} read)")
        checked = "  (files opened and checked)" if s["checked_files"] else "  (existence only, --no-check-files)"
        lines.append(f"images:   {', '.join(s['image_columns'])}" + checked)
        if s.get("extra_columns"):
            lines.append(f"extra:    {', '.join(s['extra_columns'])} (kept, ignored by the pipeline)")
        for key, title in (("classes", "classes (label)"), ("findings", "findings (labels)"), ("splits", "splits")):
            if key in s:
                lines.append(f"{title}:")
                lines.extend(_fmt_counts(s[key]) if s[key] else ["    (none)"])
        if "splits" not in s:
            lines.append("splits:   none given; the pipeline makes a patient-level split from the study seed")
    if report.warnings:
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in report.warnings)
    if report.problems:
        lines.append("problems:")
        lines.extend(f"  {p}" for p in report.problems)
        if any(p.row is not None for p in report.problems):
            lines.append("rows with problems are quarantined (left out) when the pipeline runs; "
                         "paths are relative to the manifest's folder")
        if any(p.row is None and p.column == "split" for p in report.problems):
            lines.append("a patient in more than one split stops the pipeline: give all of a patient's rows one split")
    return "\n".join(lines)


def class_names(df: pd.DataFrame, column: str = "label") -> list[str]:
    """Sorted distinct non-empty values of a single-label column.

    Raises:
        ManifestError: the column is missing.
    """
    if column not in df.columns:
        raise ManifestError(f"the manifest has no {column!r} column (columns: {', '.join(map(str, df.columns))})")
    return sorted({str(v) for v in df[column] if str(v) != ""})


def finding_names(df: pd.DataFrame) -> list[str]:
    """Sorted distinct findings of the ``|``-separated ``labels`` column.

    Raises:
        ManifestError: there is no ``labels`` column.
    """
    if "labels" not in df.columns:
        raise ManifestError(f"the manifest has no 'labels' column (columns: {', '.join(map(str, df.columns))})")
    return sorted(set().union(*finding_sets(df))) if len(df) else []


__all__ = [
    "Manifest", "Problem", "ValidationReport", "SPLITS", "SUPERVISED_SPLITS", "SCHEMA_PATH", "load_manifest",
    "validate_manifest",
    "format_report", "manifest_summary", "class_names", "finding_names", "finding_sets", "image_columns",
    "channel_columns", "check_boxes_file", "leakage_problems", "leaking_patients", "manifest_schema",
    "ROOTS_ENV", "allowed_roots", "outside_root_problems", "LINK_TREE_MARKER", "real_location", "manifest_roots",
    "manifest_outside_roots", "identifying_id_kinds", "identifying_id_warnings", "PSEUDONYMIZE_HINT", "path_columns",
    "duplicate_image_problems",
]
