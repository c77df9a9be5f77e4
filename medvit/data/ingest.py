"""Turn a folder of DICOM, NIfTI and other images into a pseudonymised manifest (Contract 1).

``ingest(DIR, OUT/manifest.csv)`` walks DIR and groups DICOM files by patient, study and
series. A cross-sectional series becomes one 3D sample. Every sample is read once to prove
that it loads. The outputs are:

* ``manifest.csv``: ``patient_id, study_id, sample_id, image, modality, source_format,
  n_files, shape, spacing``. The ids are keyed HMAC-SHA256 pseudonyms, never raw DICOM values.
* ``<manifest stem>_images/``: a tree of links named by those pseudonyms and pointing at
  the source files. The manifest's ``image`` paths point into this tree, so they never
  reveal a source folder named after a patient.
* ``quarantine.csv``: every file that is not in the manifest, with the reason. Path
  components that contain identifiers found in the DICOM headers are redacted.

Every file under DIR ends up in exactly one of manifest (as or within a sample) and
quarantine. The rules are described in ``docs/io.md``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medvit.data.io import ImageData, detect_format, read_dicom_header, read_image
from medvit.data.io.dicom import _is_dicomdir, _modality
from medvit.data.manifest import LINK_TREE_MARKER, _read, path_columns
from medvit.errors import ImageReadError, MedvitError
from medvit.system import available_cpus

__all__ = [
    "ENV_KEY",
    "IngestError",
    "IngestResult",
    "MANIFEST_COLUMNS",
    "PseudonymKeyError",
    "Pseudonymizer",
    "QUARANTINE_COLUMNS",
    "ingest",
    "key_weakness",
    "pseudonymize_manifest",
    "resolve_key",
]

ENV_KEY = "MEDVIT_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 16
MANIFEST_COLUMNS = ["patient_id", "study_id", "sample_id", "image", "modality", "source_format", "n_files",
                    "shape", "spacing"]
QUARANTINE_COLUMNS = ["file", "reason", "patient_id"]
_MARKER = LINK_TREE_MARKER  # manifest checks take the links in such a tree as they stand
_PROGRESS_MIN_FILES = 200

# DICOM objects that carry pixels but are not images to learn from (or carry none at all).
NON_IMAGE_MODALITIES = {
    "SEG": "a segmentation; give it to the manifest as a `mask` column",
    "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan", "RTDOSE": "RT dose grid", "RTRECORD": "RT record",
    "SR": "structured report", "KO": "key object selection", "PR": "presentation state", "REG": "registration",
    "RWV": "real world value map", "ECG": "waveform", "HD": "waveform", "AU": "audio", "DOC": "document",
    "FID": "fiducials", "PLAN": "plan",
}
# Header elements whose values identify a patient, a person, a place or a visit: the attributes
# of the DICOM PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1) that hold
# text. Their values, found anywhere in a header (sequences included), are redacted from the
# paths and reasons of quarantine.csv. Names, ids, places and stations are matched word by word
# (a folder `Quimby_Zebediah` for `Quimby^Zebediah`); the other values (dates, times, UIDs,
# descriptions, comments) only as whole values, so that common words stay readable.
_IDENTIFYING_WORDS = (
    "PatientID", "PatientName", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID",
    "MedicalRecordLocator", "AccessionNumber", "StudyID", "AdmissionID", "RequestedProcedureID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "InsurancePlanIdentification", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "PerformedStationName",
    "ScheduledStationName", "PerformedStationAETitle", "ScheduledStationAETitle", "PerformedLocation",
    "ScheduledProcedureStepLocation", "CurrentPatientLocation", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PhysiciansOfRecord",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician",
    "ScheduledPerformingPhysicianName", "ConsultingPhysicianName", "ReviewerName", "VerifyingObserverName",
    "PersonName", "PersonAddress", "PersonTelephoneNumbers", "ContentCreatorName", "ResponsiblePerson",
    "ResponsibleOrganization", "RequestingService", "DistributionName", "DistributionAddress",
    "BranchOfService", "MilitaryRank", "Occupation", "RegionOfResidence", "CountryOfResidence",
    "DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID", "GeneratorID",
)
_IDENTIFYING_WHOLE = (
    "PatientBirthDate", "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
    "PatientReligiousPreference", "PatientComments", "AdditionalPatientHistory", "AdmittingDiagnosesDescription",
    "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState",
    "VisitComments", "StudyDescription", "SeriesDescription", "PerformedProcedureStepDescription",
    "ScheduledProcedureStepDescription", "RequestedProcedureDescription", "ProtocolName", "ImageComments",
    "DerivationDescription", "ReasonForStudy", "RequestedContrastAgent", "TextComments", "StudyComments",
    "InterpretationRecorder", "InterpretationTranscriber", "InterpretationAuthor",
)
# Value representations whose values are identifying wherever they occur: person names (word by
# word) and dates, times and instance UIDs (whole values; class UIDs name standard objects).
_WORD_VRS = {"PN"}
_WHOLE_VRS = {"DA", "DT", "TM", "UI"}


class IngestError(MedvitError):
    """The input folder or the output location cannot be used for ingest."""


class PseudonymKeyError(IngestError):
    """No usable pseudonymisation key was given."""


def resolve_key(key: str | None = None) -> str:
    """Return the pseudonymisation key from ``key`` or ``$MEDVIT_PSEUDONYM_KEY``.

    Raises:
        PseudonymKeyError: neither is set, the key is shorter than 16 characters, or it has
            too little entropy (:func:`key_weakness`): a guessable key lets anyone reverse every
            pseudonym by trying IDs.
    """
    value = key if key else os.environ.get(ENV_KEY, "")
    how = (f"pass --key KEY or set the environment variable {ENV_KEY} to a secret of at least {MIN_KEY_LENGTH} "
           "characters, e.g. `export MEDVIT_PSEUDONYM_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')`"
           "; keep it secret and reuse it so that later ingests give the same pseudonyms")
    if not value:
        raise PseudonymKeyError(f"no pseudonymisation key: {how}")
    if len(value) < MIN_KEY_LENGTH:
        raise PseudonymKeyError(f"pseudonymisation key is too short ({len(value)} characters): {how}")
    weakness = key_weakness(value)
    if weakness:
        raise PseudonymKeyError(f"pseudonymisation key has too little entropy ({weakness}); it could be guessed: {how}")
    return value


MIN_KEY_BITS = 32
"""Least entropy a key must show, estimated from its character frequencies (Shannon, per
character, times the length): 16 spaces or zeros have 0, a random 16-digit hex key about 50."""


def key_weakness(key: str) -> str | None:
    """Why ``key`` is too predictable to be a pseudonymisation key, or None.

    Refused: fewer than 6 distinct characters, a repetition of a shorter pattern
    (``passwordpassword``), mostly runs of neighbouring characters (``1234567890123456``,
    ``aaaabbbbcccc``), or fewer than :data:`MIN_KEY_BITS` bits estimated from its character
    frequencies. The key itself is never part of the answer.
    """
    n = len(key)
    counts = Counter(key)
    if len(counts) < 6:
        return f"only {len(counts)} distinct character{'s' * (len(counts) != 1)}; at least 6 needed"
    period = next((p for p in range(1, n // 2 + 1) if n % p == 0 and key == key[:p] * (n // p)), None)
    if period is not None:
        return f"it repeats a {period}-character pattern"
    steps = sum(abs(ord(a) - ord(b)) <= 1 for a, b in zip(key, key[1:])) / max(1, n - 1)
    if steps >= 0.75:
        return "it is mostly runs of repeated or consecutive characters"
    bits = n * -sum(c / n * math.log2(c / n) for c in counts.values())
    if bits < MIN_KEY_BITS:
        return f"about {bits:.0f} bits estimated from its character frequencies; at least {MIN_KEY_BITS} needed"
    return None


class Pseudonymizer:
    """Keyed, deterministic pseudonyms: HMAC-SHA256(key, kind + value), base32, 16 characters.

    ``kind`` separates the namespaces (patient, study, sample), so the same string gets
    different pseudonyms in different roles. The alphabet (A-Z, 2-7) never contains 0, 1, 8
    or 9, so a pseudonym can never reproduce a numeric patient ID.
    """

    _PREFIX = {"patient": "P", "study": "S", "sample": "X"}

    def __init__(self, key: str):
        self._key = key.encode("utf-8")

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode("utf-8"), hashlib.sha256).digest()
        return self._PREFIX[kind] + base64.b32encode(digest[:10]).decode("ascii")

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(key=<hidden>)"


@dataclass
class IngestResult:
    """What :func:`ingest` wrote and counted."""

    manifest: Path
    quarantine: Path
    images_dir: Path
    n_files: int
    n_samples: int
    n_patients: int
    n_studies: int
    n_quarantined: int
    formats: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    workers: int = 1

    def summary(self) -> str:
        """A few lines for the terminal; never contains identifiers."""
        lines = [f"ingest: {self.n_files} files -> {self.n_samples} samples from {self.n_patients} patients "
                 f"({self.n_studies} studies); {self.n_quarantined} files quarantined"]
        lines.append(f"  manifest:    {self.manifest}")
        lines.append(f"  quarantine:  {self.quarantine}")
        lines.append(f"  image links: {self.images_dir}{os.sep} (pseudonymised names; keep it beside the manifest)")
        if self.formats:
            lines.append("  samples by format: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        if self.reasons:
            lines.append("  quarantine reasons:")
            for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
                lines.append(f"    {count:6d}  {reason}")
            if len(self.reasons) > 10:
                lines.append(f"    ... and {len(self.reasons) - 10} more kinds (see quarantine.csv)")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.n_samples == 0:
            lines.append("  no readable images were found; quarantine.csv says why each file was rejected")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# internal records


@dataclass
class _File:
    path: Path          # absolute source path
    rel: str            # posix path relative to the input folder
    fmt: str            # detect_format result
    patient: str        # source of the patient pseudonym ("id:...", "name:...", "folder:...")
    study: str          # source of the study pseudonym
    series: str | None = None
    sop: str | None = None
    modality: str | None = None
    frames: int = 1
    geometry: bool = False


@dataclass
class _Row:
    patient_id: str
    study_id: str
    sample_id: str
    image: str
    modality: str
    source_format: str
    n_files: int
    shape: str
    spacing: str


class _Quarantine:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, rel: str, reason: str, patient_id: str = "") -> None:
        self.rows.append((rel, reason, patient_id))


# --------------------------------------------------------------------------------------
# public entry point


def ingest(src_dir: str | os.PathLike[str], out_manifest: str | os.PathLike[str], key: str | None = None,
           workers: int | str = "auto") -> IngestResult:
    """Build a pseudonymised manifest from every image under ``src_dir``.

    Args:
        src_dir: folder to walk (recursively; symbolic links to folders are not followed).
        out_manifest: manifest CSV to write. ``quarantine.csv`` and the link folder
            ``<stem>_images/`` are written beside it.
        key: pseudonymisation key; default ``$MEDVIT_PSEUDONYM_KEY``. Never written anywhere.
        workers: processes that read headers and images: ``"auto"`` (one per available core,
            at most 8, and 1 below :data:`_PARALLEL_MIN_FILES` files, where starting them costs
            more than it saves) or a number (1: everything in this process). The outputs do not
            depend on it.

    Returns:
        :class:`IngestResult` with counts and a :meth:`~IngestResult.summary`.

    Raises:
        IngestError: ``src_dir`` is missing, not a folder or holds no files, or the outputs
            cannot be written.
        PseudonymKeyError: no key (or a key shorter than 16 characters).
    """
    src = Path(src_dir)
    if not src.exists():
        raise IngestError(f"input folder {src} does not exist")
    if not src.is_dir():
        raise IngestError(f"{src} is not a folder; `medvit ingest` takes a folder of DICOM/NIfTI/image files")
    pseudo = Pseudonymizer(resolve_key(key))
    manifest = Path(out_manifest)
    if manifest.suffix.lower() != ".csv":
        raise IngestError(f"manifest path {manifest} must end in .csv")
    out_dir = manifest.parent
    quarantine_path = out_dir / "quarantine.csv"
    images_dir = out_dir / f"{manifest.stem}_images"
    files, unlisted = _walk(src, exclude_files={manifest, quarantine_path}, exclude_dir=images_dir)
    if not files and not unlisted:
        raise IngestError(f"input folder {src} holds no files; point `medvit ingest` at the folder with the images")
    n_workers = _resolve_workers(workers, len(files))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IngestError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
    _reset_images_dir(images_dir)

    quarantine = _Quarantine()
    for folder, reason in unlisted:  # folders os.walk could not open: their files are unknown
        quarantine.add(folder, reason)
    identifiers: set[tuple[str, bool]] = set()
    rows: list[_Row] = []
    # Per-file problems go to quarantine.csv; pydicom's warnings would only repeat them on
    # stderr, and some quote header values.
    builder = _Builder(pseudo, images_dir, out_dir, quarantine)
    with warnings.catch_warnings(), _quiet_pydicom(), _Pool(n_workers, builder) as pool:
        warnings.simplefilter("ignore")
        dicom, others = _scan(src, files, quarantine, identifiers, pool)
        units: list[tuple[str, Any]] = [("group", g) for g in _group_dicom(dicom)] + [("single", f) for f in others]
        with tqdm(total=len(units), desc="ingest: reading images", unit="sample", file=sys.stderr,
                  disable=len(files) < _PROGRESS_MIN_FILES) as bar:
            for unit_rows, unit_quarantine, failed in pool.map(_build_unit, units, chunksize=4):
                rows.extend(unit_rows)
                quarantine.rows.extend(unit_quarantine)
                builder.n_volumes_failed += failed
                bar.update()

    rows.sort(key=lambda r: (r.patient_id, r.study_id, r.sample_id))
    redact = _Redactor(identifiers)
    q_rows = sorted((redact.path(rel), redact.text(reason), pid) for rel, reason, pid in quarantine.rows)
    _write_csv(manifest, MANIFEST_COLUMNS, [[getattr(r, c) for c in MANIFEST_COLUMNS] for r in rows])
    _write_csv(quarantine_path, QUARANTINE_COLUMNS, [list(r) for r in q_rows])

    n_in_samples = sum(r.n_files for r in rows)
    if n_in_samples + len(q_rows) != len(files) + len(unlisted):  # the accounting promise
        raise IngestError(f"internal error: {len(files)} files but {n_in_samples} in samples and {len(q_rows)} "
                          "quarantined; please report this")
    reasons = Counter(_reason_kind(reason) for _, reason, _ in q_rows)
    notes = builder.notes(rows, others)
    return IngestResult(
        manifest=manifest, quarantine=quarantine_path, images_dir=images_dir, n_files=len(files),
        n_samples=len(rows), n_patients=len({r.patient_id for r in rows}),
        n_studies=len({r.study_id for r in rows}), n_quarantined=len(q_rows),
        formats=dict(Counter(r.source_format for r in rows)), reasons=dict(reasons), notes=notes,
        workers=n_workers,
    )


_PARALLEL_MIN_FILES = 500
_MAX_WORKERS = 8


def _resolve_workers(workers: int | str, n_files: int) -> int:
    if workers == "auto":
        return 1 if n_files < _PARALLEL_MIN_FILES else max(1, min(available_cpus(), _MAX_WORKERS))
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(workers, bool):
        raise IngestError(f"workers must be 'auto' or a whole number >= 1, not {workers!r}")
    return n


class _Pool:
    """``map`` over this process (1 worker) or a process pool that has the builder.

    Worker processes are forked where the platform allows (they inherit the imports and the
    builder, so starting them costs milliseconds); results come back in input order, so the
    outputs are the same for any number of workers.
    """

    def __init__(self, workers: int, builder: _Builder):
        self.workers, self.builder, self._executor = workers, builder, None

    def __enter__(self) -> _Pool:
        global _BUILDER
        _BUILDER = self.builder
        if self.workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                                 initializer=_init_worker, initargs=(self.builder,))
        return self

    def __exit__(self, *exc: Any) -> None:
        global _BUILDER
        _BUILDER = None
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def map(self, fn, items: list, chunksize: int):
        if self._executor is None:
            return map(fn, items)
        return self._executor.map(fn, items, chunksize=chunksize)


_BUILDER: _Builder | None = None  # the builder of the ingest in progress (this process or a worker)


def _init_worker(builder: _Builder) -> None:
    global _BUILDER
    _BUILDER = builder
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _build_unit(unit: tuple[str, Any]) -> tuple[list[_Row], list[tuple[str, str, str]], int]:
    """Read one DICOM group or one other file into manifest rows (in this process or a worker):
    its rows, its quarantine entries and whether a series failed to stack."""
    builder = _BUILDER
    assert builder is not None
    local = _Builder(builder.pseudo, builder.images_dir, builder.out_dir, _Quarantine())
    kind, item = unit
    rows = local.dicom_group(item) if kind == "group" else local.single(item, [item])
    return rows, local.quarantine.rows, local.n_volumes_failed


# --------------------------------------------------------------------------------------
# walking and scanning


def _walk(src: Path, exclude_files: set[Path], exclude_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """All files below ``src`` (sorted), and the folders that could not be listed."""
    excluded = {os.path.abspath(p) for p in exclude_files}
    skip_dir = os.path.abspath(exclude_dir)
    out: list[Path] = []
    unlisted: list[tuple[str, str]] = []

    def onerror(exc: OSError) -> None:
        rel = Path(os.path.relpath(exc.filename, src)).as_posix() if exc.filename else "."
        unlisted.append((rel, f"cannot list folder ({exc.strerror}); its files were not read"))

    for root, dirs, names in os.walk(src, followlinks=False, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != skip_dir)
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.abspath(path) not in excluded:
                out.append(Path(path))
    return out, unlisted


def _reset_images_dir(images_dir: Path) -> None:
    if images_dir.exists() or images_dir.is_symlink():
        if not (images_dir / _MARKER).is_file():
            raise IngestError(f"{images_dir} exists and was not written by `medvit ingest`; refusing to replace it "
                              "(move it away or choose another manifest name)")
        shutil.rmtree(images_dir)  # links only: rmtree never follows them into the sources
    images_dir.mkdir(parents=True)
    (images_dir / _MARKER).write_text("Links written by `medvit ingest`; this folder is replaced on the next ingest.\n")


class _quiet_pydicom:
    def __enter__(self):
        self._logger = logging.getLogger("pydicom")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False


def _text(value: Any) -> str:
    if value is None:
        return ""
    try:
        return str(value).strip()
    except Exception:
        return ""


def _scan(src: Path, files: list[Path], quarantine: _Quarantine, identifiers: set[tuple[str, bool]],
          pool: _Pool) -> tuple[list[_File], list[_File]]:
    """Classify every file; read DICOM headers (no pixels) for grouping."""
    dicom: list[_File] = []
    others: list[_File] = []
    scanned = pool.map(_scan_one, [(src, path) for path in files], chunksize=64)
    for kind, record, found in tqdm(scanned, total=len(files), desc="ingest: reading headers", unit="file",
                                    file=sys.stderr, disable=len(files) < _PROGRESS_MIN_FILES):
        identifiers.update(found)
        if kind == "dicom":
            dicom.append(record)
        elif kind == "other":
            others.append(record)
        else:
            quarantine.add(*record)
    return dicom, others


def _scan_one(task: tuple[Path, Path]) -> tuple[str, Any, set[tuple[str, bool]]]:
    """One file's kind (``dicom``, ``other`` or ``quarantine``), its record (a :class:`_File`,
    or ``(rel, reason)``) and the identifiers its header holds."""
    src, path = task
    rel = path.relative_to(src).as_posix()
    parent = path.parent.relative_to(src).as_posix()
    try:
        fmt = detect_format(path)
        if fmt != "dicom":
            # non-DICOM: the first folder below the input folder, or the file's own name
            patient = f"folder:{rel.split('/', 1)[0]}" if "/" in rel else f"name:{_stem(path.name)}"
            return "other", _File(path, rel, fmt, patient=patient, study=f"folder:{parent}"), set()
        ds = read_dicom_header(path)
    except ImageReadError as exc:
        return "quarantine", (rel, exc.reason), set()
    found = _identifiers(ds)
    if "Rows" not in ds:  # no image module: DICOMDIR, reports, plans, waveforms, ...
        what = "DICOMDIR directory index" if _is_dicomdir(ds) else (f"{_modality(ds)} object" if _modality(ds) else "")
        return "quarantine", (rel, "no pixel data" + (f" ({what})" if what else "")), found
    modality = _modality(ds)
    if modality in NON_IMAGE_MODALITIES:
        return "quarantine", (rel,
                              f"non-image DICOM object (Modality {modality}: {NON_IMAGE_MODALITIES[modality]})"), found
    patient_id, name = _text(ds.get("PatientID")), _text(ds.get("PatientName"))
    patient = f"id:{patient_id}" if patient_id else (f"name:{name}" if name.strip("^= ") else f"folder:{parent}")
    study_uid = _text(ds.get("StudyInstanceUID"))
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:
        frames = 1  # read_image will reject the file with the exact reason
    return "dicom", _File(
        path, rel, "dicom", patient=patient, study=f"uid:{study_uid}" if study_uid else f"folder:{parent}",
        series=_text(ds.get("SeriesInstanceUID")) or None, sop=_text(ds.get("SOPInstanceUID")) or None,
        modality=modality, frames=frames,
        geometry=ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient") is not None,
    ), found


def _stem(name: str) -> str:
    lower = name.lower()
    return name[: -len(".nii.gz")] if lower.endswith(".nii.gz") else os.path.splitext(name)[0]


def _identifiers(ds) -> set[tuple[str, bool]]:
    """``(value, by_word)`` for every identifying value in a header (sequences included):
    by_word values redact any path component sharing a word with them, the others only where
    the whole value appears."""
    out: set[tuple[str, bool]] = set()
    words, whole = set(_IDENTIFYING_WORDS), set(_IDENTIFYING_WHOLE)
    try:
        elements = list(ds.iterall())
    except Exception:
        return out
    for elem in elements:
        try:
            keyword, vr = elem.keyword or "", str(elem.VR)
            if vr == "SQ" or not (keyword in words or keyword in whole or vr in _WORD_VRS or vr in _WHOLE_VRS):
                continue
            if vr == "UI" and (keyword.endswith("ClassUID") or keyword in ("TransferSyntaxUID", "CodingSchemeUID")):
                continue
            value = elem.value
        except Exception:
            continue
        if value is None or isinstance(value, (bytes, bytearray)):
            continue
        by_word = keyword in words or vr in _WORD_VRS
        values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            text = _text(v)
            if len(text) < 3:
                continue
            out.add((text.lower(), by_word))
            if vr == "PN" or by_word:  # Doe^Jane: also "doe", "jane" and "doejane"
                parts = [q.strip() for q in re.split(r"[\^=]", text) if q.strip()]
                out.update((q.lower(), True) for q in parts if len(q) >= 3)
                joined = "".join(parts)
                if len(parts) > 1 and len(joined) >= 3:
                    out.add((joined.lower(), True))
    return out


def _group_dicom(files: list[_File]) -> list[list[_File]]:
    groups: dict[tuple[str, str, str], list[_File]] = defaultdict(list)
    for f in files:
        series = f"series:{f.series}" if f.series else f"file:{f.rel}"
        groups[(f.patient, f.study, series)].append(f)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------
# building samples


class _Builder:
    def __init__(self, pseudo: Pseudonymizer, images_dir: Path, out_dir: Path, quarantine: _Quarantine):
        self.pseudo = pseudo
        self.images_dir = images_dir
        self.out_dir = out_dir
        self.quarantine = quarantine
        self.n_volumes_failed = 0

    def _ids(self, f: _File, sample_src: str) -> tuple[str, str, str]:
        # The sample pseudonym is scoped by the group (patient, study, series): copies of one SOP
        # instance that disagree on those (edited or damaged headers) must not share a sample_id
        # or overwrite each other's link.
        return (self.pseudo("patient", f.patient), self.pseudo("study", f.study),
                self.pseudo("sample", f"{f.patient}\x00{f.study}\x00{f.series}\x00{sample_src}"))

    def _row(self, ids: tuple[str, str, str], link: Path, img: ImageData, f: _File, n_files: int) -> _Row:
        return _Row(
            patient_id=ids[0], study_id=ids[1], sample_id=ids[2],
            image=Path(os.path.relpath(link, self.out_dir)).as_posix(),
            modality=f.modality or "", source_format=img.source_format, n_files=n_files,
            shape="x".join(str(s) for s in img.shape), spacing="x".join(f"{s:.6g}" for s in img.spacing),
        )

    def dicom_group(self, group: list[_File]) -> list[_Row]:
        by_sop: dict[str, list[_File]] = defaultdict(list)
        for f in group:
            by_sop[f.sop or f"file:{f.rel}"].append(f)
        instances = [by_sop[k] for k in sorted(by_sop)]
        volume = (len(instances) > 1 and group[0].series is not None
                  and all(c[0].geometry and c[0].frames == 1 for c in instances))
        if not volume:
            rows: list[_Row] = []
            for candidates in instances:
                rows.extend(self.single(candidates[0], candidates))
            return rows
        return self.volume(group[0], instances)

    def single(self, first: _File, candidates: list[_File]) -> list[_Row]:
        """One file is one sample. Duplicates (same SOPInstanceUID) are tried in order and the
        first that reads is kept."""
        sample_src = f"sop:{first.sop}" if first.sop else f"file:{first.rel}"
        ids = self._ids(first, sample_src)
        ext = ".dcm" if first.fmt == "dicom" else (".nii.gz" if first.rel.lower().endswith(".nii.gz")
                                                   else Path(first.rel).suffix.lower())
        link = self.images_dir / ids[0] / ids[1] / f"{ids[2]}{ext}"
        kept: _File | None = None
        row: list[_Row] = []
        failures: list[tuple[_File, str]] = []
        for f in candidates:
            _make_link(f.path, link, self.images_dir)
            try:
                img = read_image(link)
            except ImageReadError as exc:
                link.unlink()
                failures.append((f, exc.reason))
                continue
            kept, row = f, [self._row(ids, link, img, f, 1)]
            break
        for f, reason in failures:
            self.quarantine.add(f.rel, reason, ids[0])
        if kept is not None:
            for f in candidates:
                if f is not kept and all(f is not g for g, _ in failures):
                    self.quarantine.add(f.rel, "duplicate of another file with the same SOPInstanceUID (an earlier "
                                               "readable copy is in the manifest)", ids[0])
        return row

    def volume(self, first: _File, instances: list[list[_File]]) -> list[_Row]:
        """A cross-sectional series: the link folder holds one link per slice and is read as
        a volume. If it cannot be stacked, every slice is quarantined with the reason."""
        ids = self._ids(first, f"series:{first.series}")
        folder = self.images_dir / ids[0] / ids[1] / ids[2]
        chosen = [c[0] for c in instances]
        for i, f in enumerate(sorted(chosen, key=lambda g: g.rel)):
            _make_link(f.path, folder / f"{i:05d}.dcm", self.images_dir)
        try:
            img = read_image(folder)
        except ImageReadError as exc:
            shutil.rmtree(folder)
            self.n_volumes_failed += 1
            for f in chosen:
                self.quarantine.add(f.rel, f"series could not be read as one volume: {exc.reason}", ids[0])
            img = None
        for c in instances:
            for f in c[1:]:
                self.quarantine.add(f.rel, "duplicate of another file with the same SOPInstanceUID", ids[0])
        return [] if img is None else [self._row(ids, folder, img, first, len(chosen))]

    def notes(self, rows: list[_Row], others: list[_File]) -> list[str]:
        notes = []
        if self.n_volumes_failed:
            notes.append(f"{self.n_volumes_failed} DICOM series could not be stacked into volumes (e.g. localizers, "
                         "multi-echo or missing slices); their files are in quarantine.csv")
        patients = {f.patient for f in others}
        if len(others) > 1 and len(patients) == 1:
            notes.append(f"all {len(others)} non-DICOM images were assigned to ONE patient (their common top folder); "
                         "non-DICOM patients come from the first folder below the input folder (see docs/io.md)")
        return notes


def _make_link(target: Path, link: Path, images_dir: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    rel_target = os.path.relpath(os.path.abspath(target), os.path.abspath(link.parent))
    try:
        os.symlink(rel_target, link)
    except OSError:
        try:
            os.link(target, link)
        except OSError as exc:
            raise IngestError(f"cannot create links under {images_dir} ({exc.strerror}); write the manifest to a "
                              "filesystem that supports symbolic or hard links") from None


# --------------------------------------------------------------------------------------
# output


class _Redactor:
    """Removes identifier values seen in any DICOM header from quarantine paths and reasons.

    A path component is replaced by ``[redacted]`` when one of its words (runs of letters and
    digits) equals a word of an identifier (e.g. the folder ``77654033`` for that PatientID,
    or ``Doe_Archibald`` for ``Doe^Archibald``), or when it contains a whole identifier of 6 or
    more characters. Reasons are cleaned of whole identifier values. UIDs (one per file, so
    thousands) are looked up as tokens, not searched one by one.
    """

    def __init__(self, identifiers: set[tuple[str, bool]]):
        values = {v for v, _ in identifiers if len(v) >= 3}
        self.uids = {v for v in values if _UID.fullmatch(v)}
        self.values = values - self.uids
        self.words = {w for v, by_word in identifiers if by_word and v not in self.uids
                      for w in _words(v) if len(w) >= 3}
        self.long_values = [v for v in self.values if len(v) >= 6]
        alternatives = "|".join(re.escape(v) for v in sorted(self.values, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])",
                                   re.IGNORECASE) if alternatives else None

    def _identifying(self, part: str) -> bool:
        lower = part.lower()
        return (bool(self.words.intersection(_words(lower))) or any(v in lower for v in self.long_values)
                or any(m.group(0) in self.uids for m in _UID_TOKEN.finditer(lower)))

    def path(self, rel: str) -> str:
        return "/".join("[redacted]" if self._identifying(part) else part for part in rel.split("/"))

    def text(self, text: str) -> str:
        if self.uids:
            text = _UID_TOKEN.sub(lambda m: "[redacted]" if m.group(0) in self.uids else m.group(0), text)
        return self._pattern.sub("[redacted]", text) if self._pattern is not None else text


_UID = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_UID_TOKEN = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+)+(?![0-9])")


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]


def _reason_kind(reason: str) -> str:
    return re.split(r" \(|; |: ", reason, maxsplit=1)[0]


def pseudonymize_manifest(src: str | os.PathLike[str], out: str | os.PathLike[str], key: str | None = None) -> str:
    """Copy a manifest with its ids replaced by keyed pseudonyms (:class:`Pseudonymizer`).

    ``patient_id``, ``study_id`` and ``sample_id`` (where present) become ``P...``, ``S...``
    and ``X...`` codes: the same input id gives the same code under the same key, so later
    exports pseudonymised with the key join up. Every other column is kept; relative paths are
    rewritten for the new manifest's folder.

    Args:
        src: the manifest CSV.
        out: the new manifest CSV (not ``src``; its folder is created).
        key: pseudonymisation key; default ``$MEDVIT_PSEUDONYM_KEY``. Never written anywhere.

    Returns:
        A one-line summary (counts only).

    Raises:
        IngestError: ``out`` is ``src``, or the files cannot be read or written.
        PseudonymKeyError: no usable key.
        ManifestError: ``src`` is not a manifest.
    """
    src_path, out_path = Path(src), Path(out)
    pseudo = Pseudonymizer(resolve_key(key))
    if out_path.suffix.lower() != ".csv":
        raise IngestError(f"output {out_path} must end in .csv")
    if out_path.resolve() == src_path.resolve():
        raise IngestError(f"output {out_path} is the input manifest; write the pseudonymised copy to a new file")
    df, problems = _read(src_path)
    if problems:
        raise IngestError(f"manifest {src_path}: {len(problems)} row(s) cannot be read as CSV rows (first: "
                          f"{problems[0]}); fix them first")
    columns = [c for c in df.columns if c != "_row"]
    src_root, out_root = src_path.resolve().parent, out_path.resolve().parent
    for column, kind in (("patient_id", "patient"), ("study_id", "study"), ("sample_id", "sample")):
        if column in df.columns:
            df[column] = [pseudo(kind, v) if v else v for v in df[column]]
    if src_root != out_root:
        for column in path_columns(df):
            df[column] = [v if not v or os.path.isabs(v) else os.path.relpath(src_root / v, out_root)
                          for v in df[column]]
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IngestError(f"cannot create output folder {out_path.parent}: {exc.strerror}") from None
    _write_csv(out_path, columns, df[columns].values.tolist())
    replaced = [c for c in ("patient_id", "study_id", "sample_id") if c in df.columns]
    note = ("" if src_root == out_root else f"; its image paths lead into {src_root}: list that folder in "
            "$MEDVIT_DATA_ROOTS, or write the copy beside the original")
    return (f"wrote {out_path}: {len(df)} rows, {df['patient_id'].nunique()} patients; {', '.join(replaced)} "
            f"replaced by keyed pseudonyms (the key is not stored){note}")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)  # atomic: a killed ingest never leaves half a manifest
    except OSError as exc:
        raise IngestError(f"cannot write {path}: {exc.strerror}") from None
