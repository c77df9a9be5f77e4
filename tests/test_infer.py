"""Model packages, `medvit infer` and `medvit export` on a tiny trained classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import dicom_dataset
from PIL import Image
from pydicom.uid import generate_uid

from medvit.cli import main
from medvit.tasks.package import PackageError, read_package

pytestmark = pytest.mark.slow

KEY = "infer-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 trained for one epoch on a synthetic chest X-ray study (grayscale, multi-label
    findings), predicted and evaluated by the pipeline's own stage functions."""
    from medvit.data.synth import synthesize
    from medvit.tasks.classification import predict, train
    from medvit.tasks.common import split_stage
    from medvit.tasks.evaluate import evaluate_stage

    work = tmp_path_factory.mktemp("infer")
    manifest = synthesize("xray", n_patients=12, out_dir=work / "data", seed=0, image_size=32)
    study = {"study": "t", "seed": 0, "device": "cpu", "evaluation": {"bootstrap": 20},
             "tasks": {"xray": {"manifest": str(manifest), "image_size": 32, "models": ["resnet18"],
                                 "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}}}
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    split = split_stage(config, "xray", work / "split.csv")
    model_dir = work / "resnet18"
    weights = train(config, "xray", "resnet18", split, model_dir)
    predict(config, "xray", "resnet18", split, weights, model_dir / "predictions.csv")
    evaluate_stage(config, "xray", "resnet18", model_dir / "predictions.csv", model_dir / "metrics.json")
    return work, model_dir


def _copy(model_dir: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        shutil.copy(model_dir / name, dst / name)
    return dst


def test_evaluation_completes_the_package_and_card(trained):
    _, model_dir = trained
    block, meta = read_package(model_dir)
    classes = meta["spec"]["classes"]
    assert block["architecture"] == {"name": "resnet18", "kwargs": {"in_chans": 1, "num_classes": len(classes)}}
    assert block["image_size"] == [32, 32] and block["channels"] == ["image"]
    assert block["task"]["kind"] == "multilabel" and block["task"]["classes"] == classes
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert block["threshold"]["patient"] == metrics["threshold"]["patient"]
    assert block["aggregate"]["method"] == metrics["aggregate"]["method"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Training data", "## Test metrics (patient level", "## Limits",
                    "## Provenance"):
        assert heading in card
    assert "| auroc_macro |" in card and meta["sha256"] in card


def test_infer_gives_the_pipelines_test_scores(trained, tmp_path):
    work, model_dir = trained
    split = pd.read_csv(work / "split.csv")
    test = split[split["split"] == "test"].drop(columns=["labels", "split"])
    manifest = work / "new_patients.csv"  # no labels, no split
    test.to_csv(manifest, index=False)
    assert main(["infer", "--model", str(model_dir), "--input", str(manifest), "--out", str(tmp_path / "out")]) == 0
    out = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    ref = pd.read_csv(model_dir / "predictions.csv")
    ref = ref[ref["split"] == "test"]
    samples = out[out["level"] == "sample"].merge(ref, on="sample_id", suffixes=("", "_ref"))
    assert len(samples) == len(ref) == len(test)
    block, _ = read_package(model_dir)
    thr = block["threshold"]
    patients = out[out["level"] == "patient"].set_index("patient_id")
    assert set(patients.index) == set(test["patient_id"])
    for c in block["task"]["classes"]:
        assert np.abs(samples[f"score_{c}"] - samples[f"score_{c}_ref"]).max() <= 1e-5
        assert ((samples[f"score_{c}"] >= thr["sample"][c]).astype(int) == samples[f"call_{c}"]).all()
        assert ((patients[f"score_{c}"] >= thr["patient"][c]).astype(int) == patients[f"call_{c}"]).all()
        for pid, part in samples.groupby("patient_id"):  # max aggregation
            assert patients.loc[pid, f"score_{c}"] == pytest.approx(part[f"score_{c}"].max(), abs=1e-6)
            assert patients.loc[pid, "n_samples"] == len(part)
    info = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert info["n_samples"] == len(test) and info["n_quarantined"] == 0


def _dicom(path: Path, pixels: np.ndarray, patient: tuple[str, str], series: str, modality: str = "DX") -> None:
    ds = dicom_dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient[0], patient[1], "19600101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), series, modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_infer_on_a_folder_of_dicom_quarantines_bad_files(trained, tmp_path):
    _, model_dir = trained
    src = tmp_path / "incoming"
    rng = np.random.default_rng(0)
    for name, mrn in [("Doe^Jane", "MRN55501234"), ("Roe^Richard", "MRN55509876")]:
        _dicom(src / f"{name.split('^')[0]}_{mrn}" / "img.dcm", rng.integers(0, 4000, (40, 40)), (name, mrn),
               generate_uid())
    (src / "broken.dcm").write_bytes(b"DICM" + b"\0" * 50)  # not an image
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / "colour.png")  # 3 channels
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_dir), "--input", str(src), "--out", str(out), "--key", KEY]) == 0
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert (pred["level"] == "sample").sum() == 2 and (pred["level"] == "patient").sum() == 2
    assert pred.filter(like="score_").stack().between(0, 1).all()
    quarantine = pd.read_csv(out / "quarantine.csv")
    reasons = " ".join(quarantine["reason"].astype(str))
    assert len(quarantine) == 2 and "3 channel(s)" in reasons
    texts = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".json")]
    for identifier in ("Doe", "Jane", "MRN55501234", "Roe", "19600101"):
        assert not any(identifier in t for t in texts), identifier


