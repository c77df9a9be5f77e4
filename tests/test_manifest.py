"""Manifest reading and validation (Contract 1): good manifests, each bad case, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvit.data.manifest import (
    SCHEMA_PATH,
    Problem,
    class_names,
    finding_names,
    format_report,
    load_manifest,
    manifest_summary,
    validate_manifest,
)
from medvit.errors import LeakageError, ManifestError

MEDVIT = Path(sys.executable).with_name("medvit")


def png(path: Path, size: int = 8, value: int = 100) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path.name


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Folder with six tiny PNGs a.png..f.png under img/, two masks and two box files."""
    for name in "abcdef":
        png(tmp_path / "img" / f"{name}.png")
    png(tmp_path / "mask" / "a.png", value=1)
    png(tmp_path / "mask" / "small.png", size=4, value=1)
    write(tmp_path / "box_good.txt", "0 0.5 0.5 0.2 0.3\n1 0.1 0.9 0.05 0.05\n")
    write(tmp_path / "box_empty.txt", "")
    return tmp_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MEDVIT), *args], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------- good manifests


def test_single_label_manifest_loads_with_defaults(study: Path) -> None:
    m = write(study / "m.csv", "patient_id,image,label,subtype\n"
                               "p1,img/a.png,tumor,x\np1,img/b.png,normal,y\np2, img/c.png ,normal,\n")
    man = load_manifest(m, check_files=True)
    assert list(man.df["sample_id"]) == ["r1", "r2", "r3"]
    assert list(man.df["_row"]) == [1, 2, 3]
    assert man.df.loc[2, "image"] == "img/c.png"           # whitespace stripped
    assert man.df.loc[2, "subtype"] == ""                   # unknown columns kept, empty cells ""
    assert man.problems == [] and man.root == study.resolve()
    assert class_names(man.df) == ["normal", "tumor"]
    rep = validate_manifest(m)
    assert rep.ok and rep.problems == []
    s = rep.summary
    assert (s["patients"], s["samples"], s["rows"], s["quarantined"]) == (2, 3, 3, 0)
    assert s["classes"] == {"normal": {"patients": 2, "samples": 2}, "tumor": {"patients": 1, "samples": 1}}
    assert s["extra_columns"] == ["subtype"]
    text = format_report(rep)
    assert "status:   OK" in text and "tumor" in text and "3 samples from 2 patients" in text


def test_multilabel_boxes_mask_channels_and_splits(study: Path) -> None:
    m = write(study / "m.csv",
              "patient_id,sample_id,image_t2w,image_adc,mask,boxes,labels,split\n"
              "p1,s1,img/a.png,img/b.png,mask/a.png,box_good.txt,effusion|nodule,train\n"
              "p1,s2,img/c.png,img/d.png,,box_empty.txt,,train\n"
              "p2,s3,img/e.png,img/f.png,,,nodule,val\n"
              "p3,s4,img/a.png,img/f.png,,,,test\n")
    rep = validate_manifest(m, check_files=True)
    assert rep.ok, format_report(rep)
    s = rep.summary
    assert s["image_columns"] == ["image_t2w", "image_adc"]
    assert s["findings"] == {"effusion": {"patients": 1, "samples": 1}, "nodule": {"patients": 2, "samples": 2},
                             "(no finding)": {"patients": 2, "samples": 2}}
    assert s["splits"] == {"train": {"patients": 1, "samples": 2}, "val": {"patients": 1, "samples": 1},
                           "test": {"patients": 1, "samples": 1}}
    man = load_manifest(m, check_files=True)
    assert finding_names(man.df) == ["effusion", "nodule"]
    assert list(man.df["sample_id"]) == ["s1", "s2", "s3", "s4"]


def test_schema_file_works_with_snakemake_validate(study: Path) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    good = pd.DataFrame({"patient_id": ["p1", "p2"], "image": ["a.png", "b.png"], "split": ["train", None],
                         "labels": ["effusion|nodule", None], "magnification": ["40X", "400X"]})
    validate(good, str(SCHEMA_PATH))
    with pytest.raises(WorkflowError):
        validate(good.assign(split=["train", "training"]), str(SCHEMA_PATH))


# ------------------------------------------------------------------------- unusable manifests


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"patient_id,image\n", "no data rows"),
    (b"patient_id,label\np1,normal\n", "missing required column(s): image"),
    (b"image,label\na.png,normal\n", "missing required column(s): patient_id"),
    (b"patient_id\timage\np1\ta.png\n", "tab-separated"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file, not a CSV"),
    ("patient_id,image\np\xe9,a.png\n".encode("latin-1"), "not UTF-8"),
    (b"patient_id,image,patient_id\np1,a.png,p1\n", "duplicate column(s) in the header: patient_id"),
    (b'patient_id,image\n"p1,a.png\n', "not a readable CSV"),
])
def test_unusable_manifest_raises_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    m = tmp_path / "m.csv"
    m.write_bytes(content)
    with pytest.raises(ManifestError, match="m.csv") as exc:
        load_manifest(m)
    assert message in str(exc.value)
    rep = validate_manifest(m)
    assert not rep.ok and rep.summary == {} and message in str(rep.problems[0])


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="is a folder"):
        load_manifest(tmp_path)


