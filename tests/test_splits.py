"""Patient-level splits, k-fold, the leakage guard, anomaly-ratio resampling, subsampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medvit.data.sampling import resample_to_anomaly_ratio, subsample_patients
from medvit.data.splits import assign_splits, check_no_leakage, patient_kfold, patient_labels, split_summary
from medvit.errors import ConfigError, LeakageError, ManifestError


def brain_like(n_patients: int = 81, n_tumour: int = 30, seed: int = 0) -> pd.DataFrame:
    """Many slices per patient; tumour patients have tumour and normal slices (like brain MRI)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        tumour = p < n_tumour
        for s in range(int(rng.integers(3, 15))):
            rows.append({"patient_id": f"P{p:03d}", "sample_id": f"P{p:03d}-{s}",
                         "label": "tumor" if tumour and rng.random() < 0.5 else "normal"})
        if tumour:  # at least one tumour slice
            rows[-1]["label"] = "tumor"
    return pd.DataFrame(rows)


def patient_split(df: pd.DataFrame, column: str = "split") -> pd.Series:
    per = df.groupby("patient_id")[column].nunique()
    assert (per == 1).all(), "a patient is in two splits"
    return df.groupby("patient_id")[column].first()


# ------------------------------------------------------------------------- strata


def test_patient_labels_rules() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b", "c", "d"],
                       "label": ["normal", "normal", "tumor", "normal", "normal", "", "glioma"]})
    assert patient_labels(df).to_dict() == {"a": "tumor", "b": "normal", "c": "(unlabeled)", "d": "glioma"}
    # no normal class: majority, ties alphabetical
    hist = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b"], "label": ["x", "y", "y", "y", "x"]})
    assert patient_labels(hist).to_dict() == {"a": "y", "b": "x"}
    ml = pd.DataFrame({"patient_id": ["a", "a", "b"], "labels": ["", "nodule|effusion", ""]})
    assert patient_labels(ml).to_dict() == {"a": "finding", "b": "no_finding"}
    assert set(patient_labels(ml.drop(columns="labels"))) == {"all"}
    with pytest.raises(ManifestError, match="label column 'subtype'"):
        patient_labels(df, "subtype")


# ------------------------------------------------------------------------- assign_splits


def test_assign_splits_patient_level_stratified_and_reproducible() -> None:
    df = brain_like()
    out = assign_splits(df, seed=3, val_fraction=0.2, test_fraction=0.2)
    check_no_leakage(out)
    per = patient_split(out)
    counts = per.value_counts()
    assert counts.to_dict() == {"train": 49, "val": 16, "test": 16}
    strata = patient_labels(df)
    overall = (strata == "tumor").mean()
    for name in ("train", "val", "test"):
        frac = (strata[per.index[per == name]] == "tumor").mean()
        assert abs(frac - overall) < 0.06, (name, frac, overall)
    assert len(out) == len(df) and (out.index == df.index).all()
    again = assign_splits(df, seed=3)
    assert (again["split"] == out["split"]).all()
    other = assign_splits(df, seed=4)
    assert (other["split"] != out["split"]).any()
    # row order does not change which patient goes where
    shuffled = assign_splits(df.sample(frac=1.0, random_state=1), seed=3)
    assert patient_split(shuffled).equals(per)


def test_assign_splits_multilabel_and_unlabelled() -> None:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"patient_id": [f"X{i // 3}" for i in range(120)],
                       "labels": ["nodule" if rng.random() < 0.3 else "" for _ in range(120)]})
    out = assign_splits(df, seed=0, val_fraction=0.1, test_fraction=0.3)
    per = patient_split(out)
    assert per.value_counts().to_dict() == {"train": 24, "test": 12, "val": 4}
    plain = assign_splits(df.drop(columns="labels"), seed=0)
    patient_split(plain)


