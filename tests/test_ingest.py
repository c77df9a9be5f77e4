"""Tests for medvit.data.ingest: accounting, pseudonymisation, grouping and the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from medvit.data.ingest import ENV_KEY, IngestError, Pseudonymizer, PseudonymKeyError, ingest
from medvit.data.io import read_sample
from medvit.errors import MedvitError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
KEY = "unit-test-key-0123456789abcdef"
OTHER_KEY = "another-key-fedcba9876543210"
MEDVIT = Path(sys.executable).parent / "medvit"

# pydicom's odd test files make it warn while the tests themselves read them
pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _manifest_sources(manifest: Path, src: Path) -> list[str]:
    """The source files behind every manifest row, following the link tree."""
    out = []
    for image in _read_csv(manifest)["image"]:
        assert not Path(image).is_absolute() and "\\" not in image
        path = manifest.parent / image
        members = sorted(path.iterdir()) if path.is_dir() else [path]
        out.extend(Path(m).resolve().relative_to(src.resolve()).as_posix() for m in members)
    return out


def _assert_accounting(result, src: Path) -> None:
    """Every file under src is in exactly one sample or has exactly one quarantine row."""
    files = _files(src)
    in_manifest = _manifest_sources(result.manifest, src)
    assert len(in_manifest) == len(set(in_manifest)), "a file is in two samples"
    assert set(in_manifest) <= files
    left = sorted(files - set(in_manifest))
    quarantine = _read_csv(result.quarantine)
    assert (quarantine["reason"].str.len() > 0).all()
    # quarantine paths may have redacted components: match them as patterns, one file each
    exact = [f for f in quarantine["file"] if "[redacted]" not in f]
    patterns = [f for f in quarantine["file"] if "[redacted]" in f]
    for f in exact:
        left.remove(f)  # ValueError if the row names a file that is not left
    for pat in patterns:
        rx = re.compile("^" + "/".join("[^/]+" if part == "[redacted]" else re.escape(part)
                                       for part in pat.split("/")) + "$")
        match = next(f for f in left if rx.match(f))  # StopIteration if no file fits the row
        left.remove(match)
    assert left == [], f"files neither in the manifest nor quarantined: {left}"
    assert result.n_files == len(files)
    assert result.n_quarantined == len(quarantine)
    assert result.n_samples == len(_read_csv(result.manifest))


# ------------------------------------------------------------------ pydicom's shipped files


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    src = root / "src"
    shutil.copytree(PYDICOM_FILES, src)
    result = ingest(src, root / "out" / "manifest.csv", key=KEY)
    return result, src


def test_shipped_files_accounted_for(shipped):
    result, src = shipped
    _assert_accounting(result, src)
    manifest = _read_csv(result.manifest)
    print(f"\ningest of pydicom's files: {result.n_files} files -> {result.n_samples} samples, "
          f"{result.n_quarantined} quarantined")
    assert result.n_samples > 30 and result.n_quarantined > 50
    assert list(manifest.columns[:5]) == ["patient_id", "study_id", "sample_id", "image", "modality"]
    assert manifest["sample_id"].is_unique
    assert set(manifest["source_format"]) >= {"dicom", "dicom-series"}
    for _, row in manifest.iterrows():  # every manifest row reads, with the manifest's folder as root
        img = read_sample(row, result.manifest.parent)
        assert "x".join(map(str, img.shape)) == row["shape"]
    reasons = " ".join(_read_csv(result.quarantine)["reason"])
    assert "no pixel data" in reasons and "duplicate" in reasons and "non-image DICOM object" in reasons
    assert "ingest:" in result.summary() and str(result.n_samples) in result.summary()


def test_worker_processes_give_the_same_outputs(shipped, tmp_path):
    serial, src = shipped
    assert serial.workers == 1  # "auto" stays in this process below 500 files
    parallel = ingest(src, tmp_path / "manifest.csv", key=KEY, workers=2)
    assert parallel.workers == 2
    assert parallel.manifest.read_bytes() == serial.manifest.read_bytes()
    assert parallel.quarantine.read_bytes() == serial.quarantine.read_bytes()

    def links(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else "" for p in folder.rglob("*")}

    assert links(parallel.images_dir).keys() == links(serial.images_dir).keys()
    assert (parallel.n_samples, parallel.n_quarantined, parallel.notes) == (serial.n_samples, serial.n_quarantined,
                                                                            serial.notes)
    with pytest.raises(IngestError, match="workers"):
        ingest(src, tmp_path / "other.csv", key=KEY, workers=0)


def _identifier_values(src: Path) -> set[str]:
    values: set[str] = set()
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            try:
                value = str(ds.get(keyword, "") or "").strip()
            except Exception:
                continue
            if value:
                values.add(value)
    return values


def _assert_no_identifiers(values: set[str], texts: list[str]) -> None:
    cells = set()
    for text in texts:
        cells.update(c.strip('"') for c in re.split(r"[,/\n]", text))
    for value in values:
        if len(value) >= 4:  # long values: nowhere, not even inside another string
            assert all(value not in text for text in texts), value
        else:  # 3-character values ("PLA", "ID1"): no cell or path component may be one
            assert value not in cells, value


def test_shipped_outputs_hold_no_identifiers(shipped):
    result, src = shipped
    values = _identifier_values(src)
    assert {"Doe^Archibald", "77654033", "CompressedSamples^CT1", "19710123"} <= values  # the check has teeth
    links = [p.relative_to(result.images_dir).as_posix() for p in result.images_dir.rglob("*")]
    texts = [result.manifest.read_text(), result.quarantine.read_text(), result.summary(), "\n".join(links)]
    _assert_no_identifiers(values, texts)
    assert all(KEY not in t for t in texts)
    # the source folder named after a PatientID is redacted, not dropped
    assert any(f.startswith("dicomdirtests/[redacted]/") for f in _read_csv(result.quarantine)["file"])


# ------------------------------------------------------------------ a built study


def _dicom(path: Path, pixels: np.ndarray, *, patient=("Doe^Jane", "MRN55501234", "19600101"), series="1.2.826.0.9.1",
           study="1.2.826.0.9", ipp=None, iop=(1, 0, 0, 0, 1, 0), sop_uid=None, modality="CT") -> Path:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SegmentationStorage if modality == "SEG" else CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.8, 0.8]
    if ipp is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(ipp), list(iop)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def study(tmp_path) -> Path:
    """A small export: two patients, a 5-slice CT and a second series in one folder named
    after the patient, a localizer, a duplicate, a SEG, NIfTI/PNG files and junk."""
    src = tmp_path / "export"
    rng = np.random.default_rng(0)
    jane = src / "Doe_Jane" / "CT"
    for k in range(5):  # shuffled names; positions give the order
        _dicom(jane / f"IM{(k * 3) % 5}", rng.integers(0, 1000, (6, 7)), ipp=(0, 0, 2.0 * k))
    for k in range(3):  # a second series in the same folder
        _dicom(jane / f"B{k}", rng.integers(0, 1000, (6, 7)), series="1.2.826.0.9.2", ipp=(0, 0, 5.0 * k))
    sop = generate_uid()
    _dicom(src / "Doe_Jane" / "single.dcm", rng.integers(0, 1000, (6, 7)), series="1.2.826.0.9.3", sop_uid=sop)
    shutil.copy(src / "Doe_Jane" / "single.dcm", src / "Doe_Jane" / "single_copy.dcm")  # same SOP instance
    for k, iop in enumerate([(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)]):  # a localizer
        _dicom(src / "Doe_Jane" / "scout" / f"L{k}", rng.integers(0, 1000, (6, 7)), series="1.2.826.0.9.4",
               ipp=(0, 0, 0), iop=iop)
    _dicom(src / "Doe_Jane" / "seg.dcm", rng.integers(0, 2, (6, 7)), series="1.2.826.0.9.5", modality="SEG")
    _dicom(src / "roe" / "x.dcm", rng.integers(0, 1000, (6, 7)), patient=("Roe^Richard", "MRN55509876", "19700202"),
           series="1.2.826.0.8.1", study="1.2.826.0.8")
    nifti = src / "sub-01" / "anat"
    nifti.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.random((5, 6, 7)).astype(np.float32), np.eye(4)), nifti / "sub-01_T1w.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((5, 6, 7)).astype(np.float32), np.eye(4)), nifti / "sub-01_T2w.nii.gz")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(src / "photo.png")
    (src / "Doe_Jane" / "notes.txt").write_text("Patient Jane Doe, MRN55501234, see report")
    (src / "empty.dcm").write_bytes(b"")
    return src


def test_built_study_grouping_and_redaction(study, tmp_path):
    result = ingest(study, tmp_path / "out" / "manifest.csv", key=KEY)
    _assert_accounting(result, study)
    manifest = _read_csv(result.manifest)
    q = _read_csv(result.quarantine)
    series = manifest[manifest["source_format"] == "dicom-series"].sort_values("n_files")
    assert list(series["n_files"]) == ["3", "5"]
    assert list(series["shape"]) == ["1x3x6x7", "1x5x6x7"]
    assert list(series["spacing"]) == ["5x0.8x0.8", "2x0.8x0.8"]
    vol = read_sample(series.iloc[1], result.manifest.parent)
    ordered = [pydicom.dcmread(study / "Doe_Jane" / "CT" / f"IM{(k * 3) % 5}").pixel_array for k in range(5)]
    np.testing.assert_array_equal(vol.array[0], np.stack(ordered))
    # patients: Jane (DICOM), Roe (DICOM), sub-01 (NIfTI folder), photo (file name)
    assert manifest["patient_id"].nunique() == 4
    nifti_rows = manifest[manifest["source_format"] == "nifti"]
    assert len(nifti_rows) == 2 and nifti_rows["patient_id"].nunique() == 1
    reasons = dict(zip(q["file"], q["reason"]))
    assert reasons["empty.dcm"].startswith("empty file")
    assert reasons["[redacted]/notes.txt"].startswith("unsupported file type")
    assert "duplicate" in reasons["[redacted]/single_copy.dcm"]
    assert "non-image DICOM object" in reasons["[redacted]/seg.dcm"]
    assert sum("orientations" in r for r in q["reason"]) == 3
    texts = [result.manifest.read_text(), result.quarantine.read_text(), result.summary()]
    _assert_no_identifiers({"Doe^Jane", "MRN55501234", "19600101", "Roe^Richard", "MRN55509876", "Doe_Jane"}, texts)

    again = ingest(study, tmp_path / "out" / "manifest.csv", key=KEY)  # replaces its own link tree
    assert again.manifest.read_text() == result.manifest.read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest_images").mkdir()
    with pytest.raises(IngestError, match="not written by `medvit ingest`"):
        ingest(study, tmp_path / "other" / "manifest.csv", key=KEY)


def test_manifest_inside_the_input_folder(study):
    first = ingest(study, study / "manifest.csv", key=KEY)
    second = ingest(study, study / "manifest.csv", key=KEY)  # its own outputs are not ingested
    assert second.n_files == first.n_files
    assert second.manifest.read_text() == first.manifest.read_text()


def test_keys(study, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    a = _read_csv(ingest(study, tmp_path / "a" / "m.csv", key=KEY).manifest)
    b = _read_csv(ingest(study, tmp_path / "b" / "m.csv", key=KEY).manifest)
    c = _read_csv(ingest(study, tmp_path / "c" / "m.csv", key=OTHER_KEY).manifest)
    for col in ("patient_id", "study_id", "sample_id"):
        assert list(a[col]) == list(b[col])
        assert set(a[col]).isdisjoint(set(c[col]))
    monkeypatch.setenv(ENV_KEY, KEY)
    d = _read_csv(ingest(study, tmp_path / "d" / "m.csv").manifest)
    assert list(d["patient_id"]) == list(a["patient_id"])
    monkeypatch.delenv(ENV_KEY)
    with pytest.raises(PseudonymKeyError, match=ENV_KEY) as info:
        ingest(study, tmp_path / "e" / "m.csv")
    assert isinstance(info.value, MedvitError)
    with pytest.raises(PseudonymKeyError, match="too short"):
        ingest(study, tmp_path / "e" / "m.csv", key="short")
    pseudo = Pseudonymizer(KEY)
    assert pseudo("patient", "x") != pseudo("study", "x")  # roles are separate namespaces
    assert KEY not in repr(pseudo)


def test_bad_input_folders(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "missing", tmp_path / "m.csv", key=KEY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no files"):
        ingest(tmp_path / "empty", tmp_path / "m.csv", key=KEY)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("no images here")
    result = ingest(junk, tmp_path / "out" / "m.csv", key=KEY)
    assert result.n_samples == 0 and result.n_quarantined == 1
    assert "no readable images" in result.summary()


def test_unlistable_folder_is_quarantined(study, tmp_path, monkeypatch):
    import medvit.data.ingest as ingest_module

    real_walk = ingest_module.os.walk

    def walk(top, followlinks=False, onerror=None):  # as if one folder were unreadable
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))
        yield from real_walk(top, followlinks=followlinks, onerror=onerror)

    monkeypatch.setattr(ingest_module.os, "walk", walk)
    result = ingest(study, tmp_path / "out" / "m.csv", key=KEY)
    q = _read_csv(result.quarantine)
    assert q.loc[q["file"] == "locked", "reason"].str.startswith("cannot list folder").all()
    assert (q["file"] == "locked").sum() == 1


def test_cli(study, tmp_path):
    env = {"PATH": str(MEDVIT.parent), "MEDVIT_PSEUDONYM_KEY": KEY}
    bad = subprocess.run([str(MEDVIT), "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = subprocess.run([str(MEDVIT), "ingest", str(study), "--out", str(tmp_path / "ok" / "m.csv")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr
    assert "samples from 4 patients" in good.stdout
    assert "Doe" not in good.stdout + good.stderr
