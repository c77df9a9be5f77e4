"""Tests for medvit.data.io: every format, every shipped test file, every way a file can be bad."""

from __future__ import annotations

import gzip
import random
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import dicom_dataset
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medvit.data.io import ImageData, detect_format, read_image, read_sample
from medvit.errors import ImageReadError, MedvitError

# resolved: pydicom reports resolved paths, and the venv may sit behind a symlink (CI)
PYDICOM_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).resolve().parent / "tests" / "data"


def _shipped(root: Path, extra: list[str] = ()) -> list[Path]:
    """Every file under ``root`` plus ``extra`` (pydicom's list also names its folders, which
    read_image then reads as series folders)."""
    files = {Path(f).resolve() for f in extra}
    files |= {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(files)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # never touch the network
    assert path is not None, f"{name} is not shipped with this pydicom"
    return Path(path)


def _check_loaded(img: ImageData) -> None:
    assert isinstance(img, ImageData)
    assert img.array.dtype == np.float32
    assert img.array.ndim in (3, 4)
    assert img.array.shape[0] in (1, 2, 3, 4)
    assert np.isfinite(img.array).all()
    assert len(img.spacing) == img.array.ndim - 1
    assert all(s > 0 for s in img.spacing)
    assert img.shape == img.array.shape


def _load_all(root: Path, files: list[Path]) -> tuple[dict[str, ImageData], dict[str, str]]:
    """Read everything; results keyed by the path relative to ``root``."""
    loaded, rejected = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                img = read_image(f)
            except ImageReadError as exc:  # anything else fails the test
                assert exc.reason, f
                rejected[f.relative_to(root).as_posix()] = exc.reason
            else:
                _check_loaded(img)
                loaded[f.relative_to(root).as_posix()] = img
    return loaded, rejected


# ------------------------------------------------------------------ shipped test files


def test_every_pydicom_test_file_loads_or_is_rejected():
    files = _shipped(PYDICOM_FILES, get_testdata_files())
    loaded, rejected = _load_all(PYDICOM_FILES, files)
    n_dirs = sum(f.is_dir() for f in files)
    print(f"\npydicom shipped test data: {len(files)} entries ({len(files) - n_dirs} files, {n_dirs} folders): "
          f"{len(loaded)} loaded, {len(rejected)} rejected")
    assert len(loaded) + len(rejected) == len(files)
    # known-good files of each codec load
    for name in ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "image_dfl.dcm",
                 "examples_palette.dcm", "examples_ybr_color.dcm", "rtdose.dcm", "dicomdirtests/77654033/CR1/6154",
                 "dicomdirtests/98892001/CT5N"]:
        assert name in loaded, (name, rejected.get(name))
    assert loaded["examples_ybr_color.dcm"].shape == (3, 30, 240, 320)  # multi-frame colour -> (C, D, H, W)
    assert loaded["rtdose.dcm"].shape == (1, 15, 10, 10)
    assert loaded["rtdose.dcm"].spacing == (5.0, 10.0, 10.0)
    # known-bad files are rejected with a reason
    assert loaded["dicomdirtests/98892001/CT5N"].shape == (1, 5, 16, 16)  # a series folder
    assert rejected["dicomdirtests/DICOMDIR"].startswith("no pixel data")
    assert rejected["reportsi.dcm"].startswith("no pixel data")
    assert rejected["waveform_ecg.dcm"].startswith("no pixel data")
    assert rejected["MR_truncated.dcm"].startswith("truncated file")
    assert rejected["README.txt"].startswith("unsupported file type")
    assert "text" in rejected["dicomdirtests/TINY_ALPHA/README"]
    assert "orientations" in rejected["dicomdirtests/98892003/MR700"]  # a localizer series


def test_every_nibabel_test_file_loads_or_is_rejected():
    files = _shipped(NIBABEL_FILES)
    loaded, rejected = _load_all(NIBABEL_FILES, files)
    print(f"\nnibabel shipped files: {len(files)} total, {len(loaded)} loaded, {len(rejected)} rejected")
    assert len(loaded) + len(rejected) == len(files)
    for name in ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz", "0.dcm"]:
        assert name in loaded, (name, rejected.get(name))
        if name != "0.dcm":
            assert loaded[name].orientation == "RAS"
    assert loaded["example4d.nii.gz"].shape == (2, 24, 96, 128)  # 2 volumes -> 2 channels, (C, Z, Y, X)
    assert "20 volumes" in rejected["functional.nii"]
    assert "non-finite" in rejected["resampled_anat_moved.nii"]
    assert "CIFTI" in rejected["row_major.dconn.nii"]
    assert rejected["test.mgz"].startswith("unsupported file type")


