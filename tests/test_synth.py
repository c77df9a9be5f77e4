"""Tests of the synthetic studies (medvit.data.synth): files, manifests, determinism, signal.

Small studies keep the file fast; the learnability checks use features a simple model can
compute and fail if the lesions were not drawn (or drawn independently of the labels).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medvit.cli import main as cli_main
from medvit.data.io import read_image, read_sample
from medvit.data.manifest import load_manifest
from medvit.data.synth import (
    HISTO_SUBTYPES,
    MODALITIES,
    XRAY_FINDINGS,
    SynthError,
    synthesize,
)
from medvit.data.synth.brain import render as render_brain_slice
from medvit.errors import MedvitError

# Study sizes: enough patients for the learnability checks, small enough to stay fast.
N = {"xray": 40, "brain": 40, "prostate": 40, "histo": 32}
COLUMNS = {
    "xray": ["patient_id", "study_id", "sample_id", "image", "labels", "view"],
    "brain": ["patient_id", "study_id", "sample_id", "image", "label", "boxes", "slice_index"],
    "prostate": ["patient_id", "study_id", "sample_id", "image_t2w", "image_adc", "image_hbv", "mask", "label"],
    "histo": ["patient_id", "study_id", "sample_id", "image", "label", "subtype", "magnification"],
}


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {m: synthesize(m, N[m], root / m, seed=0) for m in MODALITIES}


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"modality": "ct", "n_patients": 10}, "unknown modality 'ct'"),
        ({"modality": "xray", "n_patients": 3}, "n_patients=3 is too small"),
        ({"modality": "histo", "n_patients": 2.5}, "n_patients must be an integer"),
        ({"modality": "brain", "n_patients": 10, "image_size": 8}, "image_size=8 is out of range for brain"),
        ({"modality": "prostate", "n_patients": 10, "image_size": 4096}, "image_size=4096 is out of range"),
        ({"modality": "xray", "n_patients": 10, "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, needle):
    with pytest.raises(SynthError, match=needle) as info:
        synthesize(out_dir=tmp_path / "out", **kwargs)
    assert isinstance(info.value, MedvitError)
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_cli_writes_study_and_reports_bad_arguments(tmp_path, capsys):
    assert cli_main(["synth", "xray", "--patients", "4", "--out", str(tmp_path / "x"), "--image-size", "32"]) == 0
    df = _read_csv(tmp_path / "x" / "manifest.csv")
    assert df["patient_id"].nunique() == 4
    assert read_image(tmp_path / "x" / df["image"].iloc[0]).shape == (1, 32, 32)
    assert cli_main(["synth", "brain", "--patients", "2", "--out", str(tmp_path / "b")]) == 2
    assert "error: n_patients=2 is too small" in capsys.readouterr().err


# ----------------------------------------------------------------------------- manifests and files


@pytest.mark.parametrize("modality", MODALITIES)
def test_manifest_follows_contract(studies, modality):
    path = studies[modality]
    df = _read_csv(path)
    assert list(df.columns) == [*COLUMNS[modality], "sex", "site"]
    # one sex and one site per patient, both values of each present
    per_patient = df.groupby("patient_id")[["sex", "site"]].nunique()
    assert (per_patient == 1).all().all()
    assert set(df["sex"]) == {"F", "M"} and set(df["site"]) <= {"site_1", "site_2", "site_3"}
    assert "split" not in df.columns
    assert df["patient_id"].nunique() == N[modality]
    assert df["sample_id"].is_unique
    path_cols = [c for c in df.columns if c.startswith("image") or c in ("mask", "boxes")]
    for col in path_cols:
        for value in df[col]:
            if value:
                assert not Path(value).is_absolute() and (path.parent / value).is_file(), value
    # The pipeline's own loader accepts every row and every file.
    manifest = load_manifest(path, check_files=True)
    assert manifest.problems == []
    assert len(manifest.df) == len(df)


@pytest.mark.parametrize(
    ("modality", "shape"),
    [("xray", (1, 64, 64)), ("brain", (1, 64, 64)), ("prostate", (3, 32, 32, 32)), ("histo", (3, 64, 64))],
)
def test_samples_load_with_expected_shapes(studies, modality, shape):
    path = studies[modality]
    df = _read_csv(path)
    for row in df.iloc[:: max(1, len(df) // 12)].to_dict("records"):
        img = read_sample(row, path.parent)
        assert img.shape == shape
        assert img.array.dtype == np.float32 and np.isfinite(img.array).all()
        assert float(img.array.std()) > 0
    if modality == "brain":  # 16-bit intensities survive (no 8-bit truncation)
        assert max(float(read_sample(r, path.parent).array.max()) for r in df.head(10).to_dict("records")) > 255
    if modality == "prostate":
        img = read_image(path.parent / df["image_t2w"].iloc[0])
        assert img.spacing == pytest.approx((1.5, 1.5, 1.5))


def test_xray_formats_and_fake_dicom_identity(studies):
    path = studies["xray"]
    df = _read_csv(path)
    suffixes = df["image"].map(lambda p: Path(p).suffix)
    assert set(suffixes) == {".dcm", ".png"}
    assert 0.2 < (suffixes == ".dcm").mean() < 0.5
    formats = {read_image(path.parent / p).source_format for p in df["image"]}
    assert formats == {"dicom", "png"}
    bit_depths = set()
    photometric = set()
    for rel in df["image"]:
        f = path.parent / rel
        if f.suffix == ".png":
            from PIL import Image

            bit_depths.add(Image.open(f).mode)
            continue
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality in {"CR", "DX"}
        assert str(ds.PatientName).startswith("SYNTH^") and ds.PatientID.startswith("SYN")
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.PixelRepresentation == 0
        assert len(ds.PixelSpacing) == 2
        photometric.add(ds.PhotometricInterpretation)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            # The reader must undo the inversion: lungs dark, mediastinum bright, as in MONOCHROME2.
            arr = read_image(f).array[0]
            assert np.allclose(arr, 4095 - ds.pixel_array.astype(np.float32))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert bit_depths == {"L", "I;16"}  # 8-bit and 16-bit PNGs


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, modality):
    a = synthesize(modality, 4, tmp_path / "a", seed=7)
    b = synthesize(modality, 4, tmp_path / "b", seed=7)
    c = synthesize(modality, 4, tmp_path / "c", seed=8)
    ha, hb, hc = (_tree_hashes(p.parent) for p in (a, b, c))
    assert ha == hb
    assert a.read_bytes() == b.read_bytes()
    assert ha != hc
    shared = {k for k in set(ha) & set(hc) if k.startswith("images/")}  # (empty masks are equal)
    assert shared and all(ha[k] != hc[k] for k in shared)  # every image differs, not just one


# ----------------------------------------------------------------------------- labels


def test_both_classes_present_everywhere(studies):
    xray = _read_csv(studies["xray"])
    findings = xray["labels"].str.split("|")
    for f in XRAY_FINDINGS:
        has = findings.map(lambda ls, f=f: f in ls)
        assert 0.1 < has.mean() < 0.5, f
    assert (xray["labels"] == "").any()
    for modality, classes in (("brain", {"normal", "tumor"}), ("prostate", {"cspca", "no_cspca"}),
                              ("histo", {"benign", "malignant"})):
        assert set(_read_csv(studies[modality])["label"]) == classes
    # Tumour patients are a minority, and within them only some slices show the tumour.
    brain = _read_csv(studies["brain"])
    per_patient = brain.groupby("patient_id")["label"].agg(lambda s: (s == "tumor").sum())
    assert 0.2 <= (per_patient > 0).mean() <= 0.5
    assert (per_patient[per_patient > 0] < brain.groupby("patient_id").size()[per_patient > 0]).all()


def test_minimum_study_has_every_class(tmp_path):
    xray = _read_csv(synthesize("xray", 4, tmp_path / "x"))
    for f in XRAY_FINDINGS:
        assert xray["labels"].str.contains(f).any(), f
    histo = _read_csv(synthesize("histo", 4, tmp_path / "h", image_size=32))
    assert set(histo["subtype"]) == set(HISTO_SUBTYPES)
    for modality, pos in (("brain", "tumor"), ("prostate", "cspca")):
        labels = _read_csv(synthesize(modality, 4, tmp_path / modality))["label"]
        assert (labels == pos).any() and (labels != pos).any()


def test_histo_subtype_is_per_patient(studies):
    df = _read_csv(studies["histo"])
    assert (df.groupby("patient_id")["subtype"].nunique() == 1).all()
    assert (df["subtype"].map(HISTO_SUBTYPES) == df["label"]).all()
    assert set(df["magnification"]) <= {"40X", "100X", "200X", "400X"}
    assert df.groupby("patient_id").size().between(8, 16).all()


def test_brain_boxes_are_valid_and_contiguous(studies):
    path = studies["brain"]
    df = _read_csv(path)
    tumour = df["label"] == "tumor"
    assert (df.loc[~tumour, "boxes"] == "").all()
    for rel in df.loc[tumour, "boxes"]:
        lines = (path.parent / rel).read_text().splitlines()
        assert len(lines) == 1
        cls, *vals = lines[0].split()
        cx, cy, w, h = map(float, vals)
        assert cls == "0" and 0 < w <= 1 and 0 < h <= 1
        assert 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6 and 0 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6
    # A tumour is one ellipsoid: its slices are consecutive.
    for _, g in df[tumour].groupby("patient_id"):
        idx = sorted(g["slice_index"].astype(int))
        assert idx == list(range(idx[0], idx[-1] + 1))


def test_brain_box_matches_drawn_tumour():
    """Render one slice with and without its tumour (noise off): the change sits in the box."""
    size = 64
    h = {"cy": 0.0, "cx": 0.0, "ry": 0.86, "rx": 0.72, "theta": 0.0,
         "gyri": [(7, 0.1, 0.03), (11, 0.2, 0.03), (17, 0.3, 0.03)], "vent": 1.0,
         "wm": 0.75, "gm": 0.55, "csf": 0.15, "scalp": 0.9, "skull": 0.08,
         "bias": np.zeros(3), "noise": 0.0, "texture": 0.05, "gain": 1000.0}
    t = {"z": 0.0, "y": 0.25, "x": -0.2, "ry": 0.15, "rx": 0.12, "rz": 0.2, "theta": 0.4,
         "alpha": 0.8, "core": 0.2, "ring": True, "edema": 0.0}
    with_t, mask = render_brain_slice(np.random.default_rng(1), size, h, 0.0, t, 4)
    without, none = render_brain_slice(np.random.default_rng(1), size, h, 0.0, None, 4)
    assert none is None and mask is not None
    diff = np.abs(with_t - without)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    inside = np.zeros_like(mask)
    inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    # (blur spreads the change by a pixel or two; nearly all of it is inside the box)
    assert diff[inside].sum() > 0.85 * diff.sum()
    iy, ix = np.unravel_index(int(diff.argmax()), diff.shape)
    assert inside[iy, ix]


def test_prostate_masks_exactly_for_positive_patients(studies):
    path = studies["prostate"]
    df = _read_csv(path)
    for row in df.to_dict("records"):
        mask_img = nib.load(path.parent / row["mask"])
        image = nib.load(path.parent / row["image_adc"])
        assert mask_img.shape == image.shape == (32, 32, 32)
        assert np.allclose(mask_img.affine, image.affine)
        assert mask_img.header.get_zooms() == pytest.approx((1.5, 1.5, 1.5))
        mask = np.asarray(mask_img.dataobj)
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask.sum() > 0) == (row["label"] == "cspca"), row["patient_id"]


# ----------------------------------------------------------------------------- learnability


def _robust(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return (a - lo) / (hi - lo + 1e-6)


def _features(modality: str, arr: np.ndarray) -> np.ndarray:
    """A few summary features of one sample (C, ...) that a simple model can use."""
    if modality == "xray":  # brightness profile across the chest at heart level
        a = _robust(arr[0])
        s = a.shape[0]
        return a[int(0.55 * s):int(0.85 * s)].mean(0).reshape(16, -1).mean(1)
    if modality == "brain":  # left-right asymmetry and intensity quantiles
        a = gaussian_filter(_robust(arr[0]), 1.0)
        return np.array([*np.percentile(np.abs(a - a[:, ::-1]), [50, 90, 99, 99.9]),
                         *np.percentile(a, [5, 50, 95, 99.5]), a.std()])
    if modality == "prostate":  # per-channel extremes (lesions: dark ADC, bright HBV)
        return np.concatenate([np.percentile(gaussian_filter(_robust(ch), 1.0), [0.1, 1, 50, 99, 99.9])
                               for ch in arr])
    # histo: dark (nuclear) blobs relative to the patch's own brightness, so stain-independent
    lum = arr.mean(0)
    rel = lum / (np.percentile(lum, 90) + 1e-6)
    labels, n = ndimage.label(rel < 0.7)
    sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(1)
    sat = (arr.max(0) - arr.min(0)) / 255.0
    return np.array([(rel < 0.7).mean(), n, sizes.mean(), sizes.std(), np.percentile(sizes, 90), (rel > 1.05).mean(),
                     *np.percentile(rel, [1, 5, 25, 50]), sat.mean(), np.abs(np.diff(rel, axis=-1)).mean()])


def _patient_auroc(x: np.ndarray, target: np.ndarray, positive: np.ndarray, groups: np.ndarray, agg: str) -> float:
    """Out-of-fold patient-level AUROC of a logistic regression on held-out patients.

    Args:
        x: (n_samples, n_features). target: the class each sample is trained on (for histo
            the subtype, so the model need not fit two subtypes with one line).
        positive: 0/1 per sample, the truth scored. groups: patient ids. agg: "max"/"mean".
    """
    scores = np.zeros(len(target))
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0)
    for train, test in folds.split(x, target, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(x[train], target[train])
        proba = clf.predict_proba(x[test])
        pos_classes = [i for i, c in enumerate(clf.classes_) if positive[target == c].all()]
        scores[test] = proba[:, pos_classes].sum(1)
    per = pd.DataFrame({"g": groups, "y": positive, "s": scores}).groupby("g").agg({"y": "max", "s": agg})
    return float(roc_auc_score(per["y"], per["s"]))


def _learnability(modality: str, path: Path, seed: int = 0) -> tuple[float, float]:
    """(patient AUROC, AUROC with the patients' labels shuffled between patients)."""
    df = _read_csv(path)
    x = np.stack([_features(modality, read_sample(r, path.parent).array) for r in df.to_dict("records")])
    groups = df["patient_id"].to_numpy()
    if modality == "xray":
        target = df["labels"].str.split("|").map(lambda ls: "cardiomegaly" in ls).to_numpy(int)
        positive = target
    elif modality == "histo":
        target, positive = df["subtype"].to_numpy(), (df["label"] == "malignant").to_numpy(int)
    else:
        target = positive = (df["label"] == {"brain": "tumor", "prostate": "cspca"}[modality]).to_numpy(int)
    agg = "mean" if modality == "histo" else "max"
    auc = _patient_auroc(x, target, positive, groups, agg)
    # Control: give every sample the label (and class) of another patient, chosen at random.
    pids = np.unique(groups)
    perm = dict(zip(pids, np.random.default_rng(seed).permutation(pids)))
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    donor = np.array([first[perm[g]] for g in groups])
    if modality in ("xray", "brain"):  # a patient-level status for every sample
        status = pd.Series(positive, index=groups).groupby(level=0).max()
        ctrl_pos = status.loc[[perm[g] for g in groups]].to_numpy()
        ctrl = _patient_auroc(x, ctrl_pos, ctrl_pos, groups, agg)
    else:
        ctrl = _patient_auroc(x, target[donor], positive[donor], groups, agg)
    return auc, ctrl


@pytest.mark.parametrize("modality", MODALITIES)
def test_signal_is_learnable_but_not_trivial(studies, modality):
    auc, ctrl = _learnability(modality, studies[modality])
    assert 0.7 < auc < 0.999, f"{modality}: held-out patient AUROC {auc:.3f}"
    # The same check on shuffled labels fails, so it measures the drawn signal.
    assert ctrl < 0.7, f"{modality}: shuffled-label control reached AUROC {ctrl:.3f}"
