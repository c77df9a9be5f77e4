"""What a hostile user tries against configs, manifests, image files, ingest, checkpoints,
processes and the disk: each attack fails cleanly (a clear error, a quarantined row or a
warning), nothing it smuggles in runs, and nothing it points at is read. docs/security.md
lists every guarantee with the test here that proves it."""

from __future__ import annotations

import errno
import gzip
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import dicom_dataset

from medvit.cli import main
from medvit.config import load_study
from medvit.data.manifest import ROOTS_ENV, load_manifest, validate_manifest
from medvit.data.synth import synthesize
from medvit.errors import ConfigError, ImageReadError, ManifestError, MedvitError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env.pop(ROOTS_ENV, None)
    return env


def _histo(folder: Path, patients: int = 4) -> Path:
    return synthesize("histo", n_patients=patients, out_dir=folder, seed=0, image_size=32)


# ------------------------------------------------------------------ 1. shell injection through paths


def _shell_commands() -> list[tuple[str, str]]:
    """(file, line) of every line of every rule's shell command."""
    found = []
    for smk in sorted((REPO / "workflows" / "rules").glob("*.smk")):
        in_shell = False
        for line in smk.read_text().splitlines():
            text = line.strip()
            if text == "shell:":
                in_shell = True
            elif in_shell and text.startswith('"'):
                found.append((smk.name, text))
            else:
                in_shell = False
    return found


def test_every_value_in_a_rule_shell_command_is_quoted():
    commands = _shell_commands()
    assert len(commands) > 40  # every rule file was read
    unquoted = [(f, field) for f, text in commands for field in re.findall(r"\{([^{}]*)\}", text)
                if not field.endswith(":q")]
    assert unquoted == [], f"shell command fields without :q (pasted unquoted into bash): {unquoted}"