def test_nibabel_dicom_pair_reads_as_series(tmp_path):
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(NIBABEL_FILES / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")  # ignored inside a series folder
    img = read_image(tmp_path)
    _check_loaded(img)
    assert img.shape == (1, 2, 256, 256)
    assert img.source_format == "dicom-series"
    assert img.spacing[0] == pytest.approx(3.0, abs=1e-3)
    assert img.orientation is not None and len(img.orientation) == 3


# ------------------------------------------------------------------ Pillow formats


def test_png_8bit_16bit_rgb_and_modes(tmp_path):
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / "g8.png")
    img = read_image(tmp_path / "g8.png")
    _check_loaded(img)
    assert img.shape == (1, 20, 30) and img.source_format == "png" and img.orientation is None
    np.testing.assert_array_equal(img.array[0], a8)

    a16 = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    a16[0, 0] = 65535
    Image.fromarray(a16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.array.max() == 65535  # no 8-bit truncation
    np.testing.assert_array_equal(img.array[0], a16)

    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = read_image(tmp_path / "rgb.png")
    assert img.shape == (3, 20, 30)
    np.testing.assert_array_equal(img.array, rgb.transpose(2, 0, 1))

    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png").array, rgb.transpose(2, 0, 1))  # alpha dropped

    Image.fromarray(np.stack([a8, a8], axis=2)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").array, a8[None])

    grey_palette = Image.fromarray(a8).convert("P")  # grey palette -> one channel
    grey_palette.save(tmp_path / "pgrey.png")
    assert read_image(tmp_path / "pgrey.png").shape == (1, 20, 30)
    colour_palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    colour_palette.save(tmp_path / "pcolour.png")
    img = read_image(tmp_path / "pcolour.png")
    assert img.shape == (3, 20, 30)
    np.testing.assert_array_equal(img.array, np.asarray(colour_palette.convert("RGB")).transpose(2, 0, 1))

    mask = Image.fromarray(a8 > 128).convert("1")
    mask.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_image(tmp_path / "mask.png").array[0], (a8 > 128).astype(np.float32))


def test_jpeg_and_tiff(tmp_path):
    rng = np.random.default_rng(1)
    smooth = (np.add.outer(np.arange(32), np.arange(48)) * 2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "g.jpg", quality=95)
    img = read_image(tmp_path / "g.jpg")
    _check_loaded(img)
    assert img.shape == (1, 32, 48) and img.source_format == "jpeg"
    assert np.abs(img.array[0] - smooth).mean() < 2.0  # lossy, but close
    Image.fromarray(np.stack([smooth] * 3, axis=2)).save(tmp_path / "c.jpeg", quality=95)
    assert read_image(tmp_path / "c.jpeg").shape == (3, 32, 48)

    t16 = rng.integers(0, 65536, (16, 24)).astype(np.uint16)
    Image.fromarray(t16).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.tif").array[0], t16)
    f32 = rng.normal(size=(16, 24)).astype(np.float32)
    Image.fromarray(f32).save(tmp_path / "f.tiff")
    np.testing.assert_allclose(read_image(tmp_path / "f.tiff").array[0], f32)
    pages = [Image.fromarray((t16 // (k + 1)).astype(np.uint16)) for k in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    img = read_image(tmp_path / "stack.tif")
    assert img.shape == (1, 3, 16, 24)  # equal pages -> a volume
    np.testing.assert_array_equal(img.array[0, 2], t16 // 3)
    nan = f32.copy()
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="non-finite"):
        read_image(tmp_path / "nan.tif")


# ------------------------------------------------------------------ DICOM


def _dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
           signed: bool = False, slope: float | None = None, intercept: float | None = None,
           ipp=None, iop=None, spacing=(0.5, 0.7), instance: int | None = None, series_uid: str = "1.2.826.0.1.1",
           window: tuple[float, float] | None = None, modality: str = "CT") -> Path:
    ds = dicom_dataset()
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.9", series_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = list(spacing)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if ipp is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(ipp), list(iop)
    if instance is not None:
        ds.InstanceNumber = instance
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("iop,axis", [([1, 0, 0, 0, 1, 0], 2), ([1, 0, 0, 0, 0, -1], 1)], ids=["axial", "coronal"])
def test_dicom_series_sorted_by_position(tmp_path, iop, axis):
    rng = np.random.default_rng(2)
    depth, gap = 6, 2.5
    volume = rng.integers(0, 3000, (depth, 4, 5))
    order = list(range(depth))
    random.Random(0).shuffle(order)
    for k, slice_index in enumerate(order):
        ipp = [10.0, -20.0, 30.0]
        ipp[axis] += slice_index * gap  # both normals (row x col) point along +axis
        # file names and InstanceNumbers are deliberately scrambled: only positions count
        _dicom(tmp_path / f"img{k:02d}", volume[slice_index], slope=2.0, intercept=-1024.0, ipp=ipp, iop=iop,
               instance=100 - k)
    (tmp_path / "README").write_text("series exported by hand")
    img = read_image(tmp_path)
    _check_loaded(img)
    assert img.source_format == "dicom-series" and img.modality == "CT"
    assert img.shape == (1, depth, 4, 5)
    assert img.spacing == pytest.approx((gap, 0.5, 0.7))
    np.testing.assert_allclose(img.array[0], volume * 2.0 - 1024.0)
    assert img.orientation == ("LPS" if axis == 2 else "LIP")


def test_dicom_series_errors(tmp_path):
    iop = [1, 0, 0, 0, 1, 0]
    px = np.zeros((4, 4))
    gaps = tmp_path / "gaps"
    gaps.mkdir()
    for z in (0.0, 2.0, 4.0, 8.0):  # a missing slice
        _dicom(gaps / f"s{z}", px, ipp=[0, 0, z], iop=iop)
    with pytest.raises(ImageReadError, match="irregular slice spacing"):
        read_image(gaps)
    dup = tmp_path / "dup"
    dup.mkdir()
    for k in range(3):
        _dicom(dup / f"s{k}", px, ipp=[0, 0, 0], iop=iop)
    with pytest.raises(ImageReadError, match="share a position"):
        read_image(dup)
    two = tmp_path / "two"
    two.mkdir()
    _dicom(two / "a", px, ipp=[0, 0, 0], iop=iop, series_uid="1.2.3.1")
    _dicom(two / "b", px, ipp=[0, 0, 1], iop=iop, series_uid="1.2.3.2")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_image(two)
    byinstance = tmp_path / "instance"
    byinstance.mkdir()
    for k in (3, 1, 2):
        _dicom(byinstance / f"s{k}", np.full((4, 4), k), instance=k)
    img = read_image(byinstance)  # no positions: InstanceNumber order
    assert [float(img.array[0, d, 0, 0]) for d in range(3)] == [1.0, 2.0, 3.0]


def test_dicom_rescale_slope_intercept(tmp_path):
    stored = np.arange(20, dtype=np.int16).reshape(4, 5) * 100 - 500
    img = read_image(_dicom(tmp_path / "r.dcm", stored, signed=True, slope=2.5, intercept=-100.0))
    np.testing.assert_allclose(img.array[0], stored * 2.5 - 100.0)
    ct = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    np.testing.assert_allclose(read_image(ct).array[0], apply_modality_lut(ds.pixel_array, ds))  # Hounsfield units
    dose = _testfile("rtdose.dcm")
    ds = pydicom.dcmread(dose)
    np.testing.assert_allclose(read_image(dose).array[0], ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)


def test_dicom_monochrome1_inverted_and_window(tmp_path):
    stored = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)
    mono1 = _dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=12)
    mono2 = _dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2", bits_stored=12)
    np.testing.assert_array_equal(read_image(mono1).array[0], 4095 - stored)  # larger = brighter
    np.testing.assert_array_equal(read_image(mono2).array[0], stored)
    cr = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds = pydicom.dcmread(cr)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    lo, hi = sorted(apply_modality_lut(np.array([0, 2**ds.BitsStored - 1]), ds))  # range of the stored bits
    np.testing.assert_allclose(read_image(cr).array[0], (lo + hi) - apply_modality_lut(ds.pixel_array, ds), rtol=1e-6)
    # display values: window centre 2000, width 2000 -> [1000, 3000] maps to [0, 1]
    win1 = _dicom(tmp_path / "w1.dcm", stored, photometric="MONOCHROME1", bits_stored=12, window=(2000, 2000))
    win2 = _dicom(tmp_path / "w2.dcm", stored, photometric="MONOCHROME2", bits_stored=12, window=(2000, 2000))
    d1, d2 = read_image(win1, window=True).array[0], read_image(win2, window=True).array[0]
    assert d2.min() == 0.0 and d2.max() == 1.0 and d2[0, 0] == 0.0 and d2[1, 2] == 1.0
    assert d2[0, 2] == pytest.approx(0.5, abs=1e-3)
    np.testing.assert_allclose(d1, 1.0 - d2)
    # no window in the file: min-max of the (inverted) modality values
    d = read_image(mono1, window=True).array[0]
    assert d.min() == 0.0 and d.max() == 1.0 and d[0, 0] == 1.0
    mr = read_image(_testfile("MR_small.dcm"), window=True).array  # file carries a window
    assert mr.min() >= 0.0 and mr.max() <= 1.0


# (reference, compressed, max mean |difference|, min correlation): lossless codecs must give
# the identical array, lossy ones close values. pydicom does not ship an uncompressed twin of
# JPEG2000.dcm; JPGExtended.dcm is a second lossy encoding of the same NM image.
_TWINS = [
    ("MR_small.dcm", "MR_small_RLE.dcm", 0.0, 1.0),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0.0, 1.0),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0.0, 1.0),
    ("MR_small.dcm", "MR_small_bigendian.dcm", 0.0, 1.0),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", 0.0, 1.0),      # JPEG lossless (process 14, SV1)
    ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", 0.0, 1.0),        # JPEG 2000 lossless
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", 2.0, 0.99),    # JPEG baseline, YBR_FULL
    ("SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", 2.0, 0.99),
    ("rtdose.dcm", "rtdose_rle.dcm", 0.0, 1.0),               # multi-frame RLE
    ("JPGExtended.dcm", "JPEG2000.dcm", 6.0, 0.9),
]