# ------------------------------------------------------------------------- quarantined rows


def test_missing_image_is_quarantined_and_run_goes_on(study: Path) -> None:
    m = write(study / "m.csv",
              "patient_id,image,label\np1,img/a.png,normal\np2,img/missing.png,tumor\np3,img/b.png,tumor\n")
    man = load_manifest(m)
    assert list(man.df["patient_id"]) == ["p1", "p3"] and list(man.df["_row"]) == [1, 3]
    assert list(man.df["sample_id"]) == ["r1", "r3"]
    assert man.problems == [Problem(2, "image", "file not found: img/missing.png")]
    assert man.quarantined_rows == [2]
    rep = validate_manifest(m)
    assert not rep.ok and rep.summary["quarantined"] == 1 and rep.summary["samples"] == 2
    assert "row 2, column image: file not found: img/missing.png" in format_report(rep)


def test_too_few_rows_left_fails(study: Path) -> None:
    m = write(study / "m.csv", "patient_id,image\np1,img/x.png\np2,img/y.png\np3,img/a.png\n")
    assert len(load_manifest(m).df) == 1
    with pytest.raises(ManifestError, match=r"only 1 of 3 rows are usable \(at least 2 needed\)") as exc:
        load_manifest(m, min_rows=2)
    assert "row 1, column image: file not found: img/x.png" in str(exc.value)
    m2 = write(study / "m2.csv", "patient_id,image\np1,img/x.png\n")
    with pytest.raises(ManifestError, match="only 0 of 1 rows"):
        load_manifest(m2)


def test_unreadable_image_quarantined_only_when_files_checked(study: Path) -> None:
    (study / "img" / "broken.png").write_bytes(b"not a png at all")
    m = write(study / "m.csv", "patient_id,image\np1,img/a.png\np2,img/broken.png\n")
    assert len(load_manifest(m, check_files=False).df) == 2
    man = load_manifest(m, check_files=True)
    assert list(man.df["patient_id"]) == ["p1"]
    [p] = man.problems
    assert (p.row, p.column) == (2, "image") and p.reason.startswith("unreadable")
    assert validate_manifest(m, check_files=False).ok


@pytest.mark.parametrize("column, value, reason", [
    ("label", "pleural effusion", "invalid value 'pleural effusion'"),
    ("label", "", "empty value"),
    ("label", "effusion|nodule", "invalid value"),
    ("labels", "effusion, nodule", "separated by '|'"),
    ("labels", "effusion||nodule", "invalid value"),
    ("split", "training", "split must be train, val, test, unlabeled or empty"),
    ("patient_id", "", "every row needs a patient_id"),
    ("image", "", "every row needs an image path"),
])
def test_bad_values_quarantine_their_row(study: Path, column: str, value: str, reason: str) -> None:
    rows = [{"patient_id": "p1", "image": "img/a.png"}, {"patient_id": "p2", "image": "img/b.png"}]
    rows[0].setdefault(column, {"label": "normal", "labels": "effusion"}.get(column, ""))
    rows[1][column] = value
    df = pd.DataFrame(rows)
    df.to_csv(study / "m.csv", index=False)
    man = load_manifest(study / "m.csv")
    assert len(man.df) == 1 and man.df.loc[0, "patient_id"] == "p1"
    [p] = man.problems
    assert (p.row, p.column) == (2, column) and reason in p.reason


def test_duplicate_sample_id_and_ragged_row(study: Path) -> None:
    m = write(study / "m.csv", "patient_id,sample_id,image\np1,s1,img/a.png\np2,s1,img/b.png\np3,s3,img/c.png,extra\n"
                               "\np4,s4,img/d.png\n")
    man = load_manifest(m)
    assert list(man.df["sample_id"]) == ["s1", "s4"]
    assert [str(p) for p in man.problems] == [
        "row 2, column sample_id: duplicate sample_id 's1' (first used in row 1)",
        "row 3: has 4 fields but the header has 3",
    ]
    assert list(man.df["_row"]) == [1, 5]   # row N is line N+1 of the file (blank line 5 counted)