def test_small_studies() -> None:
    three = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "label": ["tumor", "normal", "normal", "tumor"]})
    per = patient_split(assign_splits(three, seed=0))
    assert sorted(per) == ["test", "train", "val"]
    with pytest.raises(ManifestError, match="at least 3 patients are needed"):
        assign_splits(three[three.patient_id != "c"], seed=0)
    two = assign_splits(three[three.patient_id != "c"], seed=0, val_fraction=0.3, test_fraction=0.0)
    assert sorted(patient_split(two)) == ["train", "val"]
    # strata too small to stratify (one patient each): falls back to an unstratified draw
    tiny = pd.DataFrame({"patient_id": list("abcde"), "label": ["x", "y", "z", "x", "y"]})
    assert set(assign_splits(tiny, seed=0)["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("val, test", [(-0.1, 0.2), (0.5, 0.5), (1.0, 0.0), (0.2, 1.2)])
def test_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_splits(brain_like(10, 3), seed=0, val_fraction=val, test_fraction=test)


def test_given_split_kept_partial_filled_and_checked() -> None:
    df = brain_like(20, 8)
    given = assign_splits(df, seed=0)
    kept = assign_splits(given, seed=99)
    assert (kept["split"] == given["split"]).all()
    # partial: patients P000..P009 fixed as test (one row each given, the rest empty)
    part = df.copy()
    part["split"] = ""
    first_rows = part.groupby("patient_id").head(1).index
    part.loc[first_rows[:10], "split"] = "test"
    out = assign_splits(part, seed=0, val_fraction=0.2, test_fraction=0.0)
    per = patient_split(out)
    assert (per[[f"P{i:03d}" for i in range(10)]] == "test").all()
    assert per[[f"P{i:03d}" for i in range(10, 20)]].value_counts().to_dict() == {"train": 8, "val": 2}
    # leakage in a given column names the patient
    leak = given.copy()
    victim = leak.groupby("patient_id").size().idxmax()
    rows = leak.index[leak.patient_id == victim]
    leak.loc[rows[0], "split"], leak.loc[rows[1], "split"] = "train", "test"
    with pytest.raises(LeakageError, match=victim) as exc:
        assign_splits(leak, seed=0)
    assert exc.value.patients == [victim]
    bad = given.assign(split=given["split"].replace("val", "validation"))
    with pytest.raises(ManifestError, match="'validation'"):
        assign_splits(bad, seed=0)


# ------------------------------------------------------------------------- leakage guard


def test_check_no_leakage() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c"], "split": ["train", "train", "val", "test", ""]})
    with pytest.raises(LeakageError) as exc:
        check_no_leakage(df)
    assert exc.value.patients == ["b"] and "b in test, val" in str(exc.value)
    check_no_leakage(df[df.patient_id != "b"])
    with pytest.raises(ManifestError, match="no 'fold' column"):
        check_no_leakage(df, "fold")
    folds = pd.DataFrame({"patient_id": ["a", "a", "b"], "fold": [0, 1, 1]})
    with pytest.raises(LeakageError, match="a in 0, 1"):
        check_no_leakage(folds, "fold")


# ------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("k", [2, 5])
def test_patient_kfold_disjoint_covering_stratified(k: int) -> None:
    df = brain_like(60, 20, seed=2)
    out = patient_kfold(df, k=k, seed=0)
    check_no_leakage(out, "fold")
    per = patient_split(out, "fold")
    assert sorted(per.unique()) == list(range(k))            # every fold non-empty
    assert len(per) == df.patient_id.nunique()                # every patient in exactly one fold
    assert out["fold"].dtype.kind == "i" and len(out) == len(df)
    strata = patient_labels(df)
    tumour_per_fold = strata[per.index].eq("tumor").groupby(per.values).sum()
    assert tumour_per_fold.max() - tumour_per_fold.min() <= 2
    assert (patient_kfold(df, k=k, seed=0)["fold"] == out["fold"]).all()
    summary = split_summary(out, column="fold")
    assert sum(v["patients"] for v in summary.values()) == 60


def test_patient_kfold_errors() -> None:
    df = brain_like(4, 2)
    with pytest.raises(ManifestError, match="5-fold cross-validation needs at least 5 patients"):
        patient_kfold(df, k=5)
    with pytest.raises(ConfigError):
        patient_kfold(df, k=1)
    assert sorted(patient_kfold(df, k=4)["fold"].unique()) == [0, 1, 2, 3]


def test_split_summary() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "label": ["tumor", "normal", "normal", "normal"],
                       "split": ["train", "train", "val", "test"]})
    s = split_summary(df)
    assert list(s) == ["train", "val", "test"]
    assert s["train"] == {"patients": 1, "samples": 2, "strata": {"tumor": 1},
                          "classes": {"normal": {"patients": 1, "samples": 1}, "tumor": {"patients": 1, "samples": 1}}}
    ml = pd.DataFrame({"patient_id": ["a", "b"], "labels": ["nodule", ""], "split": ["train", "val"]})
    assert split_summary(ml)["val"]["findings"] == {"nodule": {"patients": 0, "samples": 0}}