@pytest.mark.parametrize("reference,compressed,max_mean_abs,min_corr", _TWINS, ids=[t[1] for t in _TWINS])
def test_compressed_dicom_matches_its_twin(reference, compressed, max_mean_abs, min_corr):
    ref, comp = read_image(_testfile(reference)), read_image(_testfile(compressed))
    assert comp.shape == ref.shape
    assert comp.spacing == ref.spacing
    mean_abs = float(np.abs(comp.array - ref.array).mean())
    assert mean_abs <= max_mean_abs, mean_abs
    if max_mean_abs:
        assert np.corrcoef(comp.array.ravel(), ref.array.ravel())[0, 1] >= min_corr


def test_dicom_colour_conversions():
    palette = _testfile("examples_palette.dcm")
    ds = pydicom.dcmread(palette)
    img = read_image(palette)
    assert img.shape == (3, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(img.array, np.moveaxis(apply_color_lut(ds.pixel_array, ds), -1, 0))
    rgb = read_image(_testfile("SC_rgb_rle.dcm"), window=True).array
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0 and rgb.max() > 0.9
    with pytest.raises(ImageReadError, match="cannot decode pixel data"):
        read_image(_testfile("JPEG-lossy.dcm"))  # a known-broken JPEG stream in pydicom's set


def test_dicom_without_preamble_and_without_meta(tmp_path):
    px = np.arange(12, dtype=np.uint16).reshape(3, 4)
    src = _dicom(tmp_path / "full.dcm", px)
    ds = pydicom.dcmread(src)
    raw = tmp_path / "nometa.dcm"
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)  # no preamble, no meta
    assert raw.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(raw).array[0], px)