def test_infer_quarantines_another_modality_unless_asked(trained, tmp_path):
    """A CT or MR series given to a chest X-ray model is quarantined, naming both modalities;
    `--any-modality` scores it."""
    _, model_dir = trained
    src = tmp_path / "incoming"
    rng = np.random.default_rng(1)
    for i, modality in enumerate(["DX", "CR", "CT", "MR"]):
        _dicom(src / f"p{i}" / "img.dcm", rng.integers(0, 4000, (40, 40)), (f"P^{i}", f"ID{i}"), generate_uid(),
               modality)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_dir), "--input", str(src), "--out", str(out), "--key", KEY]) == 0
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert (pred["level"] == "sample").sum() == 2
    reasons = sorted(pd.read_csv(out / "quarantine.csv")["reason"])
    assert len(reasons) == 2 and reasons[0].startswith("modality CT: this xray model learned from CR/DX/RG images")
    assert reasons[1].startswith("modality MR:")
    every = tmp_path / "every"
    assert main(["infer", "--model", str(model_dir), "--input", str(src), "--out", str(every), "--key", KEY,
                 "--any-modality"]) == 0
    assert (pd.read_csv(every / "predictions.csv")["level"] == "sample").sum() == 4
    assert len(pd.read_csv(every / "quarantine.csv")) == 0


