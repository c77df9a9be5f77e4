"""Study configs: load, validate against the workflow's JSON Schema, fill every default.

The schema is ``workflows/schemas/study.schema.yaml``, the same file the Snakefile hands to
``snakemake.utils.validate``, so ``medvit config``, every stage and the workflow agree on
what a valid study is. Validation reports every problem at once, each naming the key path
(e.g. ``tasks.xray.train.epochs``), the value given and what is allowed::

    study = load_study("workflows/studies/demo.yaml")
    task_config(study, "xray")["train"]["epochs"]        # 5 unless the study says otherwise
    task_manifest_path(study, "xray")                    # results/demo/data/xray/manifest.csv
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

import medvit
from medvit.data.manifest import (
    ROOTS_ENV,
    _read,
    allowed_roots,
    identifying_id_warnings,
    manifest_outside_roots,
    manifest_roots,
    outside_root_problems,
)
from medvit.errors import ConfigError, ManifestError

SCHEMA_PATH = Path(medvit.__file__).resolve().parents[1] / "workflows" / "schemas" / "study.schema.yaml"
"""The study-config schema (shared with the Snakefile)."""

TASKS = ("xray", "brain", "prostate", "histo")
"""Task families a study may contain, in report order."""

TASK_MODALITIES = {"xray": ("CR", "DX", "RG"), "brain": ("MR",), "prostate": ("MR",), "histo": ("SM", "GM", "XC", "OT")}
"""DICOM Modality values (PS3.3 C.7.3.1.1.1) of the images each task's models learn from:
``medvit infer`` quarantines an input of another modality (a CT series given to an X-ray
model) unless asked to score any modality."""

CSWIN_MODELS = ("cswin_unet", "cswin_unet_ssl")
"""The CSwin-UNet models: built from the task's ``cswin`` block."""
SSL_MODELS = ("cswin_unet_ssl",)
"""Models whose encoder starts from the task's self-supervised pretraining."""

SOURCES = {"pneumoniamnist": Path("data_manifests/pneumoniamnist/pneumoniamnist.npz"),
           "nih-cxr14": Path("data_manifests/nih_cxr14/chestxray14_nih1000_64.npz"),
           "kather2016": Path("data_manifests/kather2016/kather2016_he_96.npz"),
           # not redistributable: read where it lies, in the `shared` folder beside the repository
           "lgg": Path("../shared/data/lgg_brain_mri_128.npz")}
"""Real datasets a task may name as ``source`` -> the file ``medvit import`` reads (relative to the
repository root, the working directory of a Snakemake run)."""

# Human wording for the patterns used in the schema.
_PATTERN_WORDS = {"^[A-Za-z0-9_-]+$": "letters, digits, '_' and '-' only"}
_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "null": "null", "array": "a list", "object": "a mapping of keys"}
# YAML 1.1 (PyYAML) reads `1e-3` as a string; it needs a dot (`1.0e-3`) to be a float.
_FLOAT_LIKE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
# JSON Schema patterns are searched, and `$` also matches before a final newline ("demo\n"):
# the study name is checked again in full.
_STUDY_NAME = re.compile(r"[A-Za-z0-9_-]+")
# results_dir is part of every output path, which Snakemake puts unquoted into shell commands.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@:,=][A-Za-z0-9_./+@:,=-]*")
MAX_CONFIG_BYTES = 1 << 20
"""Largest study file read (a study is a few hundred lines)."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a study may expand to once aliases are followed (refuses "billion laughs")."""