# ------------------------------------------------------------------ NIfTI and NumPy


def test_nifti_canonical_orientation(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (X, Y, Z)
    affine = np.diag([-2.0, 3.0, 4.0, 1.0])  # x runs right-to-left: "LAS"
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "las.nii.gz")
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    img = read_image(tmp_path / "las.nii.gz")
    _check_loaded(img)
    assert img.orientation == "RAS" and img.source_format == "nifti"
    assert img.shape == (1, 6, 5, 4)  # (C, Z, Y, X)
    assert img.spacing == pytest.approx((4.0, 3.0, 2.0))
    canonical = data[::-1]  # x flipped to run left-to-right
    np.testing.assert_array_equal(img.array[0], canonical.transpose(2, 1, 0))
    # the voxel at array index (z=1, y=2, x=0) is the RAS-most-left voxel of the original
    assert img.array[0, 1, 2, 0] == data[3, 2, 1]

    multi = np.stack([data, data * 2, data * 3], axis=-1)
    nib.save(nib.Nifti1Image(multi, np.eye(4)), tmp_path / "c3.nii")
    img = read_image(tmp_path / "c3.nii")
    assert img.shape == (3, 6, 5, 4)
    np.testing.assert_array_equal(img.array[2], (data * 3).transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 7), np.float32), np.eye(4)), tmp_path / "t7.nii.gz")
    with pytest.raises(ImageReadError, match="7 volumes"):
        read_image(tmp_path / "t7.nii.gz")
    scaled = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, tmp_path / "scaled.nii")
    assert read_image(tmp_path / "scaled.nii").array.max() == pytest.approx(23 * 0.5 + 10.0)
    bad = data.copy()
    bad[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "inf.nii.gz")
    with pytest.raises(ImageReadError, match="non-finite"):
        read_image(tmp_path / "inf.nii.gz")