def test_study_path_with_command_substitution_and_spaces_runs_nothing(tmp_path):
    """`snakemake --configfile 'cfg/x$(touch PWNED)y z.yaml'`: the split job (which gets the
    study path) runs with the path as one argument; nothing in it is executed."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    study = cfg / "x$(touch PWNED)y z.yaml"
    study.write_text("study: s\ntasks:\n  histo:\n    synthetic: {patients: 4, image_size: 32}\n")
    target = "results/s/histo/split.csv"
    proc = subprocess.run([str(BIN / "snakemake"), target, "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "1", "--configfile", str(study)],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists(), out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / target).is_file()


# ------------------------------------------------------------------ 2, 3. pixel budgets from headers

from medvit.data.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, read_image  # noqa: E402


def _dicom(path: Path, frames: int, rows: int, cols: int, *, pixel_bytes: bytes | None = None, ipp=None,
           series: str = "1.2.826.0.7.1") -> Path:
    ds = dicom_dataset()
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "1.2.826.0.7", series
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if ipp is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(ipp), [1, 0, 0, 0, 1, 0]
    values = np.arange(frames * rows * cols, dtype=np.uint16) % 4000
    ds.PixelData = values.tobytes() if pixel_bytes is None else pixel_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _nifti(path: Path, shape: tuple[int, ...], header_only: bool = False) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape(shape)
    header = img.header.binaryblock + b"\0" * 4  # 348-byte header, empty extension flag
    data = b"" if header_only else (np.arange(math.prod(shape), dtype=np.int16) % 300).tobytes()
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + data)
    return path


def _tiff(path: Path, pages: int, size: int) -> Path:
    from PIL import Image

    ims = [Image.fromarray(((np.arange(size * size) + k) % 250).astype(np.uint8).reshape(size, size))
           for k in range(pages)]
    ims[0].save(path, save_all=True, append_images=ims[1:], compression="tiff_deflate")
    return path


import math  # noqa: E402


def _over_budget_files(folder: Path) -> dict[str, Path]:
    """Files of 100,000 to 300,000 pixel values whose every page/frame/slice is small."""
    folder.mkdir(parents=True, exist_ok=True)
    series = folder / "series"
    for k in range(30):
        _dicom(series / f"s{k:02d}.dcm", 1, 64, 64, ipp=(0, 0, 2.0 * k))
    np.save(folder / "volume.npy", (np.arange(64**3) % 97).astype(np.uint8).reshape(64, 64, 64))
    return {
        "nifti": _nifti(folder / "volume.nii.gz", (64, 64, 64)),
        "dicom_multiframe": _dicom(folder / "multiframe.dcm", 40, 64, 64),
        "dicom_series": series,
        "npy": folder / "volume.npy",
        "tiff_pages": _tiff(folder / "pages.tif", 20, 100),
    }


def test_pixel_budget_counts_every_frame_page_and_slice_before_decoding(tmp_path, monkeypatch):
    files = _over_budget_files(tmp_path / "data")
    for name, path in files.items():  # each is fine under the default budget
        assert read_image(path).array.size > 100_000, name
    monkeypatch.setenv(MAX_PIXELS_ENV, "100000")
    import nibabel
    import pydicom

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data decoded although the header is over the budget")

    monkeypatch.setattr(nibabel.Nifti1Image, "get_fdata", no_decoding)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoding))
    monkeypatch.setattr(np, "load", no_decoding)
    for name, path in files.items():
        with pytest.raises(ImageReadError, match=r"image too large: .* over the budget of 100,000") as info:
            read_image(path)
        assert MAX_PIXELS_ENV in info.value.reason, name
    assert "the first 11 pages (first page 100x100) = 110,000" in str(
        pytest.raises(ImageReadError, read_image, files["tiff_pages"]).value)
    assert "40 frame(s) of 64x64" in str(pytest.raises(ImageReadError, read_image, files["dicom_multiframe"]).value)
    assert "30 slices" in str(pytest.raises(ImageReadError, read_image, files["dicom_series"]).value)


def test_over_budget_files_are_quarantined_rows_never_a_crash(tmp_path, monkeypatch, capsys):
    """The attack files: a tiny .nii.gz declaring 800x800x400 voxels, a .npy header declaring
    as many, a DICOM declaring 100 frames of 2000x2000, and (under a lowered budget) a
    multi-page TIFF whose pages are each small. The default budget refuses the first three
    from their headers; the good rows are kept."""
    assert 512**3 <= DEFAULT_MAX_PIXELS < 800 * 800 * 400
    manifest = _histo(tmp_path / "data")
    folder = manifest.parent
    _nifti(folder / "bomb.nii.gz", (800, 800, 400), header_only=True)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.int16))
    with open(folder / "bomb.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": (800, 800, 400)})
    _dicom(folder / "bomb.dcm", 100, 2000, 2000, pixel_bytes=b"\0" * 64)
    _tiff(folder / "pages.tif", 20, 100)
    lines = manifest.read_text().splitlines()
    head = lines[0].split(",")
    for i, name in enumerate(["bomb.nii.gz", "bomb.npy", "bomb.dcm", "pages.tif"], start=1):
        row = lines[i].split(",")
        row[head.index("image")] = name
        lines[i] = ",".join(row)
    manifest.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv(MAX_PIXELS_ENV, "150000")
    report = validate_manifest(manifest)
    reasons = {p.row: p.reason for p in report.problems if p.row is not None}
    assert sorted(reasons) == [1, 2, 3, 4], reasons
    assert "800x800x400 = 256,000,000 pixel values" in reasons[1] and "800x800x400" in reasons[2]
    assert "100 frame(s) of 2000x2000" in reasons[3] and "400,000,000" in reasons[3]
    assert "the first 16 pages (first page 100x100) = 160,000 pixel values" in reasons[4]
    assert report.summary["samples"] == len(lines) - 1 - 4
    assert main(["manifest", "validate", str(manifest)]) == 1
    out = capsys.readouterr()
    assert "image too large" in out.out and "Traceback" not in out.out + out.err
    assert len(load_manifest(manifest, check_files=True).df) == len(lines) - 1 - 4
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=MAX_PIXELS_ENV):
        validate_manifest(manifest)


# ------------------------------------------------------------------ 4. classes a model cannot learn


def _split_manifest(tmp_path: Path, relabel: dict[int, dict[str, str]]) -> Path:
    """An 8-patient histo manifest with a given split column (patients 0-3 train, 4-5 val,
    6-7 test) and some rows relabelled."""
    manifest = _histo(tmp_path / "data", patients=8)
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    order = {p: i for i, p in enumerate(sorted(df["patient_id"].unique()))}
    df["split"] = [("train", "train", "train", "train", "val", "val", "test", "test")[order[p]]
                   for p in df["patient_id"]]
    for row, values in relabel.items():  # 1-based data rows
        for column, value in values.items():
            df.loc[row - 1, column] = value
    df.to_csv(manifest, index=False)
    return manifest


def _test_rows(manifest: Path, n: int = 2) -> list[int]:
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return [i + 1 for i in df.index[df["split"] == "test"][:n]]


def _study(tmp_path: Path, task: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": "data/manifest.csv", **task}}}))
    return path


def test_a_label_only_in_test_rows_never_makes_a_binary_task_multiclass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    manifest = _split_manifest(tmp_path, {})
    rows = _test_rows(manifest)
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df.loc[[r - 1 for r in rows], "label"] = "weird"
    df.to_csv(manifest, index=False)
    study = _study(tmp_path, {"label_column": "label", "positive_class": "malignant"})
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "positive_class 'malignant' declares a binary task" in err and "'weird'" in err
    assert f"rows {rows[0]}, {rows[1]} (split test)" in err
    assert not (tmp_path / "results" / "s" / "histo" / "split.csv").exists()
    # a positive class the data does not have is refused too, naming the classes found
    study = _study(tmp_path, {"label_column": "label", "positive_class": "cancer"})
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 2
    err = capsys.readouterr().err
    assert "positive_class: 'cancer' is not a class of column 'label'" in err and "benign" in err


def test_a_class_absent_from_training_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Multiclass (subtype): a subtype only in test rows would be an untrained output."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    manifest = _split_manifest(tmp_path, {})
    rows = _test_rows(manifest)
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df.loc[[r - 1 for r in rows], "subtype"] = "rare_subtype"
    df.to_csv(manifest, index=False)
    study = _study(tmp_path, {"label_column": "subtype"})
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 2
    err = capsys.readouterr().err
    assert "class 'rare_subtype' of column 'subtype' occurs only in" in err
    assert f"rows {rows[0]}, {rows[1]} (split test)" in err and "training split has no sample" in err
    # the training stage refuses a split.csv with the same defect (e.g. written by hand)
    from medvit.tasks.common import load_context

    df["_row"] = range(1, len(df) + 1)
    split = tmp_path / "data" / "split.csv"
    df.drop(columns="_row").to_csv(split, index=False)
    with pytest.raises(ManifestError, match="rare_subtype.*split test"):
        load_context(study, "histo", split)


# ------------------------------------------------------------------ 5. symbolic links out of the data folder


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("image", ["sub/link/../secret.png", "sub/link/secret2.png", "sub/link/./../secret.png"])
def test_paths_through_a_folder_link_that_leaves_the_data_roots_are_refused(tmp_path, monkeypatch, image):
    """`data/sub/link -> ../../outside/a`: `sub/link/../secret.png` looks inside the data folder
    but the OS reads outside/secret.png; `sub/link/secret2.png` reads outside/a/secret2.png."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    outside = tmp_path / "outside"
    _png(outside / "secret.png", 1)
    _png(outside / "a" / "secret2.png", 2)
    manifest = _histo(tmp_path / "data")
    (manifest.parent / "sub").mkdir()
    (manifest.parent / "sub" / "link").symlink_to(outside / "a")
    lines = manifest.read_text().splitlines()
    head, row = lines[0].split(","), lines[2].split(",")
    row[head.index("image")] = image
    lines[2] = ",".join(row)
    manifest.write_text("\n".join(lines) + "\n")
    assert (manifest.parent / image).is_file()  # the file is really there to be read
    report = validate_manifest(manifest)
    problem = next(p for p in report.problems if p.row == 2)
    assert "leads through a symbolic link to" in problem.reason and str(outside) in problem.reason
    assert "outside the allowed roots" in problem.reason
    with pytest.raises(ManifestError, match="row 2, column image.*symbolic link"):
        load_manifest(manifest, check_files=True)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": "data/manifest.csv"}}}))
    with pytest.raises(ConfigError, match="row 2, column image"):
        load_study(study)
    # the owner of the data can allow the link's target
    monkeypatch.setenv(ROOTS_ENV, str(outside))
    assert validate_manifest(manifest).ok
    assert len(load_manifest(manifest, check_files=True).df) == len(lines) - 1