def test_bad_boxes_and_mask_grid(study: Path) -> None:
    write(study / "box_range.txt", "0 0.5 0.5 1.2 0.3\n")
    write(study / "box_fields.txt", "0 0.5 0.5 0.2\n")
    write(study / "box_class.txt", "tumor 0.5 0.5 0.2 0.2\n")
    m = write(study / "m.csv", "patient_id,image,boxes,mask\n"
                               "p1,img/a.png,box_good.txt,mask/a.png\n"
                               "p2,img/b.png,box_range.txt,\n"
                               "p3,img/c.png,box_fields.txt,\n"
                               "p4,img/d.png,box_class.txt,\n"
                               "p5,img/e.png,missing.txt,\n"
                               "p6,img/f.png,,mask/small.png\n")
    rep = validate_manifest(m, check_files=True)
    got = {(p.row, p.column): p.reason for p in rep.problems}
    assert set(got) == {(2, "boxes"), (3, "boxes"), (4, "boxes"), (5, "boxes"), (6, "mask")}
    assert "normalised to 0..1" in got[(2, "boxes")]
    assert "expected 5 values" in got[(3, "boxes")]
    assert "not a non-negative integer" in got[(4, "boxes")]
    assert got[(5, "boxes")] == "file not found: missing.txt"
    assert "mask grid (4, 4) (spacing (1.0, 1.0)) differs from image grid (8, 8)" in got[(6, "mask")]
    assert rep.summary["samples"] == 1
    # Without file checks the box contents and grids are not looked at, existence still is.
    assert [(p.row, p.column) for p in validate_manifest(m, check_files=False).problems] == [(5, "boxes")]


def test_channels_on_different_grids_are_quarantined(study: Path) -> None:
    png(study / "img" / "big.png", size=16)
    m = write(study / "m.csv", "patient_id,image_t2w,image_adc\np1,img/a.png,img/big.png\np2,img/b.png,img/c.png\n")
    man = load_manifest(m, check_files=True)
    assert list(man.df["patient_id"]) == ["p2"]
    assert str(man.problems[0]).startswith(
        "row 1, column image_adc: unreadable: `image_adc` has spatial shape (16, 16)")


# ------------------------------------------------------------------------- leakage


def test_patient_in_two_splits(study: Path) -> None:
    m = write(study / "m.csv", "patient_id,image,split\nP7,img/a.png,train\nP7,img/b.png,test\n"
                               "P8,img/c.png,val\nP8,img/d.png,\nP9,img/e.png,train\n")
    with pytest.raises(LeakageError) as exc:
        load_manifest(m)
    assert exc.value.patients == ["P7"] and "P7" in str(exc.value)
    rep = validate_manifest(m)
    assert not rep.ok
    [p] = rep.problems
    assert p.row is None and p.column == "split"
    assert str(p) == "column split: patient P7 appears in more than one split: test, train (rows 1, 2)"
    assert rep.summary["splits"]["(unassigned)"] == {"patients": 1, "samples": 1}


def test_manifest_summary_directly() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b"], "study_id": ["s1", "s2", ""], "image": ["x", "y", "z"],
                       "label": ["tumor", "normal", "normal"]})
    s = manifest_summary(df)
    assert (s["patients"], s["samples"], s["studies"]) == (2, 3, 2)
    with pytest.raises(ManifestError, match="no 'labels' column"):
        finding_names(df)
    with pytest.raises(ManifestError, match="no 'subtype' column"):
        class_names(df, "subtype")


# ------------------------------------------------------------------------- CLI


def test_cli_validate_good_and_bad(study: Path) -> None:
    good = write(study / "good.csv", "patient_id,image,label,split\np1,img/a.png,normal,train\n"
                                     "p2,img/b.png,tumor,val\np3,img/c.png,tumor,test\n")
    r = run_cli("manifest", "validate", str(good))
    assert r.returncode == 0, r.stderr
    assert "status:   OK" in r.stdout and "3 samples from 3 patients (3 rows read)" in r.stdout
    assert "files opened and checked" in r.stdout and "Traceback" not in r.stderr

    bad = write(study / "bad.csv", "patient_id,image,label,split\np1,img/a.png,normal,train\n"
                                   "p2,img/gone.png,tumor,val\np1,img/c.png,bad label,test\n")
    r = run_cli("manifest", "validate", str(bad), "--no-check-files")
    assert r.returncode == 1
    assert "row 2, column image: file not found: img/gone.png" in r.stdout
    assert "row 3, column label: invalid value 'bad label'" in r.stdout
    assert "patient p1 appears in more than one split: test, train" in r.stdout
    assert "existence only" in r.stdout and "Traceback" not in r.stderr


def test_cli_validate_unusable(tmp_path: Path) -> None:
    for name, content in (("empty.csv", b""), ("bin.csv", b"\x00\x01\x02")):
        (tmp_path / name).write_bytes(content)
        r = run_cli("manifest", "validate", str(tmp_path / name))
        assert r.returncode == 1 and "NOT OK" in r.stdout and "Traceback" not in r.stderr
    r = run_cli("manifest", "validate", str(tmp_path / "absent.csv"))
    assert r.returncode == 1 and "manifest not found" in r.stdout and "Traceback" not in r.stderr