def test_npy(tmp_path):
    a2 = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(tmp_path / "a2.npy", a2)
    img = read_image(tmp_path / "a2.npy")
    assert img.shape == (1, 3, 4) and img.source_format == "npy"
    np.testing.assert_array_equal(img.array[0], a2)
    np.save(tmp_path / "a3.npy", np.zeros((2, 3, 4), np.float64))
    assert read_image(tmp_path / "a3.npy").shape == (1, 2, 3, 4)
    np.save(tmp_path / "b.npy", np.ones((3, 4), bool))
    assert read_image(tmp_path / "b.npy").array.sum() == 12
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match="unpickling"):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "cplx.npy", np.zeros((3, 4), np.complex64))
    with pytest.raises(ImageReadError, match="complex"):
        read_image(tmp_path / "cplx.npy")
    np.save(tmp_path / "a1.npy", np.zeros(5))
    with pytest.raises(ImageReadError, match="dimensions"):
        read_image(tmp_path / "a1.npy")
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0]]))
    with pytest.raises(ImageReadError, match="non-finite"):
        read_image(tmp_path / "nan.npy")


# ------------------------------------------------------------------ bad files


@pytest.fixture()
def good_files(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    out = tmp_path / "good"
    out.mkdir()
    a8 = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(a8).save(out / "a.png")
    Image.fromarray(np.stack([a8] * 3, axis=2)).save(out / "a.jpg")
    Image.fromarray(a8.astype(np.uint16) * 200).save(out / "a.tif")
    nib.save(nib.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), np.eye(4)), out / "a.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), np.eye(4)), out / "a.nii")
    np.save(out / "a.npy", rng.random((6, 7)).astype(np.float32))
    shutil.copy(_testfile("MR_small.dcm"), out / "a.dcm")
    shutil.copy(_testfile("JPEG2000.dcm"), out / "j2k.dcm")
    shutil.copy(_testfile("MR_small_RLE.dcm"), out / "rle.dcm")
    for path in out.iterdir():
        _check_loaded(read_image(path))  # the untruncated originals are fine
    return {p.name: p for p in out.iterdir()}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it then refuses