def test_a_package_without_a_field_is_refused(trained, tmp_path, capsys):
    _, model_dir = trained
    pkg = _copy(model_dir, tmp_path / "pkg")
    meta = json.loads((pkg / "model.json").read_text())
    del meta["inference"]["threshold"]["patient"]
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"inference\.threshold\.patient"):
        read_package(pkg)
    del meta["inference"]
    (pkg / "model.json").write_text(json.dumps(meta))
    assert main(["infer", "--model", str(pkg), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no 'inference' block" in err and "medvit package" in err
    assert len(err.splitlines()) == 1


def test_package_command_completes_an_older_folder(trained, tmp_path):
    work, model_dir = trained
    pkg = _copy(model_dir, tmp_path / "old")
    shutil.copy(model_dir / "metrics.json", pkg / "metrics.json")
    meta = json.loads((pkg / "model.json").read_text())
    expected = meta.pop("inference")
    (pkg / "model.json").write_text(json.dumps(meta))
    assert main(["package", "--config", str(work / "study.yaml"), "--task", "xray", "--model-dir", str(pkg)]) == 0
    assert read_package(pkg)[0] == expected


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained, tmp_path, fmt, capsys):
    pytest.importorskip("onnxruntime")
    _, model_dir = trained
    pkg = _copy(model_dir, tmp_path / "pkg")
    assert main(["export", "--model", str(pkg), "--format", fmt]) == 0
    assert "max abs difference to PyTorch" in capsys.readouterr().out
    record = json.loads((pkg / f"model.{'onnx' if fmt == 'onnx' else 'pt'}.export.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["batches"] == [2, 3]


def test_export_of_a_vit_keeps_its_input_standardisation(trained, tmp_path):
    """A ViT package (input_norm inside the weights): the exported graph standardises too."""
    pytest.importorskip("onnxruntime")
    from medvit.engine import save_weights
    from medvit.models import create_model
    from medvit.tasks.export import export_model

    _, model_dir = trained
    block, meta = read_package(model_dir)
    vit = create_model("vit_tiny", in_chans=1, num_classes=1, img_size=32, patch_size=8)
    vit.input_norm.set_statistics([0.4], [0.2])
    block = {**block, "architecture": {"name": "vit_tiny", "kwargs": {"in_chans": 1, "num_classes": 1,
                                                                      "img_size": 32, "patch_size": 8}},
             "input_norm": vit.input_norm.statistics()}
    pkg = tmp_path / "vit"
    pkg.mkdir()
    save_weights(pkg / "model.safetensors", vit, {**{k: v for k, v in meta.items() if k not in (
        "format", "sha256", "bytes", "tensors", "created", "weights", "params", "trainable_params")},
        "model": "vit_tiny", "inference": block})
    record = export_model(pkg, "onnx")
    assert record["max_abs_diff"] <= 1e-4
    import onnxruntime as ort

    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(record["path"], providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = vit.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"image": x})[0] - expected).max() <= 1e-4


def test_export_refuses_an_unsupported_operator_by_name(trained, tmp_path, monkeypatch, capsys):
    from medvit.tasks import export as export_module

    class Spectral(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft2(x).real.mean(dim=(1, 2, 3))[:, None]

    _, model_dir = trained
    pkg = _copy(model_dir, tmp_path / "pkg")
    monkeypatch.setattr(export_module, "build_classifier", lambda block, weights: Spectral().eval())
    assert main(["export", "--model", str(pkg), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "aten::fft_fft2" in err and len(err.splitlines()) == 1
    assert not (pkg / "model.onnx").exists()


def test_study_infer_cohorts_run_after_evaluation(tmp_path):
    """`tasks.<task>.infer` adds one `infer` job per model and cohort, after its evaluation."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cohort.csv").write_text("patient_id,image\np1,a.png\n")
    study = {"study": "wf", "device": "cpu",
             "tasks": {"xray": {"synthetic": {"patients": 12, "image_size": 32}, "image_size": 32,
                                "models": ["resnet18", "densenet121"],
                                "infer": [{"name": "new_site", "input": "cohort.csv"}]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "snakemake"), "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
                           "--cores", "2", "--configfile", str(tmp_path / "s.yaml"), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"^infer\s+2$", out, re.M), out[-3000:]
    for model in ("resnet18", "densenet121"):
        assert f"results/wf/xray/{model}/infer/new_site/predictions.csv" in out
    # Snakemake lists jobs in no fixed order: every infer job must wait for its own model's evaluation.
    infer_jobs = [block.split("\nrule ")[0].split("\n[")[0] for block in out.split("rule infer:")[1:]]
    assert len(infer_jobs) == 2, out[-3000:]
    for job in infer_jobs:
        model = re.search(r"results/wf/xray/(\w+)/model\.safetensors", job).group(1)
        assert f"results/wf/xray/{model}/metrics.json" in job, job
