"""Join a labels CSV onto an ingested manifest: ``medvit manifest add-labels``.

``medvit ingest`` writes a manifest whose ``patient_id``/``study_id`` are keyed pseudonyms.
The labels of a cohort usually come separately (a spreadsheet from the reading clinicians).
:func:`add_labels` joins them by patient or by study:

* the labels CSV may hold the **pseudonyms** themselves (``P...``/``S...`` as in the
  manifest), or
* the **original** DICOM ``PatientID`` / ``StudyInstanceUID``: with the ingest key
  (``--key`` or ``$MEDVIT_PSEUDONYM_KEY``) they are pseudonymised exactly as ingest did
  (``patient`` of ``id:<PatientID>``, ``study`` of ``uid:<StudyInstanceUID>``) before the
  join, so no original identifier reaches the output.

Every other column of the labels CSV (``label``, ``labels``, ``split``, ...) is added to each
manifest row of that patient or study; rows without a label keep an empty cell. Summary
counts only: no id is printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from medvit.data.ingest import ENV_KEY, Pseudonymizer, resolve_key
from medvit.data.manifest import _read, path_columns
from medvit.errors import ManifestError
from medvit.fileio import atomic_write_text

ID_COLUMNS = {"patient_id": ("patient", "id:"), "study_id": ("study", "uid:")}


def _looks_pseudonymous(values: pd.Series, prefix: str) -> bool:
    return bool(len(values)) and values.str.fullmatch(prefix + r"[A-Z2-7]{16}").all()


def add_labels(manifest: str | os.PathLike[str], labels: str | os.PathLike[str], out: str | os.PathLike[str],
               on: str | None = None, key: str | None = None) -> str:
    """Write ``out``: ``manifest`` with the columns of ``labels`` joined by ``on``.

    Args:
        manifest: an ingested (pseudonymised) manifest CSV.
        labels: a CSV with ``on`` and the columns to add (e.g. ``label`` or ``labels``).
        out: the labelled manifest CSV (not ``manifest``; paths are rewritten for its folder).
        on: ``patient_id`` or ``study_id``; default ``study_id`` when both files have it,
            else ``patient_id``.
        key: the ingest key, needed only when ``labels`` holds original ids (default
            ``$MEDVIT_PSEUDONYM_KEY``).

    Returns:
        A one-line summary (counts only).

    Raises:
        ManifestError: missing id column, a column in both files, one id with two different
            labels, original ids without a key, or no id matching the manifest.
    """
    src, lab_path, out_path = Path(manifest), Path(labels), Path(out)
    if out_path.suffix.lower() != ".csv":
        raise ManifestError(f"output {out_path} must end in .csv")
    if out_path.resolve() == src.resolve():
        raise ManifestError(f"output {out_path} is the input manifest; write the labelled copy to a new file")
    df, problems = _read(src)
    if problems:
        raise ManifestError(f"manifest {src}: {len(problems)} row(s) cannot be read as CSV rows; fix them first")
    try:
        lab = pd.read_csv(lab_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"labels {lab_path} cannot be read as a UTF-8 CSV: {type(exc).__name__}") from None
    lab.columns = [str(c).strip() for c in lab.columns]
    lab = lab.apply(lambda col: col.str.strip())
    df = df.drop(columns="_row")
    if on is None:
        on = "study_id" if "study_id" in lab.columns and "study_id" in df.columns else "patient_id"
    if on not in ID_COLUMNS:
        raise ManifestError(f"--on: got {on!r}; allowed: patient_id, study_id")
    for name, table, path in (("manifest", df, src), ("labels", lab, lab_path)):
        if on not in table.columns:
            raise ManifestError(f"{name} {path} has no {on!r} column to join on; columns are {list(table.columns)}")
    extra = [c for c in lab.columns if c not in ID_COLUMNS]
    if not extra:
        raise ManifestError(f"labels {lab_path} has no column besides the ids: nothing to add")
    both = [c for c in extra if c in df.columns]
    if both:
        raise ManifestError(f"column(s) {both} are in both the manifest and the labels; drop them from one of them")
    lab = lab[lab[on] != ""]
    kind, tag = ID_COLUMNS[on]
    prefix = {"patient": "P", "study": "S"}[kind]
    if _looks_pseudonymous(lab[on], prefix) and lab[on].isin(set(df[on])).any():
        how = "pseudonyms"
    else:
        if key is None and not os.environ.get(ENV_KEY):
            raise ManifestError(f"the labels' {on} values are not the manifest's pseudonyms; to join original ids "
                                f"(DICOM {'PatientID' if kind == 'patient' else 'StudyInstanceUID'}), give the "
                                f"key ingest used (--key or ${ENV_KEY})")
        pseudo = Pseudonymizer(resolve_key(key))
        lab = lab.assign(**{on: [pseudo(kind, tag + v) for v in lab[on]]})
        how = "original ids pseudonymised with the key"
    conflicting = lab.groupby(on)[extra].nunique().gt(1).any(axis=1)
    if conflicting.any():
        raise ManifestError(f"{int(conflicting.sum())} {kind}(s) have different {extra} values in {lab_path}; "
                            "one value per id is needed")
    lab = lab.drop_duplicates(on)
    matched = lab[on].isin(set(df[on]))
    if not matched.any():
        raise ManifestError(f"no {on} of {lab_path} matches the manifest ({len(lab)} id(s), read as {how}): is it "
                            "the manifest of the same export, and the same key?")
    merged = df.merge(lab, on=on, how="left").fillna("")
    src_root, out_root = src.resolve().parent, out_path.resolve().parent
    if src_root != out_root:
        for column in path_columns(df):
            merged[column] = [v if not v or os.path.isabs(v) else os.path.relpath(src_root / v, out_root)
                              for v in merged[column]]
    atomic_write_text(out_path, merged.to_csv(index=False))
    labelled = int((merged[extra] != "").any(axis=1).sum())
    return (f"wrote {out_path}: {labelled} of {len(merged)} row(s) labelled by {on} ({how}); "
            f"{int((~matched).sum())} labels id(s) match no manifest row; added {extra}")
