"""Prostate outputs: predicted masks and maps keep the input's grid and affine (NIfTI), DICOM
SEG references the right source slices without identifiers, cross-validation folds never
share patients, and the fold ensemble averages probabilities."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medvit.data.export import (
    ExportError,
    save_dicom_seg,
    save_nifti_like,
    to_input_grid,
)
from medvit.data.io import read_image
from medvit.tasks.segmentation import FoldEnsemble, fold_split, write_maps


def _oblique_affine() -> np.ndarray:
    """A non-canonical affine: axes permuted (i -> y, j -> z, k -> x), flipped, anisotropic,
    rotated a little and shifted, as scanners write them."""
    a = np.array([[0.0, 0.0, -1.5, 10.0],
                  [-0.8, 0.0, 0.0, 20.0],
                  [0.0, 3.0, 0.0, -30.0],
                  [0.0, 0.0, 0.0, 1.0]])
    t = np.deg2rad(7)
    rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return rot @ a


@pytest.fixture
def oblique_nifti(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((6, 5, 4)).astype(np.float32) * 100
    path = tmp_path / "t2w.nii.gz"
    img = nib.Nifti1Image(data, _oblique_affine())
    img.set_qform(_oblique_affine(), code=1)
    nib.save(img, str(path))
    return path, data


def test_nifti_mask_keeps_the_input_affine_and_voxels(oblique_nifti, tmp_path):
    path, data = oblique_nifti
    image = read_image(path)  # canonical RAS, (C, z, y, x) as the models see it
    assert image.array.shape[0] == 1 and image.array[0].size == data.size
    mask_model = (image.array[0] > 50).astype(np.uint8)
    out = save_nifti_like(mask_model, path, tmp_path / "out" / "mask.nii.gz", dtype=np.uint8)
    saved = nib.load(str(out))
    np.testing.assert_allclose(saved.affine, nib.load(str(path)).affine, atol=1e-5)
    np.testing.assert_allclose(saved.get_qform(), nib.load(str(path)).get_qform(), atol=1e-5)
    assert saved.shape == data.shape
    # the same voxels, in the input's own order: the mask lies on the image in any viewer
    np.testing.assert_array_equal(np.asarray(saved.dataobj), (data > 50).astype(np.uint8))
    assert saved.get_data_dtype() == np.uint8


def test_probability_map_from_the_model_grid(oblique_nifti, tmp_path):
    path, data = oblique_nifti
    image = read_image(path)
    model_grid = np.zeros((8, 8, 8), np.float32)
    model_grid[...] = 0.25
    back = to_input_grid(model_grid, image.shape[1:])
    assert back.shape == image.shape[1:] and np.allclose(back, 0.25)
    out = save_nifti_like(back, path, tmp_path / "prob.nii.gz")
    assert nib.load(str(out)).shape == data.shape
    with pytest.raises(ExportError, match="does not fit"):
        save_nifti_like(model_grid, path, tmp_path / "bad.nii.gz")


def test_write_maps_for_a_manifest_row(oblique_nifti, tmp_path):
    path, data = oblique_nifti
    row = {"patient_id": "P1", "sample_id": "P1_00", "image_t2w": path.name, "split": "test"}
    prob = np.zeros((16, 16, 16), np.float32)
    prob[:8] = 0.9
    p, m, s = write_maps(prob, row, path.parent, tmp_path / "model" / "maps")
    assert (p, m, s) == ("maps/P1_00_prob.nii.gz", "maps/P1_00_mask.nii.gz", "")
    mask = nib.load(str(tmp_path / "model" / m))
    assert np.allclose(mask.affine, nib.load(str(path)).affine) and mask.shape == data.shape
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}


def _mr_series(folder, n=4, rows=8, cols=8):
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir()
    volume = np.zeros((n, rows, cols), np.uint16)
    volume[2, 3:5, 2:6] = 1000  # the "lesion" sits in the slice at position index 2
    # files named against the slice order, so reading must sort by position
    for i, name in zip(range(n), ["d.dcm", "b.dcm", "c.dcm", "a.dcm"]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "MRN123", "19500101", "M"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "ACC9"
        ds.ReferringPhysicianName = "Who^Dr"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, i + 1
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * i]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 3.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = volume[i].tobytes()
        ds.save_as(str(folder / name), enforce_file_format=True)
    return volume


def test_dicom_seg_references_the_source_slices_without_identifiers(tmp_path):
    import highdicom as hd

    series = tmp_path / "t2w"
    _mr_series(series)
    image = read_image(series)
    assert image.source_format == "dicom-series"
    mask = (image.array[0] > 500).astype(np.uint8)
    assert mask[2].any() and not mask[[0, 1, 3]].any()
    out = save_dicom_seg(mask, series, tmp_path / "seg.dcm", patient_id="PSEUDO01")
    seg = hd.seg.segread(str(out))
    assert seg.PatientName == "" and seg.PatientID == "PSEUDO01" and seg.get("AccessionNumber", "") == ""
    assert "Doe" not in str(seg) and "MRN123" not in str(seg)
    lesion_slice = next(pydicom.dcmread(str(f)) for f in series.iterdir()
                        if float(pydicom.dcmread(str(f)).ImagePositionPatient[2]) == 6.0)
    # every stored frame is a source slice with the lesion: the one at z = 6 mm
    refs = {fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for fr in seg.PerFrameFunctionalGroupsSequence}
    assert refs == {lesion_slice.SOPInstanceUID}
    assert seg.StudyInstanceUID == lesion_slice.StudyInstanceUID
    with pytest.raises(ExportError, match="does not fit"):
        save_dicom_seg(mask[:3], series, tmp_path / "bad.dcm", patient_id="P")


def _manifest(n_patients: int = 20, unlabeled: int = 4) -> pd.DataFrame:
    rows = []
    for i in range(n_patients):
        for k in range(1 + i % 2):  # some patients have two volumes
            rows.append({"patient_id": f"P{i:02d}", "sample_id": f"P{i:02d}_{k}",
                         "label": "cspca" if i % 3 == 0 else "no_cspca", "split": ["train", "val", "test"][i % 3]})
    for j in range(unlabeled):
        rows.append({"patient_id": f"U{j}", "sample_id": f"U{j}_0", "label": "", "split": "unlabeled"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [2, 5])
def test_cross_validation_folds_never_share_patients(k):
    df = _manifest()
    labeled = set(df.loc[df["split"] != "unlabeled", "patient_id"])
    tested: list[str] = []
    for fold in range(k):
        f = fold_split(df, k, fold, seed=3, val_fraction=0.2)
        assert f.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits of a fold
        assert f.groupby("patient_id")["fold"].nunique().max() == 1
        assert set(f.loc[f["split"] == "unlabeled", "patient_id"]) == {"U0", "U1", "U2", "U3"}
        test = set(f.loc[f["split"] == "test", "patient_id"])
        assert test == set(f.loc[f["fold"] == fold, "patient_id"])
        assert len(set(f.loc[f["split"] == "val", "patient_id"])) >= 1
        assert len(set(f.loc[f["split"] == "train", "patient_id"])) >= 1
        tested += sorted(test)
    # every labelled patient is tested exactly once over the folds
    assert sorted(tested) == sorted(labeled)
    # deterministic
    pd.testing.assert_frame_equal(fold_split(df, k, 0, 3, 0.2), fold_split(df, k, 0, 3, 0.2))


def test_one_fold_keeps_the_given_split():
    df = _manifest()
    f = fold_split(df, 1, 0, seed=0, val_fraction=0.2)
    assert (f["split"] == df["split"]).all()
    with pytest.raises(Exception, match="out of range"):
        fold_split(df, 2, 2, seed=0, val_fraction=0.2)


def test_fold_ensemble_averages_probabilities():
    class Const(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.logit(torch.tensor(p)))

        def forward(self, x):
            return self.logit.expand(x.shape[0], 1, *x.shape[2:])

    ens = FoldEnsemble([Const(0.2), Const(0.6)])
    out = ens(torch.zeros(1, 3, 2, 2, 2)).sigmoid()
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2, 2), 0.4))