# ------------------------------------------------------------------ 6. the manifest path itself


def test_a_study_manifest_outside_the_data_roots_is_refused_unopened(tmp_path, monkeypatch):
    work, cfg, secret = tmp_path / "work", tmp_path / "cfg", tmp_path / "secret"
    for folder in (work, cfg, secret):
        folder.mkdir()
    (secret / "keys.txt").write_text("SECRETLINE:$6$hash:19000:0\nsecond\n")
    (work / "innocent.csv").symlink_to(secret / "keys.txt")
    monkeypatch.chdir(work)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    for manifest in ("/etc/passwd", str(secret / "keys.txt"), "../secret/keys.txt", "innocent.csv"):
        study = cfg / "study.yaml"
        study.write_text(yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": manifest}}}))
        message = str(pytest.raises(ConfigError, load_study, study).value)
        assert "tasks.histo.manifest" in message and "it was not opened" in message and ROOTS_ENV in message
        assert "SECRETLINE" not in message and "root:" not in message
    # a manifest beside the study file or in the working directory is fine
    _histo(cfg / "data")
    study.write_text(yaml.safe_dump({"study": "s",
                                     "tasks": {"histo": {"manifest": str(cfg / "data" / "manifest.csv")}}}))
    assert load_study(study)["tasks"]["histo"]["manifest"].endswith("manifest.csv")


def test_a_file_that_is_not_a_manifest_is_never_echoed(tmp_path, monkeypatch, capsys):
    """Even where it is allowed (listed in the data roots), a file without the manifest's
    columns is refused without showing a byte of it, by the split stage (whose log goes to
    results/) and by `medvit manifest validate`."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "keys.txt").write_text("SECRETLINE:$6$hash:19000:0\nsecond,line\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ROOTS_ENV, str(secret))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "tasks": {"histo": {"manifest": str(secret / "keys.txt")}}}))
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 2
    assert main(["manifest", "validate", str(secret / "keys.txt")]) == 1
    out = capsys.readouterr()
    assert "missing required column(s)" in out.err and "not shown" in out.err
    assert not [w for w in ("SECRETLINE", "hash", "second") if w in out.out + out.err]


# ------------------------------------------------------------------ 7, 14. numbers without bounds, endless epochs


def _numeric_keys_without_maximum() -> list[str]:
    from medvit.config import _resolve, load_schema

    root = load_schema()
    missing: list[str] = []

    def walk(schema: dict, path: str) -> None:
        schema = _resolve(schema, root)
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else types
        if {"integer", "number"} & set(types) and "maximum" not in schema and "exclusiveMaximum" not in schema:
            missing.append(path)
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}" if path else key)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    walk(root, "")
    return missing


def test_every_numeric_key_of_the_study_schema_has_a_maximum():
    assert _numeric_keys_without_maximum() == []


@pytest.mark.parametrize("task, value, key", [
    ({"train": {"epochs": 10**12}}, 10**12, "tasks.histo.train.epochs"),
    ({"image_size": 1000000}, 1000000, "tasks.histo.image_size"),
    ({"train": {"batch_size": 10**8}}, 10**8, "tasks.histo.train.batch_size"),
    ({"train": {"num_workers": 10000}}, 10000, "tasks.histo.train.num_workers"),
    ({"synthetic": {"patients": 10**9}}, 10**9, "tasks.histo.synthetic.patients"),
    ({"detection": {"epochs": 10**6}}, 10**6, "tasks.brain.detection.epochs"),
    ({"evaluation": {"bootstrap": 10**12}}, 10**12, "evaluation.bootstrap"),
])
def test_huge_numbers_are_refused_with_the_usual_message(tmp_path, task, value, key):
    study = {"study": "s", "tasks": {"histo": {}}}
    if "evaluation" in task:
        study["evaluation"] = task["evaluation"]
    elif "detection" in task:
        study["tasks"] = {"brain": task}
    else:
        study["tasks"]["histo"] = task
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    message = str(pytest.raises(ConfigError, load_study, path).value)
    assert f"{key}: got {value}; allowed: an integer >= " in message and " and <= " in message


def test_the_trainer_refuses_endless_epochs_and_snakemake_runs_no_job(tmp_path):
    from medvit.engine.trainer import MAX_EPOCHS, TrainConfig

    assert TrainConfig(epochs=MAX_EPOCHS).epochs == MAX_EPOCHS
    with pytest.raises(ConfigError,
                       match=r"train.epochs: 1000000000000 is not allowed; allowed: an integer >= 1 and <= "):
        TrainConfig(epochs=10**12)
    study = tmp_path / "study.yaml"
    study.write_text("study: s\ntasks:\n  histo:\n    image_size: 1000000\n    train: {epochs: 1000000000000}\n")
    proc = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--cores", "1", "--configfile", str(study)], capture_output=True, text=True, timeout=300,
                          env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tasks.histo.image_size: got 1000000" in out
    assert "tasks.histo.train.epochs: got 1000000000000" in out and "rule " not in out
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------ 8. duplicate YAML keys


@pytest.mark.parametrize("text, expected", [
    ("study: a\ntasks: {histo: {}}\nstudy: b\n", ["key 'study' at lines 1 and 3"]),
    ("study: a\ntasks:\n  histo: {}\ntasks:\n  xray: {}\n", ["key 'tasks' at lines 2 and 4"]),
    ("study: a\ntasks:\n  histo:\n    train: {epochs: 2}\n    models: [resnet18]\n    train: {epochs: 50}\n",
     ["tasks.histo: key 'train' at lines 4 and 6"]),
    ("study: a\ntasks:\n  histo:\n    train: {epochs: 2, epochs: 3}\n",
     ["tasks.histo.train: key 'epochs' at lines 4 and 4"]),
])
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(tmp_path, capsys, text, expected):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    message = str(pytest.raises(ConfigError, load_study, path).value)
    for words in expected:
        assert words in message, message
    assert "gives a key twice" in message
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: study config")


# ------------------------------------------------------------------ 9. identifiers in quarantine.csv

KEY = "k3Y-f0r-t3sts-9Qx7LmZp2RvW"


def test_quarantine_redacts_every_identifying_tag_value_from_paths_and_reasons(tmp_path):
    """Folder names built from AccessionNumber, ReferringPhysicianName, InstitutionName,
    StationName and the StudyInstanceUID, and a tag value echoed by a decoder's error."""
    from pydicom import dcmread

    from medvit.data.ingest import ingest

    src = tmp_path / "export"
    study_uid = "1.2.826.0.1.3680043.9.99887766"
    good = _dicom(src / "in" / "good.dcm", 1, 8, 8)
    ds = dcmread(good)
    ds.PatientID, ds.PatientName = "PLUGHPID01", "Plover^Ada"
    ds.AccessionNumber, ds.ReferringPhysicianName = "ACC99887766", "Quimby^Zebediah"
    ds.InstitutionName, ds.StationName = "Xyzzy Infirmary", "FROBOZZ7"
    ds.StudyDescription, ds.StudyDate, ds.StudyInstanceUID = "Grue imaging of Ada", "20240229", study_uid
    ds.save_as(good)
    ds.PhotometricInterpretation = "QUIMBYZEBEDIAH"  # the decoder quotes this value in its error
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.5"
    ds.save_as(src / "in" / "odd_photometric.dcm")
    for folder in ("ACC99887766", "Quimby_Zebediah", "Xyzzy-Infirmary", "FROBOZZ7", study_uid, "20240229_scan"):
        (src / folder).mkdir(parents=True)
        (src / folder / "report.txt").write_text("free text")
        (src / folder / "broken.dcm").write_bytes(good.read_bytes()[:300])
    result = ingest(src, tmp_path / "out" / "manifest.csv", key=KEY)
    text = result.quarantine.read_text()
    assert result.n_quarantined == 13 and text.count("[redacted]/report.txt") == 6, text
    assert text.count("[redacted]/broken.dcm") == 6 and "in/odd_photometric.dcm" in text
    assert "Photometric Interpretation' value '[redacted]'" in text
    for planted in ("ACC99887766", "99887766", "Quimby", "Zebediah", "QUIMBYZEBEDIAH", "Xyzzy", "Infirmary",
                    "FROBOZZ7", "PLUGHPID01", "Plover", "20240229", study_uid, "Grue"):
        assert planted.lower() not in text.lower(), planted


# ------------------------------------------------------------------ 11. guessable pseudonymisation keys


@pytest.mark.parametrize("key, why", [
    (" " * 16, "only 1 distinct character"),
    ("0" * 16, "only 1 distinct character"),
    ("0123456789abcdef0123", "runs of repeated or consecutive characters"),
    ("1234567890123456", "runs of repeated or consecutive characters"),
    ("passwordpassword", "repeats a 8-character pattern"),
    ("abababababababab", "only 2 distinct characters"),
])
def test_pseudonymisation_keys_with_too_little_entropy_are_refused(tmp_path, monkeypatch, capsys, key, why):
    from medvit.data.ingest import PseudonymKeyError, ingest, resolve_key

    src = tmp_path / "export"
    _dicom(src / "a.dcm", 1, 8, 8)
    with pytest.raises(PseudonymKeyError, match="too little entropy") as info:
        ingest(src, tmp_path / "out" / "manifest.csv", key=key)
    assert why in str(info.value) and key not in str(info.value) and "secrets.token_hex(32)" in str(info.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("MEDVIT_PSEUDONYM_KEY", key)
    with pytest.raises(PseudonymKeyError, match="too little entropy"):
        resolve_key()
    assert main(["ingest", str(src), "--out", str(tmp_path / "out" / "m.csv")]) == 2
    assert "too little entropy" in capsys.readouterr().err


def test_random_keys_are_accepted():
    import secrets

    from medvit.data.ingest import key_weakness

    assert key_weakness(KEY) is None
    assert all(key_weakness(secrets.token_hex(32)) is None for _ in range(200))
    assert sum(key_weakness(secrets.token_hex(8)) is not None for _ in range(2000)) <= 2  # 16 hex characters


# ------------------------------------------------------------------ 10. patient ids that are names, MRNs, dates

NAMES = ["John Smith", "Maria Garcia 1961-02-03", "MRN 00123456", "Doe^Jane", "00987654"]


def _named_manifest(tmp_path: Path) -> Path:
    import pandas as pd

    manifest = _histo(tmp_path / "data", patients=8)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    ids = sorted(df["patient_id"].unique())
    df["patient_id"] = df["patient_id"].map({old: (NAMES[i] if i < len(NAMES) else old) for i, old in enumerate(ids)})
    df.to_csv(manifest, index=False)
    return manifest


def test_patient_ids_that_look_like_names_mrns_or_dates_are_warned_about(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    manifest = _named_manifest(tmp_path)
    report = validate_manifest(manifest)
    text = "\n".join(report.warnings)
    assert report.ok  # a warning, not a problem
    for words in ("3 of 8 patients have ids with spaces", "1 of 8 patients have ids with '^'",
                  "with a date", "with a run of 6 or more digits", "medvit manifest pseudonymize"):
        assert words in text, text
    assert main(["manifest", "validate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "warnings:" in out and "medvit manifest pseudonymize" in out
    assert not any(name in text or name in out for name in NAMES)  # the ids themselves are never repeated
    # the split stage logs them and keeps them in split.json; the report's data section shows them
    study = _study(tmp_path, {"label_column": "label"})
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 0
    import json

    from medvit.evaluation.report_sections import TaskResults, data_section

    split = json.loads((tmp_path / "results" / "s" / "histo" / "split.json").read_text())
    assert any("have ids with spaces" in w for w in split["warnings"])
    html = data_section({"histo": TaskResults("histo", [], split=split)}).body
    assert "Warning: patient_id: 3 of 8 patients have ids with spaces" in html and "pseudonymize" in html


def test_identifying_patient_ids_error_refuses_the_study_and_the_pseudonymised_copy_passes(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    manifest = _named_manifest(tmp_path)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "identifying_patient_ids": "error",
                                     "tasks": {"histo": {"manifest": "data/manifest.csv"}}}))
    message = str(pytest.raises(ConfigError, load_study, study).value)
    assert "have ids with spaces" in message and "identifying_patient_ids: error" in message
    assert not any(name in message for name in NAMES)
    # the fix the warning names: keyed pseudonyms, same grouping, paths still valid
    monkeypatch.setenv("MEDVIT_PSEUDONYM_KEY", KEY)
    new = tmp_path / "data" / "manifest_pseudonymised.csv"
    assert main(["manifest", "pseudonymize", str(manifest), "--out", str(new)]) == 0
    assert "8 patients" in capsys.readouterr().out
    report = validate_manifest(new)
    assert report.ok and report.warnings == [] and report.summary["patients"] == 8
    assert not any(name in new.read_text() for name in NAMES) and KEY not in new.read_text()
    study.write_text(yaml.safe_dump({"study": "s", "identifying_patient_ids": "error",
                                     "tasks": {"histo": {"manifest": "data/manifest_pseudonymised.csv"}}}))
    assert load_study(study)["identifying_patient_ids"] == "error"
    # a copy in another folder keeps its images reachable through relative paths
    elsewhere = tmp_path / "clean" / "manifest.csv"
    assert main(["manifest", "pseudonymize", str(manifest), "--out", str(elsewhere)]) == 0
    assert "MEDVIT_DATA_ROOTS" in capsys.readouterr().out
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path / "data"))
    assert validate_manifest(elsewhere).ok


# ------------------------------------------------------------------ 13. a full disk


def test_a_full_disk_is_an_error_line_naming_the_path_and_the_free_space(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors import SafetensorError

    import medvit.engine.checkpoint as ckpt_mod
    from medvit.engine.checkpoint import load_weights, save_weights
    from medvit.errors import DiskFullError

    net = torch.nn.Linear(3, 2)
    path = save_weights(tmp_path / "model.safetensors", net, {"epoch": 1})

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(DiskFullError) as info:
        save_weights(path, torch.nn.Linear(3, 2), {"epoch": 2})
    assert isinstance(info.value, MedvitError) and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and " free on its file system" in str(info.value)
    monkeypatch.undo()
    assert load_weights(path, torch.nn.Linear(3, 2))["epoch"] == 1  # nothing was lost
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # through the CLI: an `error:` line, exit code 2, no traceback
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    _histo(tmp_path / "data")
    study = _study(tmp_path, {})

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_full)
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "results/s/histo/split.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device writing results/s/histo/split.csv (")
    assert "free on its file system" in err and "Traceback" not in err
    monkeypatch.undo()

    # a library writing its own file (not through medvit.fileio) is reported the same way
    import medvit.tasks.common as common

    def library_write(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "figure.png"))

    monkeypatch.setattr(common, "split_stage", library_write)
    assert main(["split", "--config", str(study), "--task", "histo", "--out", "x.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on the device writing {tmp_path / 'figure.png'} (")


# ------------------------------------------------------------------ 12. two trainers, orphaned trainers

_TRAINER_CHILD = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from medvit.engine.trainer import Trainer, TrainConfig

    class Data(Dataset):
        def __len__(self):
            return 32
        def __getitem__(self, i):
            return {"image": torch.full((4,), float(i % 2)), "label": torch.tensor(i % 2)}

    class Slow(Trainer):
        def train_step(self, batch, scale=1.0):
            time.sleep(0.05)
            return super().train_step(batch, scale)

    torch.set_num_threads(1)
    trainer = Slow(nn.Linear(4, 2), Data(), None, TrainConfig(epochs=1000, batch_size=4, device="cpu", log_every=1,
                                                              warmup_epochs=0),
                   Path(sys.argv[1]), loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["label"]),
                   progress=False)
    trainer.fit()
