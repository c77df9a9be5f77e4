"""Privacy: DICOM identifiers never reach outputs, logs or exported DICOM; pseudonyms are
keyed hashes whose key is never stored.

Identifiers with distinctive strings are planted in copies of pydicom's test files (and in
the folder names of the export), the copies are ingested, and every byte written is searched
for each planted string and for the key: the ingest outputs (fast), a DICOM SEG exported on
such a series (fast), and a whole tiny study run by Snakemake on the ingested manifest,
results and logs included (slow).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medvit.data.ingest import ENV_KEY, Pseudonymizer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY = "privacy-key-7d1c0e5a9b2f4c68a0e3"

# Distinctive strings, each planted in one identifying attribute (two patients).
PLANTED = {
    "PatientName": ["Zyxquorr^Planted", "Quillfeather^Marguerite"],
    "PatientID": ["PID-PLANT-424242", "PID-PLANT-515151"],
    "PatientBirthDate": ["19011231", "19020228"],
    "AccessionNumber": ["ACCPLANT7731", "ACCPLANT8842"],
    "InstitutionName": ["Plantedshire Royal Infirmary", "Hospital Quillmarsh"],
    "ReferringPhysicianName": ["Drplantref^Hieronymus", "Drplantref^Ottoline"],
    "OtherPatientIDs": ["OTHERPLANT9911", "OTHERPLANT9922"],
    "PatientAddress": ["17 Plantedlane Crescent", "99 Quillmarsh Road"],
    "StudyID": ["STUDYPLANT55", "STUDYPLANT66"],
    "OperatorsName": ["Opplanted^Bartholomew", "Opplanted^Clementine"],
    "InstitutionAddress": ["1 Infirmary Plantedway", "2 Infirmary Plantedway"],
    "PerformingPhysicianName": ["Perfplanted^Algernon", "Perfplanted^Wilhelmina"],
    "StationName": ["STATIONPLANT01", "STATIONPLANT02"],
}
# Only distinctive pieces are searched for (a date can also be a study date by chance).
SEARCHED = sorted({v for values in PLANTED.values() for v in values}
                  | {part for values in (PLANTED["PatientName"], PLANTED["ReferringPhysicianName"],
                                         PLANTED["OperatorsName"], PLANTED["PerformingPhysicianName"])
                     for v in values for part in v.split("^")})


def _plant(ds: pydicom.Dataset, who: int) -> None:
    for keyword, values in PLANTED.items():
        setattr(ds, keyword, values[who])


def _export(root: Path, n_per_patient: int = 6) -> Path:
    """A DICOM export: two patients in folders named after them, single images from pydicom's
    CT and MR test files with noise added, and a 3-slice CT series each."""
    src = root / "export"
    rng = np.random.default_rng(0)
    bases = [pydicom.dcmread(get_testdata_file(n, download=False)) for n in ("CT_small.dcm", "MR_small.dcm")]
    for who in range(2):
        folder = src / PLANTED["PatientName"][who].replace("^", "_") / PLANTED["AccessionNumber"][who]
        folder.mkdir(parents=True)
        study_uid = generate_uid()
        for k in range(n_per_patient):
            ds = bases[k % 2].copy()
            arr = ds.pixel_array.astype(np.int32) + rng.integers(0, 50, ds.pixel_array.shape)
            ds.PixelData = np.clip(arr, 0, 4000).astype(ds.pixel_array.dtype).tobytes()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            for tag in ("ImagePositionPatient", "ImageOrientationPatient"):
                if tag in ds:
                    delattr(ds, tag)
            _plant(ds, who)
            ds.save_as(folder / f"{PLANTED['PatientID'][who]}_{k}.dcm")
    return src


def _series(folder: Path, who: int, n: int = 3) -> Path:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    series, study = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for k in range(n):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        _plant(ds, who)
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def _leaks(paths: list[Path], extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{planted string or key: [files containing it, by content or by name]} (case-insensitive)."""
    found: dict[str, list[str]] = {}
    needles = [*SEARCHED, *extra]
    for path in paths:
        # A link of ingest's tree points at the hospital's source file (the input itself): only
        # its pseudonymised name is an output.
        data = path.read_bytes().lower() if path.is_file() and not path.is_symlink() else b""
        name = str(path).lower()
        for needle in needles:
            low = needle.lower()
            if low.encode() in data or low in name:
                found.setdefault(needle, []).append(str(path))
    return found


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _ingest_cli(src: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{ENV_KEY: KEY})
    return subprocess.run([str(BIN / "medvit"), "ingest", str(src), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_ingest_outputs_hold_no_identifier_and_no_key(tmp_path):
    src = _export(tmp_path)
    (src / "unreadable.dcm").write_text("not a dicom")  # quarantine.csv gets a row too
    proc = _ingest_cli(src, tmp_path / "data" / "manifest.csv")
    assert proc.returncode == 0, proc.stderr
    outputs = _files(tmp_path / "data")
    names = [p.relative_to(tmp_path / "data").as_posix() for p in outputs]
    assert "manifest.csv" in names and "quarantine.csv" in names and len(outputs) > 10
    leaks = _leaks(outputs, extra=(KEY,))
    terminal = _leaks_in_text(proc.stdout + proc.stderr, extra=(KEY,))
    assert leaks == {} and terminal == [], (leaks, terminal)
    # the ids are the keyed pseudonyms: recomputable with the key, not without it
    with open(tmp_path / "data" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = {Pseudonymizer(KEY)("patient", f"id:{p}") for p in PLANTED["PatientID"]}
    assert {r["patient_id"] for r in rows} == expected
    assert {r["patient_id"] for r in rows}.isdisjoint({Pseudonymizer("another-key-0123456789")("patient", f"id:{p}")
                                                       for p in PLANTED["PatientID"]})


def _leaks_in_text(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [n for n in (*SEARCHED, *extra) if n.lower() in text.lower()]


def test_read_errors_do_not_quote_identifiers(tmp_path):
    """A file named after a patient that fails to read: the manifest report names the row and
    the reason, and the ingest quarantine redacts the name."""
    src = tmp_path / "export"
    folder = _series(src / "Zyxquorr_Planted", who=0)
    (folder / "slice1.dcm").write_bytes((folder / "slice1.dcm").read_bytes()[:400])  # truncated slice
    (src / "Zyxquorr_Planted" / "Zyxquorr_Planted_notes.dcm").write_text("Zyxquorr^Planted")
    proc = _ingest_cli(src, tmp_path / "data" / "manifest.csv")
    assert proc.returncode in (0, 1), proc.stderr
    assert _leaks(_files(tmp_path / "data")) == {}
    assert _leaks_in_text(proc.stdout + proc.stderr) == []


def _seg(tmp_path: Path, who: int) -> Path:
    pytest.importorskip("highdicom")
    from medvit.data.export import save_dicom_seg

    series = _series(tmp_path / "series", who=who)
    mask = np.zeros((3, 128, 128), np.uint8)
    mask[1, 40:60, 50:70] = 1
    return save_dicom_seg(mask, series, tmp_path / "seg.dcm", patient_id="PSEUDONYM0001")


def test_exported_dicom_seg_blanks_patient_identifiers(tmp_path):
    seg = pydicom.dcmread(_seg(tmp_path, who=1))
    assert seg.Modality == "SEG" and seg.PatientID == "PSEUDONYM0001"
    for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
                    "OtherPatientIDs", "PatientAddress"):
        assert not str(seg.get(keyword, "") or ""), keyword
    raw = (tmp_path / "seg.dcm").read_bytes().lower()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
                    "OtherPatientIDs", "PatientAddress", "OperatorsName", "PerformingPhysicianName"):
        for value in PLANTED[keyword]:
            assert value.lower().encode() not in raw, (keyword, value)


def test_exported_dicom_seg_holds_no_planted_identifier_anywhere(tmp_path):
    out = _seg(tmp_path, who=1)
    assert _leaks([out]) == {}, "planted identifiers in the exported SEG"


def test_exported_dicom_seg_declares_the_basic_profile(tmp_path):
    pytest.importorskip("highdicom")
    from medvit.data.export import save_dicom_seg

    series = _series(tmp_path / "series", who=0)
    out = save_dicom_seg(np.zeros((3, 128, 128), np.uint8), series, tmp_path / "seg.dcm", patient_id="P1")
    seg = pydicom.dcmread(out)
    assert seg.get("PatientIdentityRemoved") == "YES"
    codes = [item.CodeValue for item in seg.get("DeidentificationMethodCodeSequence", [])]
    assert "113100" in codes


# ------------------------------------------------------------------ a whole study (slow)


@pytest.mark.slow
def test_study_on_ingested_dicom_leaks_nothing(tmp_path):
    """Ingest, label, then `snakemake` a tiny histo-style study on the DICOM images: nothing under
    the working folder (results, logs, benchmarks, report, Snakemake's own logs) holds a planted
    identifier or the key."""
    src = _export(tmp_path / "in", n_per_patient=6)
    # four more patients so that the split has train/val/test
    for extra in range(4):
        for k, path in enumerate(sorted(src.rglob("*.dcm"))[:4]):
            ds = pydicom.dcmread(path)
            ds.PatientID = f"PID-PLANT-6{extra}{extra}{extra}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            arr = ds.pixel_array.astype(np.int32) + 7 * (extra + 1) * (k + 1)
            ds.PixelData = np.clip(arr, 0, 4000).astype(ds.pixel_array.dtype).tobytes()
            out = src / f"extra{extra}" / f"{k}.dcm"
            out.parent.mkdir(exist_ok=True)
            ds.save_as(out)
    work = tmp_path / "work"
    proc = _ingest_cli(src, work / "data" / "manifest.csv")
    assert proc.returncode == 0, proc.stderr
    manifest = work / "data" / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({r["patient_id"] for r in rows})
    for r in rows:
        r["label"] = "malignant" if patients.index(r["patient_id"]) % 2 else "benign"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    study = work / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": "priv", "seed": 0, "device": "cpu", "evaluation": {"bootstrap": 20},
        "tasks": {"histo": {"manifest": "data/manifest.csv", "image_size": 32, "models": ["resnet10t"],
                            "split": {"val_fraction": 0.34, "test_fraction": 0.34},
                            "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}}}}))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **{ENV_KEY: KEY})
    run = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--cores", "2", "--configfile", str(study)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = work / "results" / "priv"
    assert (results / "report" / "index.html").is_file()
    assert (results / "histo" / "resnet10t" / "metrics.json").is_file()
    outputs = [p for p in _files(work) if not p.is_relative_to(work / "data" / "manifest_images")]
    assert len(outputs) > 20
    leaks = _leaks(outputs, extra=(KEY,))
    assert leaks == {}, leaks
    assert _leaks_in_text(run.stdout + run.stderr, extra=(KEY,)) == []
    # nothing was written outside the working folder's results/<study>/, data/ and .snakemake/
    tops = {p.relative_to(work).parts[0] for p in _files(work)}
    assert tops <= {"results", "data", ".snakemake", "study.yaml"}, tops
    assert {p.relative_to(work / "results").parts[0] for p in _files(work / "results")} == {"priv"}
