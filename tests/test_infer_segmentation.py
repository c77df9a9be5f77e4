"""`medvit infer` on segmentation packages: the prostate fold ensemble reproduces the study's own
volume scores and maps, in the input's geometry; DICOM input gets a DICOM SEG and NIfTI maps
with the series' affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import dicom_dataset
from pydicom.uid import MRImageStorage, generate_uid

from medvit.cli import main
from medvit.tasks.package import PackageError, read_package

pytestmark = pytest.mark.slow

KEY = "infer-seg-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """unet3d in 2-fold cross-validation on a tiny synthetic prostate study (16^3, 1 epoch),
    pooled, evaluated and tested on an external synthetic cohort by the pipeline's own stages."""
    from medvit.data.synth import synthesize
    from medvit.tasks.common import split_stage
    from medvit.tasks.evaluate import evaluate_stage
    from medvit.tasks.segmentation import cv_fold_stage, cv_pool_stage, external_test_stage

    work = tmp_path_factory.mktemp("seg")
    manifest = synthesize("prostate", n_patients=10, out_dir=work / "data", seed=0, image_size=16)
    external = synthesize("prostate", n_patients=4, out_dir=work / "ext", seed=7, image_size=16)
    study = {"study": "t", "seed": 0, "device": "cpu", "evaluation": {"bootstrap": 20},
             "tasks": {"prostate": {"manifest": str(manifest), "image_size": 16, "roi_size": [16, 16, 16],
                                    "folds": 2, "models": ["unet3d"], "external_manifest": str(external),
                                    "train": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0}}}}
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    split = split_stage(config, "prostate", work / "prostate" / "split.csv")
    model_dir = work / "prostate" / "unet3d"
    folds = [model_dir / f"fold{i}" for i in range(2)]
    for i, d in enumerate(folds):
        cv_fold_stage(config, "prostate", "unet3d", split, i, d)
    cv_pool_stage(config, "prostate", "unet3d", split, folds, model_dir)
    evaluate_stage(config, "prostate", "unet3d", model_dir / "predictions.csv", model_dir / "metrics.json")
    external_test_stage(config, "prostate", "unet3d", split, model_dir / "model.safetensors", model_dir / "external")
    return work, model_dir, external


def test_evaluation_writes_the_ensemble_package(ensemble):
    _, model_dir, _ = ensemble
    block, _ = read_package(model_dir)
    assert block["kind"] == "segmentation" and block["architecture"]["name"] == "unet3d"
    assert block["channels"] == ["image_t2w", "image_adc", "image_hbv"]
    assert block["image_size"] == [16, 16, 16] and block["roi_size"] == [16, 16, 16]
    members = block["ensemble"]["members"]
    assert [m["folder"] for m in members] == ["fold0", "fold1"]
    for m in members:
        assert m["weights_sha256"] == json.loads((model_dir / m["folder"] / "model.json").read_text())["sha256"]
    assert block["mask_threshold"] == 0.5 and block["threshold"]["patient"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert "lesion segmentation" in card and "2 fold model(s)" in card


def test_infer_reproduces_the_ensembles_external_maps_in_input_geometry(ensemble, tmp_path):
    _, model_dir, external = ensemble
    cohort = pd.read_csv(external).drop(columns=["label", "mask"])  # no labels, no split
    manifest = external.parent / "unlabelled.csv"
    cohort.to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_dir), "--input", str(manifest), "--out", str(out)]) == 0
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    samples = pred[pred["level"] == "sample"].set_index("sample_id")
    ref = pd.read_csv(model_dir / "external" / "predictions.csv", keep_default_na=False,
                      dtype={"sample_id": str}).set_index("sample_id")
    assert sorted(samples.index) == sorted(ref.index) == sorted(cohort["sample_id"].astype(str))
    assert np.abs(samples["score_cspca"] - ref.loc[samples.index, "score_cspca"]).max() <= 1e-5
    for sid, row in samples.iterrows():
        source = nib.load(str(external.parent / cohort.set_index("sample_id").loc[sid, "image_t2w"]))
        prob = nib.load(str(out / row["prob_map"]))
        mask = nib.load(str(out / row["mask_map"]))
        for img in (prob, mask):
            assert img.shape == source.shape[:3]
            assert np.allclose(img.affine, source.affine, atol=1e-5)
        pipeline = model_dir / "external" / ref.loc[sid, "prob_map"]
        assert np.abs(prob.get_fdata() - nib.load(str(pipeline)).get_fdata()).max() <= 1e-5
        assert np.array_equal(mask.get_fdata(), nib.load(str(model_dir / "external" / ref.loc[sid, "mask_map"]))
                              .get_fdata())
        assert np.array_equal(mask.get_fdata() > 0, prob.get_fdata() > 0.5)
        assert row["score_cspca"] == pytest.approx(float(prob.get_fdata().max()), abs=1e-4)
    patients = pred[pred["level"] == "patient"]
    assert set(patients["patient_id"]) == set(cohort["patient_id"])


