"""The input corpus, tried as a hostile user would.

Every file shipped with pydicom and nibabel (offline: pydicom's bundled test files, no
download) plus files derived from them -- truncated at several offsets, bit flips in the
header, zero-length, wrong extensions, 1x1 images, constant images, NaN/Inf, 4D where 3D is
expected, masks of the wrong shape or with values that are not labels -- goes through the
reader, ``medvit ingest`` and ``medvit manifest validate``. Nothing may crash (only
ImageReadError / reported problems), every bad file is rejected with a reason, and good
files are kept. The counts are printed (run with ``-s``) and recorded in docs/security.md.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import dicom_dataset
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import generate_uid

from medvit.cli import main
from medvit.data.ingest import ingest
from medvit.data.io import read_image
from medvit.data.manifest import load_manifest, validate_manifest
from medvit.errors import ImageReadError

PYDICOM_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).resolve().parent / "tests" / "data"
KEY = "corpus-test-key-0123456789abcdef"
# Base files the derived variants are made from: uncompressed and compressed DICOM, a
# multi-frame file, big-endian, NIfTI plain and gzipped.
DICOM_BASES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose_1frame.dcm", "MR_small_RLE.dcm",
               "MR_small_bigendian.dcm", "SC_rgb_rle_2frame.dcm", "examples_palette.dcm"]
NIFTI_BASES = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]


def _shipped() -> list[Path]:
    files = {Path(f).resolve() for f in get_testdata_files() if Path(f).is_file()}
    files |= {p.resolve() for root in (PYDICOM_FILES, NIBABEL_FILES) for p in root.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    return sorted(files)


def _dicom(path: Path, pixels: np.ndarray, bits: int = 16) -> Path:
    ds = dicom_dataset()
    ds.PatientID, ds.Modality = "CORPUS1", "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    if len(ds.PixelData) % 2:
        ds.PixelData += b"\0"
    ds.save_as(path, enforce_file_format=True)
    return path


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _bases(out: Path) -> list[Path]:
    return ([Path(get_testdata_file(n, download=False)) for n in DICOM_BASES]
            + [NIBABEL_FILES / n for n in NIFTI_BASES] + [out / "good_ramp.png"])


def _derive(out: Path) -> dict[str, str]:
    """Write the derived hostile files into ``out``; returns {name: what it is}."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    rng = random.Random(12)
    png = out / "good_ramp.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(png)
    made[png.name] = "good"
    bases = _bases(out)
    for base in bases:
        data = base.read_bytes()
        ext = "".join(base.suffixes[-2:]) if base.name.endswith(".nii.gz") else base.suffix
        stem = base.name[: -len(ext)]
        for cut in sorted({1, 64, 128, 132, 200, 352, len(data) // 4, len(data) // 2, len(data) - 1}):
            if 0 < cut < len(data):
                (out / f"{stem}_trunc{cut}{ext}").write_bytes(data[:cut])
                made[f"{stem}_trunc{cut}{ext}"] = "truncated"
        for i, offset in enumerate((0, 128, 130, 133, 140, 160, 250, 345)):
            if offset < len(data):
                flipped = bytearray(data)
                flipped[offset] ^= 0xFF
                (out / f"{stem}_flip{i}{ext}").write_bytes(bytes(flipped))
                made[f"{stem}_flip{i}{ext}"] = "bit flip"
        for i in range(3):  # random flips in the first kilobyte (the header)
            flipped = bytearray(data)
            for _ in range(8):
                flipped[rng.randrange(min(1024, len(data)))] ^= 1 << rng.randrange(8)
            (out / f"{stem}_rflip{i}{ext}").write_bytes(bytes(flipped))
            made[f"{stem}_rflip{i}{ext}"] = "bit flip"
        for wrong in (".png", ".nii.gz", ".npy", ".dcm", ".jpg"):
            if wrong != ext:
                (out / f"{stem}_as{wrong}").write_bytes(data)
                made[f"{stem}_as{wrong}"] = "wrong extension"
    (out / "empty.dcm").write_bytes(b"")
    (out / "empty.png").write_bytes(b"")
    (out / "empty.nii.gz").write_bytes(b"")
    (out / "empty.npy").write_bytes(b"")
    made.update({n: "zero-length" for n in ("empty.dcm", "empty.png", "empty.nii.gz", "empty.npy")})
    (out / "text.dcm").write_text("patient: Jane Doe\n")
    (out / "random.nii").write_bytes(os.urandom(2000))
    (out / "noext").write_bytes(os.urandom(300))
    made.update({"text.dcm": "junk", "random.nii": "junk", "noext": "junk"})
    # tiny and constant images: readable, kept
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(out / "one_pixel.png")
    np.save(out / "one_pixel.npy", np.ones((1, 1), np.float32))
    _dicom(out / "one_pixel.dcm", np.array([[7]]))
    _nifti(out / "one_voxel.nii.gz", np.ones((1, 1, 1), np.float32))
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(out / "constant.png")
    np.save(out / "constant.npy", np.full((4, 8, 8), 3.0, np.float32))
    _nifti(out / "constant.nii.gz", np.zeros((6, 6, 6), np.int16))
    made.update({n: "good" for n in ("one_pixel.png", "one_pixel.npy", "one_pixel.dcm", "one_voxel.nii.gz",
                                     "constant.png", "constant.npy", "constant.nii.gz")})
    # non-finite values: rejected
    nan = np.ones((8, 8), np.float32)
    nan[3, 4] = np.nan
    np.save(out / "nan.npy", nan)
    np.save(out / "inf.npy", np.where(nan != nan, np.inf, nan))
    np.save(out / "huge.npy", np.full((4, 4), 1e300))           # beyond float32
    _nifti(out / "nan.nii.gz", np.where(np.ones((4, 4, 4)) > 0, np.nan, 0).astype(np.float32))
    inf = np.zeros((4, 4, 4), np.float64)
    inf[0, 0, 0] = -np.inf
    _nifti(out / "inf.nii.gz", inf)
    made.update({n: "non-finite" for n in ("nan.npy", "inf.npy", "huge.npy", "nan.nii.gz", "inf.nii.gz")})
    # 4D and 5D where 3D is expected
    _nifti(out / "timeseries.nii.gz", np.random.default_rng(0).random((6, 6, 6, 12)).astype(np.float32))
    np.save(out / "five_d.npy", np.zeros((2, 2, 2, 2, 2), np.float32))
    np.save(out / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(out / "complex.npy", np.ones((4, 4), np.complex64))
    made.update({"timeseries.nii.gz": "4D", "five_d.npy": "5D", "object.npy": "pickle", "complex.npy": "complex"})
    (out / "folder.nii.gz").mkdir()
    made["folder.nii.gz"] = "folder"
    return made


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    derived = _derive(root / "derived")
    shipped = _shipped()
    return root, shipped, derived


def _try(path: Path) -> tuple[str, str]:
    """('read'|'rejected'|'crashed', detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = read_image(path)
    except ImageReadError as exc:
        return ("rejected", exc.reason) if exc.reason.strip() else ("crashed", "empty reason")
    except BaseException as exc:  # noqa: BLE001 -- any other exception is exactly what this test hunts
        return "crashed", f"{type(exc).__name__}: {exc}"
    if img.array.dtype != np.float32 or not np.isfinite(img.array).all() or img.array.ndim not in (3, 4):
        return "crashed", f"bad ImageData {img!r}"
    return "read", img.source_format


def test_reader_never_crashes(corpus):
    root, shipped, derived = corpus
    results = {p: _try(p) for p in shipped}
    results.update({root / "derived" / n: _try(root / "derived" / n) for n in derived})
    counts = Counter(kind for kind, _ in results.values())
    crashed = {str(p): d for p, (k, d) in results.items() if k == "crashed"}
    print(f"\nreader corpus: {len(results)} files tried ({len(shipped)} shipped with pydicom/nibabel, "
          f"{len(derived)} derived): {counts['read']} read, {counts['rejected']} rejected, "
          f"{counts['crashed']} crashed")
    assert crashed == {}
    assert counts["read"] > 100 and counts["rejected"] > 150
    by_name = {p.name: r for p, r in results.items() if p.parent == root / "derived"}
    for name, what in derived.items():
        kind, detail = by_name[name]
        if what in ("zero-length", "junk", "non-finite", "5D", "pickle", "complex", "folder", "4D"):
            assert kind == "rejected", (name, what, detail)
        if what == "good":
            assert kind == "read", (name, detail)
    assert "non-finite" in by_name["nan.npy"][1] and "unpickling" in by_name["object.npy"][1]
    # Cut anywhere before the pixel data ends, a file never loads as if complete. (Encapsulated
    # DICOM cut inside its closing 8-byte sequence delimiter still holds every pixel: it may load.)
    for name, what in derived.items():
        if what == "truncated":
            stem, cut = name.rsplit("_trunc", 1)
            cut = int(cut.split(".")[0])
            size = next(b.stat().st_size for b in _bases(root / "derived") if b.name.startswith(stem + "."))
            if cut < size - 8:
                assert by_name[name][0] == "rejected", (name, by_name[name])
        if what == "bit flip" and name.endswith(".png"):  # every PNG byte is covered by a CRC or a length
            assert by_name[name][0] == "rejected", (name, by_name[name])


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_validate_keeps_good_rejects_bad(corpus, capsys):
    """One manifest row per corpus file: exactly the files the reader accepts are kept, every
    other row is quarantined with its reason (and the CLI reports it, exit code 1)."""
    root, shipped, derived = corpus
    data = root / "mdata"
    files = {}
    for i, src in enumerate(shipped + [root / "derived" / n for n in derived]):
        if src.is_dir():
            continue
        dst = data / f"f{i:04d}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        files[dst] = _try(dst)[0]
    rows = [{"patient_id": f"P{i:04d}", "image": p.relative_to(data).as_posix(), "label": "x"}
            for i, p in enumerate(files)]
    manifest = _write_manifest(data / "manifest.csv", rows)
    report = validate_manifest(manifest)
    row_of = {r["image"]: n + 1 for n, r in enumerate(rows)}
    bad_rows = {p.row for p in report.problems if p.row is not None}
    assert all(p.reason for p in report.problems)
    layout_rows = {p.row for p in report.problems if p.row is not None and "one model cannot take both" in p.reason}
    for path, kind in files.items():
        row = row_of[path.relative_to(data).as_posix()]
        if kind == "rejected":
            assert row in bad_rows, path
        else:  # read: kept unless its channels/dimensions differ from most rows
            assert kind == "read" and (row not in bad_rows or row in layout_rows), path
    assert report.summary["samples"] == len(rows) - len(bad_rows)
    kept = load_manifest(manifest, check_files=True)
    assert set(kept.df["_row"]) == set(range(1, len(rows) + 1)) - bad_rows
    with capsys.disabled():
        print(f"\nmanifest validate: {len(rows)} rows, {len(rows) - len(bad_rows)} kept, {len(bad_rows)} quarantined "
              f"({len(layout_rows)} for channels/dimensions unlike most rows), 0 crashed")
    assert main(["manifest", "validate", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "NOT OK" in out and f"row {min(bad_rows)}" in out


def test_masks_of_wrong_shape_or_with_non_labels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((8, 8, 8)).astype(np.float32)
    _nifti(tmp_path / "img.nii.gz", img)
    masks = {"ok": np.zeros((8, 8, 8), np.uint8), "multi": np.arange(512).reshape(8, 8, 8) % 3,
             "shape": np.zeros((8, 8, 7), np.uint8), "fraction": np.full((8, 8, 8), 0.5, np.float32),
             "negative": -np.ones((8, 8, 8), np.int16), "nan": np.full((8, 8, 8), np.nan, np.float32),
             "four_d": np.zeros((8, 8, 8, 2), np.uint8)}
    rows = []
    for name, m in masks.items():
        _nifti(tmp_path / f"mask_{name}.nii.gz", m.astype(m.dtype if m.dtype != np.int64 else np.int16))
        rows.append({"patient_id": name, "image": "img.nii.gz", "mask": f"mask_{name}.nii.gz", "label": "a"})
    rows.append({"patient_id": "missing", "image": "img.nii.gz", "mask": "nope.nii.gz", "label": "a"})
    report = validate_manifest(_write_manifest(tmp_path / "manifest.csv", rows))
    reasons = {rows[p.row - 1]["patient_id"]: p.reason for p in report.problems if p.row is not None}
    assert set(reasons) == {"shape", "fraction", "negative", "nan", "four_d", "missing"}, reasons
    assert "differs from image grid" in reasons["shape"] and "not labels" in reasons["fraction"]
    assert "not labels" in reasons["negative"] and "non-finite" in reasons["nan"]
    assert "channels" in reasons["four_d"] and "file not found" in reasons["missing"]


def test_ingest_accounts_for_every_file(corpus, tmp_path, capsys):
    """``medvit ingest`` over the whole corpus (shipped files and derived ones in one export
    folder): no crash, every file either in the manifest or in quarantine.csv with a reason."""
    root, shipped, derived = corpus
    src = tmp_path / "export"
    n = 0
    for i, f in enumerate(shipped):
        dst = src / "shipped" / f"{i:04d}_{f.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        n += 1
    for name in derived:
        if (root / "derived" / name).is_file():
            dst = src / "derived" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "derived" / name, dst)
            n += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ingest(src, tmp_path / "out" / "manifest.csv", key=KEY)
    with open(result.quarantine, newline="", encoding="utf-8") as fh:
        quarantine = list(csv.DictReader(fh))
    with open(result.manifest, newline="", encoding="utf-8") as fh:
        manifest = list(csv.DictReader(fh))
    assert result.n_files == n
    assert sum(int(r["n_files"]) for r in manifest) + len(quarantine) == n
    assert all(r["reason"].strip() for r in quarantine)
    with capsys.disabled():
        print(f"\ningest corpus: {n} files -> {result.n_samples} samples ({sum(int(r['n_files']) for r in manifest)} "
              f"files), {len(quarantine)} quarantined with a reason, 0 crashed")
    assert result.n_samples > 50 and len(quarantine) > 150
    q = {r["file"]: r["reason"] for r in quarantine}
    # A file name sharing a word with any PatientName/PatientID in the export is redacted.
    redacted = sum(f.startswith("derived/") and "[redacted]" in f for f in q)
    missing = [n for n, what in derived.items()
               if what in ("zero-length", "junk", "non-finite", "5D", "pickle", "complex") and f"derived/{n}" not in q]
    assert len(missing) <= redacted, missing
    # and the ingested manifest itself validates (its rows all read; no path leaves its folder)
    report = validate_manifest(result.manifest)
    other = [p for p in report.problems if p.row is not None and "one model cannot take both" not in p.reason]
    assert other == [], other
    # the CLI gives the same accounting without a traceback
    os.environ.pop("MEDVIT_PSEUDONYM_KEY", None)
    assert main(["ingest", str(src / "derived"), "--out", str(tmp_path / "cli" / "manifest.csv"), "--key", KEY]) == 0
    captured = capsys.readouterr()
    assert "ingest:" in captured.out and "Traceback" not in captured.err


# ------------------------------------------------------------------ one patient under two ids


def _with_duplicate(tmp_path: Path, split_a: str, split_b: str, dicom: bool = False) -> tuple[Path, str, str]:
    """A manifest where patient A's image reappears under a new id ``P-DUP`` (a byte copy, or a
    DICOM with the same pixels and another PatientID in its header)."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        name = f"img{i}.dcm" if dicom else f"img{i}.png"
        pixels = rng.integers(0, 255, (16, 16))
        if dicom:
            _dicom(data / name, pixels)
        else:
            Image.fromarray(pixels.astype(np.uint8)).save(data / name)
        rows.append({"patient_id": f"P{i}", "image": name, "label": "a" if i % 2 else "b",
                     "split": ["train", "val", "test"][i % 3]})
    rows[0]["split"] = split_a
    if dicom:
        ds = pydicom.dcmread(data / "img0.dcm")
        ds.PatientID = "SOMEONE-ELSE"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(data / "copy.dcm")
        copy = "copy.dcm"
    else:
        shutil.copyfile(data / "img0.png", data / "copy.png")
        copy = "copy.png"
    rows.append({"patient_id": "P-DUP", "image": copy, "label": rows[0]["label"], "split": split_b})
    return _write_manifest(data / "manifest.csv", rows), "P0", "P-DUP"


@pytest.mark.parametrize("dicom", [False, True])
def test_same_image_under_two_patient_ids_across_splits_is_flagged(tmp_path, caplog, dicom):
    manifest, a, b = _with_duplicate(tmp_path, "train", "test", dicom=dicom)
    report = validate_manifest(manifest)
    dup = [p for p in report.problems if "identical image content" in p.reason]
    assert not report.ok and len(dup) == 1 and a in dup[0].reason and b in dup[0].reason
    assert "leakage" in dup[0].reason and dup[0].row is None  # flagged; the rows themselves are fine
    # `medvit split` reads the manifest this way: the problem is kept (split.json lists it) and logged
    loaded = load_manifest(manifest, check_files=True)
    assert len(loaded.df) == 7
    assert any("identical image content" in p.reason and "leakage" in p.reason for p in loaded.problems)
    assert any(a in r.getMessage() and b in r.getMessage() for r in caplog.records)
    assert main(["manifest", "validate", str(manifest)]) == 1


def test_same_image_under_two_ids_in_one_split_is_flagged_without_leakage(tmp_path):
    manifest, a, b = _with_duplicate(tmp_path, "train", "train")
    report = validate_manifest(manifest)
    dup = [p for p in report.problems if "identical image content" in p.reason]
    assert len(dup) == 1 and "leakage" not in dup[0].reason and a in dup[0].reason and b in dup[0].reason


def test_blank_images_are_not_duplicates(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / f"blank{i}.png")
        rows.append({"patient_id": f"P{i}", "image": f"blank{i}.png", "label": "a", "split": ["train", "test"][i % 2]})
    assert validate_manifest(_write_manifest(data / "manifest.csv", rows)).ok