# ------------------------------------------------------------------------- anomaly-ratio resampling


def test_resample_by_patient_reaches_target() -> None:
    df = brain_like()                                          # 30 tumour / 51 normal patients
    abnormal = df["label"] == "tumor"
    out, a = resample_to_anomaly_ratio(df, 0.1, by="patient", seed=0, is_abnormal=abnormal)
    # 9 normal : 1 tumour by patients: keep all 51 normal, 6 tumour patients (6/57 = 0.105)
    assert (a["patients_normal"], a["patients_abnormal"]) == (51, 6)
    assert abs(a["achieved_patient_fraction"] - 0.1) <= 1 / 57
    assert a["by"] == "patient" and a["target_abnormal_fraction"] == 0.1
    kept = set(out.patient_id)
    assert (df[df.patient_id.isin(kept)].index == out.index).all()   # whole patients, original order
    assert not out.index.duplicated().any()
    assert a["images_normal"] + a["images_abnormal"] == len(out)
    again, _ = resample_to_anomaly_ratio(df, 0.1, by="patient", seed=0, is_abnormal=abnormal)
    assert again.index.equals(out.index)
    # abnormal in short supply: normal patients are dropped instead (never duplicated)
    out2, a2 = resample_to_anomaly_ratio(df, 0.5, by="patient", seed=0, is_abnormal=abnormal)
    assert (a2["patients_abnormal"], a2["patients_normal"]) == (30, 30)
    assert a2["achieved_patient_fraction"] == 0.5


def test_resample_by_image_reaches_target() -> None:
    df = brain_like()
    abnormal = df["label"] == "tumor"
    n_norm = int((~abnormal).sum())
    out, a = resample_to_anomaly_ratio(df, 0.1, by="image", seed=1, is_abnormal=abnormal)
    assert a["images_normal"] == n_norm                       # every normal image kept
    assert abs(a["achieved_image_fraction"] - 0.1) <= 1 / len(out)
    assert set(df.index[~abnormal]) <= set(out.index)
    assert a["patients_normal"] + a["patients_abnormal"] == out.patient_id.nunique()
    # default is_abnormal (label != normal) and numpy masks give the same result
    out_d, _ = resample_to_anomaly_ratio(df, 0.1, by="image", seed=1)
    out_np, _ = resample_to_anomaly_ratio(df, 0.1, by="image", seed=1, is_abnormal=abnormal.to_numpy())
    assert out_d.index.equals(out.index) and out_np.index.equals(out.index)


def test_resample_errors() -> None:
    df = brain_like(10, 3)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        resample_to_anomaly_ratio(df, 1.0)
    with pytest.raises(ConfigError, match="'patient' or 'image'"):
        resample_to_anomaly_ratio(df, 0.1, by="slice")
    with pytest.raises(ManifestError, match="0 abnormal"):
        resample_to_anomaly_ratio(df, 0.1, is_abnormal=pd.Series(False, index=df.index))
    with pytest.raises(ValueError):
        resample_to_anomaly_ratio(df, 0.1, is_abnormal=np.zeros(3, dtype=bool))


def test_subsample_patients_stratified() -> None:
    df = brain_like()
    sub = subsample_patients(df, 0.4, seed=0)
    strata = patient_labels(sub)
    assert strata.value_counts().to_dict() == {"normal": 20, "tumor": 12}   # round(0.4*51), round(0.4*30)
    assert (df[df.patient_id.isin(sub.patient_id)].index == sub.index).all()
    assert subsample_patients(df, 0.4, seed=0).index.equals(sub.index)
    tiny = subsample_patients(df, 0.01, seed=0)
    assert patient_labels(tiny).value_counts().to_dict() == {"normal": 1, "tumor": 1}
    assert subsample_patients(df, 1.0) is df
    with pytest.raises(ConfigError):
        subsample_patients(df, 0.0)