# ---------------------------------------------------------------------------------- schema
@functools.lru_cache(maxsize=1)
def _schema_cached() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"study-config schema not found at {SCHEMA_PATH} (medvit must run from its source tree)")
    with SCHEMA_PATH.open(encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    Draft202012Validator.check_schema(schema)
    return schema


def adapt_methods() -> tuple[str, ...]:
    """The adaptation methods a study may compare (``adapt.methods`` in the schema)."""
    return tuple(_schema_cached()["$defs"]["adapt"]["properties"]["methods"]["items"]["enum"])


def load_schema() -> dict:
    """The study-config JSON Schema as a dict (a fresh copy; callers may modify it)."""
    return copy.deepcopy(_schema_cached())


def block_defaults(block: str) -> dict[str, Any]:
    """The schema's defaults of a task block (e.g. ``finetune``, ``detection``), from the first
    task that declares it: what a stage uses for a task whose schema has no such block (a ViT
    of histo takes the fine-tuning recipe of xray's ``finetune``)."""
    for task in load_schema()["properties"]["tasks"]["properties"].values():
        props = task.get("properties", {}).get(block, {}).get("properties")
        if props:
            return {k: v["default"] for k, v in props.items() if "default" in v}
    raise KeyError(f"no task block {block!r} in the study schema")


def _extend_with_default(validator_class):
    """A validator class that fills ``default`` values while it validates.

    The mechanism of ``snakemake.utils.validate(set_default=True)`` (the jsonschema FAQ recipe),
    with two fixes: defaults are deep-copied (so filled objects never share state with the
    schema or with each other) and only real mappings are filled (a wrong type is reported,
    not crashed on).
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_FillingValidator = _extend_with_default(Draft202012Validator)


# ---------------------------------------------------------------------------------- errors
def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML terms (null, true, 'text', [..])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _type_of(value: Any) -> str:
    for name, kinds in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                        ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kinds):
            return _TYPE_WORDS[name]
    return type(value).__name__


def _resolve(schema: Mapping, root: Mapping) -> dict:
    """``schema`` with a local ``$ref`` merged in (sibling keys win)."""
    if "$ref" not in schema:
        return dict(schema)
    target: Any = root
    for part in schema["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    merged = _resolve(target, root)
    merged.update({k: v for k, v in schema.items() if k != "$ref"})
    return merged


def describe_allowed(schema: Mapping, root: Mapping | None = None) -> str:
    """What a (sub)schema allows, in words: ``"an integer >= 4"``, ``"one of max, mean, topk"``."""
    root = root if root is not None else _schema_cached()
    schema = _resolve(schema, root)
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) if not isinstance(v, str) else v for v in schema["enum"])
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    words = []
    for t in types:
        w = _TYPE_WORDS.get(t, t)
        if t in ("integer", "number"):
            bounds = [f"{op} {schema[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                        ("maximum", "<="), ("exclusiveMaximum", "<"))
                      if k in schema]
            if "minimum" in schema and schema.get("maximum") == schema["minimum"]:
                w += f" equal to {schema['minimum']}"
            elif bounds:
                w += " " + " and ".join(bounds)
        elif t == "string":
            if "pattern" in schema:
                p = schema["pattern"]
                w += f" of {_PATTERN_WORDS[p]} (pattern {p})" if p in _PATTERN_WORDS else f" matching {p}"
            elif schema.get("minLength", 0) >= 1:
                w = "a non-empty string"
        elif t == "array":
            lo, hi = schema.get("minItems"), schema.get("maxItems")
            count = (f"exactly {lo} " if lo is not None and lo == hi else
                     f"{lo} or more " if lo else f"at most {hi} " if hi is not None else "")
            item = describe_allowed(schema.get("items", {}), root) if schema.get("items") else "values"
            w = f"a list of {count}items, each {item}" + (", without repeats" if schema.get("uniqueItems") else "")
        elif t == "object" and "properties" in schema:
            w += " (keys: " + ", ".join(schema["properties"]) + ")"
        words.append(w)
    return " or ".join(words) if words else "any value"


def _format_error(error: ValidationError, root: Mapping) -> list[str]:
    """One or more ``"<key path>: <problem>; allowed: <what>"`` lines for a schema error."""
    path = _key_path(error.absolute_path)
    kw, inst, sch = error.validator, error.instance, error.schema
    if kw == "additionalProperties":
        known = list(sch.get("properties", {}))
        lines = []
        for key in [k for k in inst if k not in known]:
            where = f"{path}.{key}" if path else str(key)
            what = "unknown task" if path == "tasks" else "unknown key"
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}: {what} {_show(key)}{hint}; allowed{' at ' + path if path else ''}: "
                         + ", ".join(known))
        return lines
    if kw == "required":
        missing = [k for k in error.validator_value if k not in inst]
        return [f"{(path + '.') if path else ''}{k}: missing; this key is required" for k in missing]
    if kw == "minProperties" and path == "tasks":
        return [f"tasks: no task given; allowed: at least one of {', '.join(sch.get('properties', {}))}"]
    value = f"got {_show(inst)}"
    if kw == "type":
        value += f" ({_type_of(inst)})"
        if isinstance(inst, str) and _FLOAT_LIKE.match(inst.strip()):
            value += "; note YAML reads numbers like 1e-3 as text: write 1.0e-3"
    elif kw == "uniqueItems":
        value += " (it has repeated items)"
    return [f"{path or '<top level>'}: {value}; allowed: {describe_allowed(sch, root)}"]


def _semantic_errors(study: Mapping, source: str | Path | None = None) -> list[str]:
    """Checks a JSON Schema cannot express (run on the default-filled config; type-guarded)."""
    errors: list[str] = []
    name = study.get("study")
    if isinstance(name, str) and re.search("^[A-Za-z0-9_-]+$", name) and not _STUDY_NAME.fullmatch(name):
        errors.append(f"study: got {_show(name)} (it ends in a line break); allowed: a string of "
                      f"{_PATTERN_WORDS['^[A-Za-z0-9_-]+$']} (pattern ^[A-Za-z0-9_-]+$)")
    results_dir = study.get("results_dir")
    if isinstance(results_dir, str) and results_dir and not _SAFE_PATH.fullmatch(results_dir):
        errors.append(f"results_dir: got {_show(results_dir)}; allowed: a path of letters, digits and _ . / + @ : , = "
                      "- "
                      "(not starting with '-'; no spaces or shell metacharacters: it is part of every output path "
                      "in the workflow's shell commands)")
    tasks = study.get("tasks")
    if not isinstance(tasks, dict):
        return errors
    for name, task in tasks.items():
        if not isinstance(task, dict):
            continue
        manifest = task.get("manifest")
        if isinstance(manifest, str) and manifest and not Path(manifest).is_file():
            errors.append(f"tasks.{name}.manifest: file not found: {manifest} "
                          f"(paths are relative to the working directory {Path.cwd()})")
        elif isinstance(manifest, str) and manifest:
            outside = _manifest_location_error(f"tasks.{name}.manifest", manifest, source)
            errors.extend([outside] if outside else _manifest_root_errors(name, manifest,
                                                                          study.get("identifying_patient_ids")))
        external = task.get("external_manifest")
        if isinstance(external, str) and external and Path(external).exists():
            outside = _manifest_location_error(f"tasks.{name}.external_manifest", external, source)
            errors.extend([outside] if outside else [])
        source = task.get("source")
        if source is not None and manifest is not None:
            errors.append(f"tasks.{name}: got both manifest {_show(manifest)} and source {_show(source)}; "
                          "allowed: one of them, or neither for a synthetic study")
        split = task.get("split")
        if isinstance(split, dict):
            val, test = split.get("val_fraction"), split.get("test_fraction")
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (val, test)) and val + test >= 1:
                errors.append(f"tasks.{name}.split: got val_fraction + test_fraction = {val + test:g}; "
                              "allowed: a sum below 1 (patients must remain for training)")
        if name == "xray" and task.get("label_column") == "labels":
            if task.get("positive_class") is not None:
                errors.append(f"tasks.xray.positive_class: got {_show(task['positive_class'])} with label_column "
                              "'labels'; allowed: null (positive_class applies to label_column 'label')")
        if name == "xray" and task.get("label_column") == "label" and task.get("findings"):
            errors.append(f"tasks.xray.findings: got {_show(task['findings'])} with label_column 'label'; "
                          "allowed: [] (findings apply to label_column 'labels')")
        errors.extend(_vit_errors(name, task))
        errors.extend(_subgroup_errors(study, name, task))
        errors.extend(_label_column_errors(name, task))
    return errors


def _label_column_errors(name: str, task: Mapping) -> list[str]:
    """A given manifest without the task's label column, e.g. a single-label manifest (``label``)
    read with the chest X-ray task's default multi-label setting (``label_column: labels``): the
    key(s) to set, with the manifest's classes. Checked on the header and the label values only."""
    manifest, column = task.get("manifest"), task.get("label_column", "label")
    if name not in ("xray", "brain", "histo") or not isinstance(manifest, str) or not manifest \
            or not Path(manifest).is_file() or not isinstance(column, str):
        return []
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if column in header or (name == "xray" and column == "label" and "labels" in header):
                return []
            values: set[str] = set()
            if "label" in header:
                at = header.index("label")
                for i, row in enumerate(reader):
                    if i >= 200_000 or len(values) > 20:
                        break
                    if at < len(row) and row[at].strip():
                        values.add(row[at].strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # an unreadable manifest is reported by the split stage in detail
    if name == "xray" and column == "labels" and "label" in header:
        classes = sorted(values)
        positive = next((c for c in classes if c.lower() not in ("normal", "negative", "no_finding", "0")),
                        classes[-1] if classes else "CLASS")
        return [f"tasks.xray.label_column: got 'labels' (the default: multi-label findings, `|`-separated), but the "
                f"manifest {manifest} has no `labels` column; it has a single-label `label` column with "
                f"{len(classes)} class(es) {_show(classes[:10])}. Set `label_column: label` and "
                f"`positive_class: {positive}` (binary; or leave positive_class null for one score per class)"]
    if not {"label", "labels"} & set(header):
        return []  # no labels at all: the split stage says what is missing
    return [f"tasks.{name}.label_column: got {_show(column)}, not a column of the manifest {manifest}; allowed: "
            f"one of its columns ({', '.join(h for h in header if h)})"]


def _subgroup_errors(study: Mapping, name: str, task: Mapping) -> list[str]:
    """``evaluation.subgroups`` columns missing from the task's manifest: the given one, or a
    generated one once it exists (a manifest not yet generated is checked when it is)."""
    wanted = (study.get("evaluation") or {}).get("subgroups")
    if not isinstance(wanted, list) or not wanted:
        return []
    manifest = task.get("manifest")
    path = Path(manifest) if isinstance(manifest, str) and manifest else None
    if path is None and isinstance(study.get("results_dir"), str) and isinstance(study.get("study"), str):
        path = Path(study["results_dir"]) / study["study"] / "data" / name / "manifest.csv"
    if path is None or not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # an unreadable manifest is reported by the split stage in detail
    missing = [c for c in wanted if c not in header]
    if not missing:
        return []
    return [f"evaluation.subgroups: got {_show(missing)}, not column(s) of the {name} manifest {path}; allowed: "
            f"columns of that manifest ({', '.join(header)})"]


def _manifest_location_error(key: str, manifest: str, source: str | Path | None) -> str | None:
    """A manifest file outside the working directory, the study file's folder and
    ``$MEDVIT_DATA_ROOTS`` (symbolic links followed); it is not opened."""
    roots = manifest_roots(source)
    real = manifest_outside_roots(manifest, roots)
    if real is None:
        return None
    return (f"{key}: got {_show(manifest)}, which resolves to {real}; allowed: a manifest inside the working "
            f"directory, the study file's folder or a folder listed in ${ROOTS_ENV} "
            f"({', '.join(str(r) for r in roots)}); it was not opened")


def _manifest_root_errors(task: str, manifest: str, identifying_ids: Any = None) -> list[str]:
    """Paths of a given manifest that leave its allowed roots, and (``identifying_ids`` is
    ``error``) patient ids that look like names, MRNs or dates; checked before any job runs. An
    unreadable manifest is left to the split stage, which says why in detail."""
    try:
        df, _ = _read(manifest)
    except ManifestError:
        return []
    problems = outside_root_problems(df, Path(manifest).resolve().parent, allowed_roots(manifest))
    shown = [f"tasks.{task}.manifest: {manifest} {p}" for p in problems[:10]]
    if len(problems) > 10:
        shown.append(f"tasks.{task}.manifest: ... and {len(problems) - 10} more paths outside the allowed roots")
    if identifying_ids == "error":
        shown.extend(f"tasks.{task}.manifest: {manifest} {w} (identifying_patient_ids: error)"
                     for w in identifying_id_warnings(df))
    return shown


def _vit_errors(name: str, task: Mapping) -> list[str]:
    """ViT/MAE settings of a task that only make sense together (type-guarded)."""
    errors: list[str] = []
    models = task.get("models") if isinstance(task.get("models"), list) else []
    pretrain = task.get("pretrain") if isinstance(task.get("pretrain"), dict) else {}
    finetune = task.get("finetune") if isinstance(task.get("finetune"), dict) else {}
    vits = [m for m in models if isinstance(m, str) and is_vit(m)]
    encoder = pretrain.get("model")
    init = finetune.get("init")
    for m in vits:
        base = m.removesuffix("_mae")
        from_mae = m.endswith("_mae") or init == "mae"
        if from_mae and isinstance(encoder, str) and base != encoder:
            errors.append(f"tasks.{name}.models: got {m!r}, initialised from the MAE stage whose encoder is "
                          f"pretrain.model {encoder!r}; allowed: {encoder}_mae (or set pretrain.model: {base})")
    patch, size = pretrain.get("patch_size"), task.get("image_size")
    if vits and isinstance(patch, int) and isinstance(size, int) and size % patch:
        errors.append(f"tasks.{name}.pretrain.patch_size: got {patch} with image_size {size}; allowed: a divisor "
                      "of image_size (the ViTs cut the image into whole patches)")
    scale = pretrain.get("crop_scale")
    if isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale) \
            and scale[0] > scale[1]:
        errors.append(f"tasks.{name}.pretrain.crop_scale: got {_show(scale)}; allowed: [min, max] with min <= max")
    if isinstance(init, str) and init not in ("scratch", "mae") and vits and not Path(init).is_file():
        errors.append(f"tasks.{name}.finetune.init: file not found: {init}; allowed: scratch, mae or the path of a "
                      f"local checkpoint (relative to the working directory {Path.cwd()})")
    return errors


def is_vit(model: str) -> bool:
    """Whether a registered model name is one of the ViTs (:mod:`medvit.models.vit`): the
    models with the MAE fine-tuning recipe, a patch size and an MAE or checkpoint start."""
    return model.startswith("vit_")


def needs_mae(study: Mapping[str, Any], task: str, model: str) -> bool:
    """Whether ``model`` of ``task`` starts from the task's MAE pretraining stage."""
    if not is_vit(model):
        return False
    return model.endswith("_mae") or task_config(study, task).get("finetune", {}).get("init") == "mae"


def mae_encoder_path(study: Mapping[str, Any], task: str) -> Path:
    """``<results_dir>/<study>/<task>/mae/encoder.safetensors``: the MAE stage's encoder."""
    return study_dir(study) / task / "mae" / "encoder.safetensors"


def external_manifest_path(study: Mapping[str, Any], task: str) -> Path | None:
    """The external cohort's manifest: ``external_manifest``, or the synthetic one generated at
    ``<results>/<study>/data/<task>_external/manifest.csv`` when ``external_synthetic.patients``
    > 0; None when the study has no external test."""
    tcfg = task_config(study, task)
    if tcfg["external_manifest"]:
        return Path(tcfg["external_manifest"])
    if tcfg["external_synthetic"]["patients"] > 0:
        return study_dir(study) / "data" / f"{task}_external" / "manifest.csv"
    return None


def percent_label(fraction: float) -> str:
    """Folder label of a patient fraction: 0.1 -> ``10``, 1.0 -> ``100``, 0.125 -> ``12.5``."""
    return f"{round(100 * float(fraction), 6):g}"


def run_name(method: str, fraction: float) -> str:
    """``dvpt_p25``: the folder of one (method, fraction) run under ``<task>/adapt/``."""
    return f"{method}_p{percent_label(fraction)}"


# ---------------------------------------------------------------------------------- public API
def validate_study(raw: Mapping[str, Any], source: str | Path | None = None) -> dict:
    """Validate a study mapping and return a copy with every default filled.

    Args:
        raw: the study as parsed from YAML. Not modified.
        source: where it came from, named in the error message.

    Returns:
        The study with defaults filled recursively (inside ``evaluation`` and inside every task
        present; tasks absent from ``tasks`` stay absent). A task written as an empty key
        (``xray:``) means a task with all defaults.

    Raises:
        ConfigError: listing every problem, each as ``<key path>: got <value>; allowed: <what>``.
    """
    root = _schema_cached()
    study = copy.deepcopy(dict(raw))
    if isinstance(study.get("tasks"), dict):
        study["tasks"] = {k: ({} if v is None else v) for k, v in study["tasks"].items()}
    lines: list[str] = []
    for error in _FillingValidator(root).iter_errors(study):
        lines.extend(_format_error(error, root))
    lines.extend(_semantic_errors(study, source))
    if lines:
        where = f" {source}" if source is not None else ""
        unique = list(dict.fromkeys(lines))
        raise ConfigError(f"invalid study config{where} ({len(unique)} problem{'s' * (len(unique) > 1)}):\n"
                          + "\n".join(f"  - {line}" for line in unique))
    return _in_schema_order(study, root, root)


def _in_schema_order(value: Any, schema: Mapping, root: Mapping) -> Any:
    """Mappings re-ordered as the schema lists their keys (stable, readable `medvit config` output)."""
    schema = _resolve(schema, root)
    props = schema.get("properties")
    if not isinstance(value, dict) or not props:
        return value
    return {k: _in_schema_order(value[k], props[k], root) for k in props if k in value}


def load_study(path: str | Path) -> dict:
    """Read a study YAML safely, validate it and fill every default.

    Args:
        path: the study config file.

    Returns:
        The validated study (see :func:`validate_study`).

    Raises:
        ConfigError: the file is missing, empty, not YAML, not a mapping, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"study config {path} is {size} bytes; allowed: at most {MAX_CONFIG_BYTES} "
                              "(a study is a short YAML file)")
        raw = _safe_yaml(path.read_text(encoding="utf-8"), path)
    except RecursionError:
        raise ConfigError(f"study config {path} is nested too deeply to be a study") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"study config {path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"study config {path} is not UTF-8 text") from None
    if raw is None:
        raise ConfigError(f"study config {path} is empty; it needs at least `study: <name>` and `tasks:`")
    if not isinstance(raw, dict):
        raise ConfigError(f"study config {path} must be a mapping of keys (e.g. `study: demo`), "
                          f"got {_type_of(raw)}: {_show(raw)}")
    return validate_study(raw, source=path)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], active: set[int], path: Path) -> int:
    """Nodes ``node`` becomes once every alias is copied out (shared nodes counted per use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError(f"study config {path} has a recursive alias (an anchor used inside itself)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_nodes(child, memo, active, path) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_nodes(k, memo, active, path) + _expanded_nodes(v, memo, active, path)
                     for k, v in node.value)
    active.discard(key)
    memo[key] = total
    return total


def _duplicate_keys(node: yaml.Node, where: str, seen: set[int], found: list[str]) -> None:
    """Keys given twice in one mapping (PyYAML silently keeps the last), each as
    ``"tasks.histo: key 'train' at lines 5 and 9"``."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            line = key.start_mark.line + 1
            if name is not None and name in first:
                found.append(f"{where + ': ' if where else ''}key {name!r} at lines {first[name]} and {line}")
            elif name is not None:
                first[name] = line
            inner = f"{where}.{name}" if where and name is not None else (name if name is not None else where)
            _duplicate_keys(value, inner or "", seen, found)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{where}[{i}]", seen, found)


def _safe_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that first refuses documents expanding to more than
    :data:`MAX_YAML_NODES` nodes (anchors re-used exponentially, a "billion laughs" bomb):
    PyYAML shares aliased objects, but validation and the workflow walk them in full. A key
    given twice in one mapping is refused too (PyYAML would keep the last one silently)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        duplicates: list[str] = []
        _duplicate_keys(node, "", set(), duplicates)
        if duplicates:
            raise ConfigError(f"study config {path} gives a key twice ({len(duplicates)} time"
                              f"{'s' * (len(duplicates) > 1)}); YAML would keep the last value silently:\n"
                              + "\n".join(f"  - {d}" for d in duplicates) + "\nallowed: each key once per mapping")
        size = _expanded_nodes(node, {}, set(), path)
        if size > MAX_YAML_NODES:
            raise ConfigError(f"study config {path} expands to {size} YAML nodes through its anchors and aliases; "
                              f"allowed: at most {MAX_YAML_NODES} (is it a YAML bomb?)")
    return yaml.safe_load(text)


def study_dir(study: Mapping[str, Any]) -> Path:
    """``<results_dir>/<study>``: the folder that holds every output of the study."""
    return Path(study["results_dir"]) / study["study"]


def task_config(study: Mapping[str, Any], task: str) -> dict:
    """The (default-filled) config of one task of a validated study.

    Raises:
        ConfigError: the task is not part of the study.
    """
    tasks = study.get("tasks", {})
    if task not in tasks:
        raise ConfigError(f"task {task!r} is not in study {study.get('study')!r}; "
                          f"its tasks: {', '.join(tasks) or 'none'}")
    return tasks[task]


def manifest_origin(study: Mapping[str, Any], task: str) -> str:
    """Where a task's manifest comes from: ``"manifest"`` (given), ``"synthetic"``, or a source name."""
    cfg = task_config(study, task)
    if cfg.get("manifest") is not None:
        return "manifest"
    return cfg.get("source") or "synthetic"


def pretrain_extra_manifests(study: Mapping[str, Any], task: str) -> list[Path]:
    """Manifests whose images (never labels) join a task's MAE pretraining
    (``tasks.<task>.pretrain.extra_manifests``): a shipped source name (e.g. ``pneumoniamnist``)
    means the manifest the workflow imports at ``<results_dir>/<study>/data/extra/<name>/manifest.csv``;
    anything else is a manifest path."""
    names = (task_config(study, task).get("pretrain") or {}).get("extra_manifests") or []
    return [extra_source_manifest(study, n) if n in SOURCES else Path(n) for n in names]


def extra_source_manifest(study: Mapping[str, Any], name: str) -> Path:
    """Where the workflow imports shipped dataset ``name`` used as extra pretraining images."""
    return study_dir(study) / "data" / "extra" / name / "manifest.csv"


def task_manifest_path(study: Mapping[str, Any], task: str) -> Path:
    """The manifest a task reads: ``tasks.<task>.manifest``, or, when null, the generated or
    imported one at ``<results_dir>/<study>/data/<task>/manifest.csv``."""
    manifest = task_config(study, task).get("manifest")
    if manifest is not None:
        return Path(manifest)
    return study_dir(study) / "data" / task / "manifest.csv"


MEMORY_CACHE_BYTES = 2 << 30
"""``cache: auto`` keeps a task's images in memory up to this decoded (float32) size."""


def cache_spatial_size(study: Mapping[str, Any], task: str) -> tuple[list[int], bool]:
    """The grid every stage of ``task`` loads its samples at, and whether it loads masks:
    the preprocessing setting of the task's disk cache."""
    size = int(task_config(study, task)["image_size"])
    return ([size] * 3, True) if task == "prostate" else ([size] * 2, False)


def cache_dir(study: Mapping[str, Any], task: str) -> Path:
    """``<results_dir>/<study>/<task>/cache/<grid>``: the task's preprocessed cache, named by its
    grid (e.g. ``224x224``, ``64x64x64-mask``)."""
    size, masks = cache_spatial_size(study, task)
    return study_dir(study) / task / "cache" / ("x".join(map(str, size)) + ("-mask" if masks else ""))


def estimated_image_bytes(study: Mapping[str, Any], task: str) -> int | None:
    """Decoded float32 size of a task's images: rows x channels x grid x 4 bytes; channels are
    the manifest's image columns (3 per image for histology's colour). None for a manifest the
    workflow generates or imports (not there yet when the workflow is planned; all small)."""
    if manifest_origin(study, task) != "manifest":
        return None
    path = task_manifest_path(study, task)
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
            rows = sum(1 for line in fh if line.strip())
    except OSError:
        return None
    channels = sum(1 for c in header if c == "image" or c.startswith("image_")) or 1
    if task == "histo":
        channels *= 3
    size, _ = cache_spatial_size(study, task)
    return rows * channels * math.prod(size) * 4


def cache_mode(study: Mapping[str, Any], task: str) -> str:
    """``memory``, ``disk`` or ``none``: the study's ``cache``, with ``auto`` resolved per task
    (``disk`` when its decoded images would exceed :data:`MEMORY_CACHE_BYTES`, else ``memory``)."""
    mode = study.get("cache", "auto")
    if mode != "auto":
        return mode
    size = estimated_image_bytes(study, task)
    return "disk" if size is not None and size > MEMORY_CACHE_BYTES else "memory"


def schema_markdown() -> str:
    """Every key of the study schema as Markdown tables (key, allowed, default, meaning).

    docs/config.md embeds this output; tests check it is up to date.
    """
    root = _schema_cached()
    sections: list[tuple[str, list[tuple[str, dict]]]] = []
    shared_sections: list[tuple[str, list[tuple[str, dict]]]] = []  # after the tasks
    shared: dict[str, str] = {}  # $ref target -> key prefix documented once

    def walk(prefix: str, schema: Mapping, rows: list[tuple[str, dict]]) -> None:
        for name, sub in schema.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            ref = sub.get("$ref")
            full = _resolve(sub, root)
            rows.append((key, full))
            if full.get("type") == "object" and "properties" in full:
                if ref is not None:
                    generic = re.sub(r"^tasks\.[a-z]+\.", "tasks.<task>.", key)
                    if ref not in shared:
                        shared[ref] = generic
                        sub_rows: list[tuple[str, dict]] = []
                        walk(generic, full, sub_rows)
                        shared_sections.append((f"`{generic}` (every task)", sub_rows))
                elif prefix == "tasks":
                    task_rows: list[tuple[str, dict]] = []
                    walk(key, full, task_rows)
                    sections.append((f"`{key}`", task_rows))
                else:
                    walk(key, full, rows)

    top: list[tuple[str, dict]] = []
    walk("", root, top)
    sections = [("Top level", top), *sections, *shared_sections]

    def default_of(key: str, sch: Mapping) -> str:
        if key == "study":
            return "required"
        if re.fullmatch(r"tasks\.[a-z]+", key):
            return "absent (not run)"
        return f"`{json.dumps(sch['default'])}`" if "default" in sch else ""

    out = []
    for title, rows in sections:
        out += [f"### {title}", "", "| key | allowed | default | meaning |", "|---|---|---|---|"]
        for key, sch in rows:
            desc = " ".join(str(sch.get("description", "")).split()).replace("|", "\\|")
            allowed = describe_allowed(sch, root).replace("|", "\\|")
            out.append(f"| `{key}` | {allowed} | {default_of(key, sch)} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