def _mr_series(folder: Path, volume: np.ndarray, patient: tuple[str, str]) -> None:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for z, plane in enumerate(volume):
        ds = dicom_dataset(MRImageStorage)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient[0], patient[1], "19580101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, z + 1
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "ACC77", "1"
        ds.ReferringPhysicianName = "Who^Dr"
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, 5.0, 2.5 * z - 8.0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.6], 2.5
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = plane.astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice{z:02d}.dcm", enforce_file_format=True)


def _one_channel_package(tmp_path: Path, template: dict) -> Path:
    """An untrained one-channel unet3d ensemble of two members, packaged like a study's."""
    from medvit.engine import save_weights
    from medvit.models import create_model
    from medvit.tasks.segmentation import FoldEnsemble

    block = {**template, "architecture": {"name": "unet3d", "kwargs": {"in_chans": 1, "num_classes": 1}},
             "channels": ["image"],
             "ensemble": {**template["ensemble"], "members": template["ensemble"]["members"][:2]}}
    pkg = tmp_path / "pkg1"
    save_weights(pkg / "model.safetensors", FoldEnsemble([create_model("unet3d", in_chans=1, num_classes=1)
                                                          for _ in range(2)]),
                 {"task": "prostate", "model": "unet3d", "inference": block})
    return pkg


def test_infer_on_a_dicom_series_writes_seg_and_nifti_on_the_series_grid(ensemble, tmp_path):
    import pydicom

    _, model_dir, _ = ensemble
    block, _ = read_package(model_dir)
    pkg = _one_channel_package(tmp_path, block)
    rng = np.random.default_rng(0)
    src = tmp_path / "incoming"
    _mr_series(src / "Doe_MRN44401234" / "t2", rng.integers(0, 3000, (6, 20, 18)), ("Doe^Jane", "MRN44401234"))
    (src / "notes.dcm").write_bytes(b"DICM" + b"\0" * 40)  # broken: quarantined
    out = tmp_path / "out"
    assert main(["infer", "--model", str(pkg), "--input", str(src), "--out", str(out), "--key", KEY]) == 0
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    row = pred[pred["level"] == "sample"].iloc[0]
    assert row["dicom_seg"].endswith("_seg.dcm") and row["prob_map"].endswith("_prob.nii.gz")
    seg = pydicom.dcmread(str(out / row["dicom_seg"]))
    assert seg.Modality == "SEG" and seg.PatientID == row["patient_id"] and str(seg.PatientName) == ""
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6
    prob = nib.load(str(out / row["prob_map"]))
    assert prob.shape == (18, 20, 6)  # (columns, rows, slices)
    # voxel (i, j, k) = column i, row j of slice k: LPS (-10 + 0.6 i, 5 + 0.8 j, -8 + 2.5 k) -> RAS
    expected = np.array([[-0.6, 0, 0, 10.0], [0, -0.8, 0, -5.0], [0, 0, 2.5, -8.0], [0, 0, 0, 1]])
    assert np.allclose(prob.affine, expected, atol=1e-5)
    assert len(pd.read_csv(out / "quarantine.csv")) == 1
    texts = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".json")]
    texts.append(seg.to_json())
    for identifier in ("Doe", "Jane", "MRN44401234", "19580101", "ACC77"):
        assert not any(identifier in t for t in texts), identifier


def test_a_segmentation_package_without_its_members_is_refused(ensemble, tmp_path):
    import shutil

    _, model_dir, _ = ensemble
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(model_dir / name, pkg / name)
    meta = json.loads((pkg / "model.json").read_text())
    del meta["inference"]["ensemble"]["members"]
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"inference\.ensemble\.members"):
        read_package(pkg)


def test_a_multichannel_model_on_a_folder_names_the_channels(ensemble, tmp_path, capsys):
    import shutil

    _, model_dir, external = ensemble
    src = tmp_path / "incoming"
    src.mkdir()
    shutil.copy(next((external.parent).rglob("*.nii.gz")), src / "t2.nii.gz")
    assert main(["infer", "--model", str(model_dir), "--input", str(src), "--out", str(tmp_path / "o"),
                 "--key", KEY]) == 2
    err = capsys.readouterr().err
    assert "image_t2w" in err and "manifest" in err


def test_prostate_infer_cohorts_run_on_the_pooled_ensemble(tmp_path):
    """`tasks.prostate.infer`: one `infer` job per model on its pooled fold ensemble, after evaluation."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cohort.csv").write_text("patient_id,image_t2w,image_adc,image_hbv\np1,a.nii.gz,b.nii.gz,c.nii.gz\n")
    study = {"study": "wf", "device": "cpu",
             "tasks": {"prostate": {"synthetic": {"patients": 10, "image_size": 16}, "image_size": 16,
                                    "roi_size": [16, 16, 16], "folds": 2, "models": ["unet3d"],
                                    "infer": [{"name": "site_b", "input": "cohort.csv"}]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(repo / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "s.yaml"),
                           "-n"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"^infer\s+1$", out, re.M), out[-3000:]
    job = out.split("rule infer:")[1].split("rule ")[0]
    assert "results/wf/prostate/unet3d/infer/site_b/predictions.csv" in job
    assert "results/wf/prostate/unet3d/metrics.json" in job and "prostate/unet3d/model.safetensors" in job