''')


def _tiny_trainer(out: Path):
    import torch
    from torch import nn

    from medvit.engine.trainer import TrainConfig, Trainer

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"image": torch.full((4,), float(i % 2)), "label": torch.tensor(i % 2)}

    return Trainer(nn.Linear(4, 2), Data(), None, TrainConfig(epochs=1, batch_size=4, device="cpu", warmup_epochs=0),
                   out, loss_fn=lambda o, b: nn.functional.cross_entropy(o, b["label"]), progress=False)


def test_two_trainers_never_write_one_output_folder(tmp_path, capsys):
    out = tmp_path / "model"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom medvit.fileio import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MedvitError, match=rf"being written by another process \(pid {holder.pid}\)"):
            _tiny_trainer(out).fit()
        assert not (out / "checkpoints").exists()
        assert main(["train", "--config", "s.yaml", "--task", "histo", "--model", "resnet18", "--split", "x.csv",
                     "--out", str(out)]) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert _tiny_trainer(out).fit().completed  # the lock went with the process that held it
    assert _tiny_trainer(out).fit().completed  # and the trainer released its own


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_trainer_whose_parent_died_checkpoints_and_stops(tmp_path):
    """A job's shell killed (as when Snakemake is killed): the orphaned trainer notices, saves
    its checkpoint and exits, instead of training on and writing results nobody waits for."""
    out = tmp_path / "model"
    script = tmp_path / "child.py"
    script.write_text(_TRAINER_CHILD)
    pidfile = tmp_path / "pid"
    shell = subprocess.Popen(["bash", "-c", f'"{sys.executable}" "{script}" "{out}" 2>"{tmp_path}/err" & '
                                            f'echo $! > "{pidfile}"; wait'], cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not ((out / "train.log").is_file() and "step" in (out / "train.log").read_text()):
        assert time.time() < deadline and shell.poll() is None, (tmp_path / "err").read_text()
        time.sleep(0.5)
    child = int(pidfile.read_text())
    shell.kill()  # SIGKILL: the trainer is not told
    shell.wait()
    deadline = time.time() + 60
    while _alive(child) and time.time() < deadline:
        time.sleep(0.5)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the orphaned trainer kept running after its parent died")
    log = (out / "train.log").read_text()
    assert "the parent process" in log and "has died: checkpointing and stopping" in log
    assert (out / "checkpoints" / "last.json").is_file()
    assert "training stopped by SIGHUP" in (tmp_path / "err").read_text()
