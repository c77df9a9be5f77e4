"""First hour with one's own data: a single-label manifest read with the multi-label default is
caught before any job with the keys to set; `medvit manifest add-labels`; the docs name only
files the repository has and one run command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import dicom_dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from medvit.cli import main

REPO = Path(__file__).resolve().parents[1]
KEY = "first-hour-key-0123456789abcdef"


def _single_label_study(tmp_path: Path) -> Path:
    (tmp_path / "m.csv").write_text("patient_id,image,label\np1,a.png,normal\np2,b.png,pneumonia\np3,c.png,normal\n")
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": "fh", "device": "cpu", "tasks": {"xray": {"manifest": "m.csv"}}}))
    return study


def test_single_label_manifest_with_the_multilabel_default_names_the_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    study = _single_label_study(tmp_path)
    assert main(["config", str(study)]) == 2
    err = capsys.readouterr().err
    assert "tasks.xray.label_column" in err and "`label_column: label`" in err
    assert "`positive_class: pneumonia`" in err and '["normal", "pneumonia"]' in err
    # with the keys set, the config is accepted
    cfg = yaml.safe_load(study.read_text())
    cfg["tasks"]["xray"].update(label_column="label", positive_class="pneumonia")
    study.write_text(yaml.safe_dump(cfg))
    assert main(["config", str(study)]) == 0


def test_single_label_manifest_is_caught_by_a_dry_run(tmp_path):
    study = _single_label_study(tmp_path)
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "1", "--configfile", str(study), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "label_column: label" in proc.stdout + proc.stderr and "positive_class" in proc.stdout + proc.stderr


def test_a_label_column_missing_from_the_manifest_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("patient_id,image,label\np1,a.png,tumor\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"study": "fh", "tasks": {"brain": {"manifest": "m.csv",
                                                                                       "label_column": "tumour"}}}))
    assert main(["config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "tasks.brain.label_column: got 'tumour', not a column of the manifest" in err and "label)" in err


def _dicom(path: Path, patient_id: str, study_uid: str, seed: int) -> None:
    ds = dicom_dataset(SecondaryCaptureImageStorage)
    ds.PatientName, ds.PatientID = "Doe^Jane", patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "DX"
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4000, (16, 16)).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture()
def ingested(tmp_path):
    studies = {"MRN77700001": generate_uid(), "MRN77700002": generate_uid(), "MRN77700003": generate_uid()}
    for i, (mrn, uid) in enumerate(studies.items()):
        _dicom(tmp_path / "export" / f"p{i}" / "img.dcm", mrn, uid, seed=i)
    assert main(["ingest", str(tmp_path / "export"), "--out", str(tmp_path / "data" / "manifest.csv"),
                 "--key", KEY]) == 0
    return tmp_path / "data" / "manifest.csv", studies


def test_add_labels_joins_original_ids_through_the_key(ingested, tmp_path, capsys):
    manifest, studies = ingested
    labels = tmp_path / "labels.csv"  # as the clinicians keep it: hospital numbers
    labels.write_text("patient_id,label\nMRN77700001,pneumonia\nMRN77700002,normal\nMRN77700003,normal\n"
                      "MRN99999999,normal\n")
    out = tmp_path / "data" / "labelled.csv"
    assert main(["manifest", "add-labels", str(manifest), "--labels", str(labels), "--out", str(out),
                 "--key", KEY]) == 0
    summary = capsys.readouterr().out
    assert "3 of 3 row(s) labelled by patient_id" in summary and "1 labels id(s) match no manifest row" in summary
    df = pd.read_csv(out, keep_default_na=False)
    assert sorted(df["label"]) == ["normal", "normal", "pneumonia"]
    text = out.read_text()
    assert "MRN" not in text and "Doe" not in text
    # the labelled manifest is a valid manifest (paths still resolve from its folder)
    assert main(["manifest", "validate", str(out)]) == 0


def test_add_labels_joins_pseudonymous_study_ids(ingested, tmp_path, capsys, monkeypatch):
    manifest, _ = ingested
    monkeypatch.setenv("MEDVIT_DATA_ROOTS", str(tmp_path))  # the labelled copy lies outside the data folder
    df = pd.read_csv(manifest, keep_default_na=False)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"study_id": df["study_id"], "labels": ["effusion", "", "nodule|effusion"],
                  "split": ["train", "val", "test"]}).to_csv(labels, index=False)
    out = tmp_path / "elsewhere" / "labelled.csv"
    assert main(["manifest", "add-labels", str(manifest), "--labels", str(labels), "--out", str(out)]) == 0
    assert "by study_id (pseudonyms)" in capsys.readouterr().out
    got = pd.read_csv(out, keep_default_na=False).set_index("study_id")
    assert got.loc[df["study_id"][2], "labels"] == "nodule|effusion" and got.loc[df["study_id"][1], "split"] == "val"
    assert main(["manifest", "validate", str(out), "--no-check-files"]) == 0  # paths rewritten for the new folder


def test_add_labels_refuses_original_ids_without_a_key_and_conflicting_labels(ingested, tmp_path, capsys,
                                                                              monkeypatch):
    manifest, _ = ingested
    monkeypatch.delenv("MEDVIT_PSEUDONYM_KEY", raising=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nMRN77700001,pneumonia\n")
    out = tmp_path / "o.csv"
    assert main(["manifest", "add-labels", str(manifest), "--labels", str(labels), "--out", str(out)]) == 2
    assert "give the key ingest used" in capsys.readouterr().err
    labels.write_text("patient_id,label\nMRN77700001,pneumonia\nMRN77700001,normal\n")
    assert main(["manifest", "add-labels", str(manifest), "--labels", str(labels), "--out", str(out),
                 "--key", KEY]) == 2
    err = capsys.readouterr().err
    assert "different ['label'] values" in err and "MRN" not in err
    assert not out.exists()


def test_manifest_docs_link_only_files_the_repository_has():
    for doc in (REPO / "data_manifests" / "README.md", REPO / "docs" / "io.md"):
        text = doc.read_text()
        assert "DESIGN.md" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), (doc, target)


def test_the_workstation_run_command_is_the_same_in_every_doc():
    command = "snakemake --profile workflows/profiles/local"
    for doc in ("README.md", "docs/config.md", "docs/cluster.md", "workflows/README.md", "docs/xray_mae.md",
                "docs/dvpt.md"):
        text = (REPO / doc).read_text()
        assert command in text, doc
        assert not re.search(r"^snakemake --cores", text, re.M), doc