def test_truncated_files_rejected(good_files, tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    n_checked = 0
    for name, path in good_files.items():
        data = path.read_bytes()
        n = len(data)
        offsets = {1, 8, 64, 200, n // 4, n // 2, 3 * n // 4, n - 1}
        if name in ("j2k.dcm", "rle.dcm"):
            # encapsulated pixel data ends in an 8-byte sequence delimiter that pydicom does not
            # need; cut into the last fragment instead (see docs/io.md)
            offsets = {o for o in offsets if o < n - 8} | {n - 9}
        for off in sorted(o for o in offsets if 0 < o < n):
            target = cut / f"{off}_{name}"
            target.write_bytes(data[:off])
            with pytest.raises(ImageReadError) as info:
                read_image(target)
                print("loaded although truncated:", target.name)
            assert info.value.reason and info.value.path == target
            n_checked += 1
    assert n_checked >= 60


def test_empty_wrong_extension_text_and_missing(good_files, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("empty.png", "empty.dcm", "empty.nii.gz", "empty.npy", "empty"):
        (bad / name).write_bytes(b"")
        with pytest.raises(ImageReadError, match="empty file"):
            read_image(bad / name)
    (bad / "notes.dcm").write_text("PatientName: nobody\nthis is not DICOM\n")
    with pytest.raises(ImageReadError, match="content is text, not DICOM"):
        read_image(bad / "notes.dcm")
    swaps = {"a.png": "png_as.jpg", "a.dcm": "dcm_as.png", "a.nii.gz": "gz_as.nii", "a.nii": "nii_as.nii.gz",
             "a.npy": "npy_as.tif", "a.jpg": "jpg_as.dcm", "a.tif": "tif_as.npy"}
    for src, dst in swaps.items():
        shutil.copy(good_files[src], bad / dst)
        with pytest.raises(ImageReadError, match="content is|name the file"):
            read_image(bad / dst)
    (bad / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(bad / "table.csv")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(bad / "missing.png")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(_testfile("test-SR.dcm"))
    assert detect_format(good_files["a.nii.gz"]) == "nifti"


def test_folders_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="empty folder"):
        read_image(empty)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README").write_text("nothing to see")
    (docs / "notes.txt").write_text("nothing")
    shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", docs / "DICOMDIR")
    with pytest.raises(ImageReadError, match="no DICOM images"):
        read_image(docs)


def test_random_corruption_never_escapes(good_files, tmp_path):
    """Flipped bytes and random garbage either still load as valid images or raise
    ImageReadError; no other exception type escapes."""
    rng = np.random.default_rng(4)
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    outcomes = {"loaded": 0, "rejected": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, path in sorted(good_files.items()):
            data = bytearray(path.read_bytes())
            for trial in range(4):
                corrupt = bytearray(data)
                for pos in rng.integers(0, len(data), size=8):
                    corrupt[pos] = int(rng.integers(0, 256))
                target = fuzz / f"{trial}_{name}"
                target.write_bytes(bytes(corrupt))
                try:
                    _check_loaded(read_image(target))
                    outcomes["loaded"] += 1
                except ImageReadError:
                    outcomes["rejected"] += 1
            garbage = fuzz / f"garbage_{name}"
            garbage.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
            with pytest.raises(ImageReadError):
                read_image(garbage)
    assert sum(outcomes.values()) == 4 * len(good_files)
    with pytest.raises(ImageReadError):
        read_image(None)  # not even a path
    assert issubclass(ImageReadError, MedvitError)


def test_gzip_nifti_with_trailing_member_still_reads(tmp_path):
    data = np.ones((3, 4, 5), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    with open(tmp_path / "a.nii.gz", "ab") as fh:  # a second (empty) gzip member: still a valid stream
        fh.write(gzip.compress(b""))
    assert read_image(tmp_path / "a.nii.gz").shape == (1, 5, 4, 3)


# ------------------------------------------------------------------ read_sample


def test_read_sample_single_and_channels(tmp_path):
    rng = np.random.default_rng(5)
    vols = {c: rng.random((4, 5, 6)).astype(np.float32) for c in ("t2w", "adc", "hbv")}
    for c, v in vols.items():
        np.save(tmp_path / f"{c}.npy", v)
    row = {"patient_id": "p1", "image_t2w": "t2w.npy", "image_adc": "adc.npy", "image_hbv": "hbv.npy"}
    img = read_sample(row, tmp_path)
    assert img.shape == (3, 4, 5, 6)
    for k, c in enumerate(("t2w", "adc", "hbv")):  # stacked in column order
        np.testing.assert_array_equal(img.array[k], vols[c])
    series = pd.Series({"patient_id": "p1", "image": float("nan"), "image_t2w": "t2w.npy", "image_adc": "adc.npy"})
    assert read_sample(series, tmp_path).shape == (2, 4, 5, 6)  # NaN `image` cell counts as empty
    assert read_sample({"image": "t2w.npy", "image_adc": "missing.npy"}, tmp_path).shape == (1, 4, 5, 6)
    np.save(tmp_path / "small.npy", np.zeros((4, 5, 5), np.float32))
    with pytest.raises(ImageReadError, match="one grid"):
        read_sample({"image_t2w": "t2w.npy", "image_small": "small.npy"}, tmp_path)
    with pytest.raises(ImageReadError, match="empty `image_adc`"):
        read_sample({"image_t2w": "t2w.npy", "image_adc": ""}, tmp_path)
    with pytest.raises(ImageReadError, match="no `image` value"):
        read_sample({"patient_id": "p1", "image": ""}, tmp_path)
    with pytest.raises(ImageReadError, match="not found"):
        read_sample({"image": "nope.png"}, tmp_path)
