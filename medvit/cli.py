"""The ``medvit`` command: one subcommand per pipeline stage.

No logic lives here beyond argument handling: each subcommand calls one stage function.
medvit's modules are imported inside the handlers, not at the top (but for the torch-free
:mod:`medvit.cpu_ops.process`, whose fast exit ends every command): every job of a study
starts this command, and each imports only the stage it runs (torch, MONAI, timm and
ultralytics take seconds; `medvit --help` and `medvit config` import none of them).
User errors (:class:`medvit.errors.MedvitError`) are printed as ``error: ...`` with exit
code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from medvit.cpu_ops.process import fast_exit  # torch-free: the command's start-up stays light


def _cmd_manifest_validate(args: argparse.Namespace) -> int:
    from medvit.data.manifest import format_report, validate_manifest

    report = validate_manifest(args.path, check_files=not args.no_check_files)
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_manifest_add_labels(args: argparse.Namespace) -> int:
    from medvit.data.labels import add_labels

    print(add_labels(args.path, args.labels, args.out, on=args.on, key=args.key))
    return 0


def _cmd_manifest_pseudonymize(args: argparse.Namespace) -> int:
    from medvit.data.ingest import pseudonymize_manifest

    print(pseudonymize_manifest(args.path, args.out, key=args.key))
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from medvit.data.ingest import ingest

    result = ingest(args.dir, args.out, key=args.key, workers=args.workers)
    print(result.summary())
    return 0 if result.n_samples > 0 else 1


def _cmd_synth(args: argparse.Namespace) -> int:
    from medvit.data.synth import synthesize

    manifest = synthesize(args.modality, n_patients=args.patients, out_dir=args.out, seed=args.seed,
                          image_size=args.image_size)
    print(f"wrote {manifest}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from medvit.data.realdata import import_dataset
    from medvit.errors import MedvitError

    if args.source is not None and args.source_from is not None and args.source != args.source_from:
        raise MedvitError(f"two sources given: {args.source} and --from {args.source_from}")
    manifest = import_dataset(args.dataset, args.source or args.source_from, args.out)
    print(f"wrote {manifest}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from medvit.config import load_study

    study = load_study(args.path)
    print(yaml.safe_dump(study, sort_keys=False), end="")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from medvit.tasks.infer import infer_stage

    print(infer_stage(args.model, args.input, args.out, key=args.key, batch_size=args.batch_size,
                      device=args.device, any_modality=args.any_modality).summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medvit.tasks.export import export_model

    record = export_model(args.model, args.format, args.out, tolerance=args.tolerance)
    print(f"wrote {record['path']}: max abs difference to PyTorch {record['max_abs_diff']:.3g} "
          f"(logits, batches of {' and '.join(str(b) for b in record['batches'])})")
    return 0


class Stage(NamedTuple):
    """A stage command: the stage function it calls and the parsed arguments it passes."""

    function: str
    """``module:function``, imported when the command runs (see :func:`run_stage`)."""
    args: tuple[str, ...]
    """Argument names (``argparse`` destinations), passed positionally in this order."""
    prints: bool = True
    """Print ``wrote <path>`` for each path the function returns."""


# Every stage command -> its stage function (workflows/README.md lists the rules that run them).
STAGES: dict[str, Stage] = {
    "split": Stage("medvit.tasks.common:split_stage", ("config", "task", "out"), prints=False),
    "fold-split": Stage("medvit.tasks.common:fold_split_stage", ("split", "fold", "out")),
    "preprocess": Stage("medvit.tasks.preprocess:preprocess_stage", ("config", "task", "split", "out", "workers")),
    "pretrain": Stage("medvit.tasks.pretrain:pretrain_stage", ("config", "task", "split", "out")),
    "train": Stage("medvit.tasks.stages:train_stage", ("config", "task", "model", "split", "out", "seed"),
                   prints=False),
    "predict": Stage("medvit.tasks.stages:predict_stage", ("config", "task", "model", "split", "weights", "out"),
                     prints=False),
    "evaluate": Stage("medvit.tasks.evaluate:evaluate_stage", ("config", "task", "model", "predictions", "out"),
                      prints=False),
    "compare": Stage("medvit.tasks.compare:compare_stage", ("config", "task", "out")),
    "detect": Stage("medvit.tasks.detection:detect_stage", ("config", "task", "split", "out")),
    "ptp": Stage("medvit.evaluation.ptp:ptp_stage", ("config", "task", "predictions", "out", "section")),
    "distill": Stage("medvit.tasks.distill:distill_stage",
                     ("config", "task", "role", "split", "out", "teacher", "reuse")),
    "distill-compare": Stage("medvit.tasks.distill:distill_compare_stage", ("config", "task", "distill_dir", "out")),
    "cascade": Stage("medvit.tasks.cascade:cascade_stage",
                     ("config", "task", "split", "detector", "classifier", "out")),
    "ssl-pretrain": Stage("medvit.tasks.ssl:ssl_pretrain_stage", ("config", "task", "split", "fold", "out")),
    "cv-fold": Stage("medvit.tasks.segmentation:cv_fold_stage",
                     ("config", "task", "model", "split", "fold", "out", "init")),
    "cv-pool": Stage("medvit.tasks.segmentation:cv_pool_stage", ("config", "task", "model", "split", "folds", "out")),
    "external-test": Stage("medvit.tasks.segmentation:external_test_stage",
                           ("config", "task", "model", "split", "weights", "out")),
    "cv-summary": Stage("medvit.tasks.segmentation:cv_summary_stage", ("config", "task", "split", "out")),
    "adapt": Stage("medvit.tasks.adapt:adapt_stage", ("config", "task", "method", "split", "out", "fraction")),
    "adapt-compare": Stage("medvit.tasks.adapt:adapt_compare_stage", ("config", "task", "adapt_dir", "out")),
    "package": Stage("medvit.tasks.package:package_stage", ("config", "task", "model_dir")),
    "report": Stage("medvit.tasks.report:report_stage", ("config", "metrics", "out"), prints=False),
}


def stage_function(command: str) -> Callable[..., Any]:
    """The stage function of a stage command, imported now: a command imports only the stage
    it runs (each job of a study starts a process; `medvit --help` imports no stage)."""
    module, _, name = STAGES[command].function.partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(args: argparse.Namespace) -> int:
    """Run the stage of ``args.command`` with its arguments from :data:`STAGES`."""
    spec = STAGES[args.command]
    result = stage_function(args.command)(*(getattr(args, a) for a in spec.args))
    if spec.prints:
        for path in result if isinstance(result, list) else [result]:
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import medvit
    from medvit.config import SOURCES, TASKS, adapt_methods
    from medvit.data.synth import MODALITIES

    parser = argparse.ArgumentParser(prog="medvit",
                                     description="medvit: medical image analysis with vision transformers, one stage "
                                                 "per subcommand.")
    # where the code runs from, as pip does: which checkout a venv's `medvit` command runs
    parser.add_argument("--version", action="version",
                        version=f"medvit {medvit.__version__} from {Path(medvit.__file__).resolve().parent}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    manifest = sub.add_parser("manifest", help="manifest tools")
    msub = manifest.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    validate = msub.add_parser("validate", help="check a manifest and summarise it")
    validate.add_argument("path", type=Path, help="the manifest CSV to check")
    validate.add_argument("--no-check-files", action="store_true",
                          help="check columns and values only, do not open the image files")
    validate.set_defaults(func=_cmd_manifest_validate)
    pseudo = msub.add_parser("pseudonymize", help="copy a manifest with patient_id, study_id and sample_id replaced "
                                                   "by keyed pseudonyms")
    pseudo.add_argument("path", type=Path, help="the manifest CSV whose ids to replace")
    pseudo.add_argument("--out", type=Path, required=True, help="the pseudonymised manifest CSV to write")
    pseudo.add_argument("--key", default=None,
                        help="pseudonymisation key (default: $MEDVIT_PSEUDONYM_KEY); never written to outputs")
    pseudo.set_defaults(func=_cmd_manifest_pseudonymize)
    add_labels = msub.add_parser("add-labels", help="join a labels CSV onto an ingested manifest by pseudonymous "
                                 "patient or study id",
                                 description="Add the columns of a labels CSV (label, labels, split, ...) to an "
                                             "ingested manifest, joined by patient_id or study_id. The labels may "
                                             "hold the manifest's pseudonyms, or the original DICOM PatientID / "
                                             "StudyInstanceUID with the key ingest used.")
    add_labels.add_argument("path", type=Path, help="the ingested manifest CSV")
    add_labels.add_argument("--labels", type=Path, required=True,
                            help="CSV with patient_id or study_id and the columns to add")
    add_labels.add_argument("--out", type=Path, required=True, help="the labelled manifest CSV to write")
    add_labels.add_argument("--on", choices=["patient_id", "study_id"], default=None,
                            help="the id to join on (default: study_id when both files have it, else patient_id)")
    add_labels.add_argument("--key", default=None,
                            help="the ingest key, for labels keyed by original ids (default $MEDVIT_PSEUDONYM_KEY)")
    add_labels.set_defaults(func=_cmd_manifest_add_labels)

    ingest = sub.add_parser("ingest", help="build a pseudonymised manifest from a folder of DICOM/NIfTI files")
    ingest.add_argument("dir", type=Path,
                        help="folder of DICOM files/series, NIfTI and other images (walked recursively)")
    ingest.add_argument("--out", type=Path, required=True, help="manifest CSV to write (quarantine.csv goes beside it)")
    ingest.add_argument("--key", default=None,
                        help="pseudonymisation key (default: $MEDVIT_PSEUDONYM_KEY); never written to outputs")
    ingest.add_argument("--workers", default="auto",
                        help="processes reading headers and images: auto (one per core, at most 8, from 500 files "
                             "on) or a number; the outputs do not depend on it")
    ingest.set_defaults(func=_cmd_ingest)

    synth = sub.add_parser("synth", help="generate a synthetic study with real files and a manifest")
    synth.add_argument("modality", choices=MODALITIES,
                       help="which study to synthesise (docs/synthetic.md)")
    synth.add_argument("--patients", type=int, required=True, help="number of synthetic patients")
    synth.add_argument("--out", type=Path, required=True, help="folder for the images and manifest.csv")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same files")
    synth.add_argument("--image-size", type=int, default=None,
                       help="side length in pixels (modality default if omitted)")
    synth.set_defaults(func=_cmd_synth)

    imp = sub.add_parser("import", help="turn a shipped real dataset into files and a manifest")
    imp.add_argument("dataset", choices=list(SOURCES),
                     help="the dataset to import (data_manifests/README.md)")
    imp.add_argument("source", type=Path, nargs="?", default=None,
                     help="the dataset file (default: the copy the repository ships, e.g. "
                          "data_manifests/pneumoniamnist/pneumoniamnist.npz; lgg: ../shared/data/lgg_brain_mri_128.npz "
                          "beside "
                          "the repository, which is never copied into it)")
    imp.add_argument("--from", dest="source_from", type=Path, default=None, metavar="PATH",
                     help="the dataset file (same as SOURCE)")
    imp.add_argument("--out", type=Path, required=True, help="folder for the images and manifest.csv")
    imp.set_defaults(func=_cmd_import)

    config = sub.add_parser("config", help="validate a study config and print it with defaults filled")
    config.add_argument("path", type=Path, help="the study config YAML")
    config.set_defaults(func=_cmd_config)

    infer = sub.add_parser("infer", help="apply a trained model to new images (no labels, split or study config)",
                           description="Score a folder of images (DICOM, NIfTI, PNG/JPEG/TIFF, .npy) or a manifest "
                                       "with a trained model folder; see docs/inference.md.")
    infer.add_argument("--model", type=Path, required=True,
                       help="a trained model's folder (model.safetensors + model.json), "
                            "e.g. results/demo/xray/resnet18")
    infer.add_argument("--input", type=Path, required=True,
                       help="a folder of images (read through the identifier-free ingest path) or a manifest CSV")
    infer.add_argument("--out", type=Path, required=True,
                       help="output folder: predictions.csv, quarantine.csv, infer.json")
    infer.add_argument("--key", default=None,
                       help="pseudonymisation key for folder input (default: $MEDVIT_PSEUDONYM_KEY, else a random "
                            "key for this run); never written to outputs")
    infer.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    infer.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:<index>")
    infer.add_argument("--any-modality", action="store_true",
                       help="score DICOM inputs of any modality (default: quarantine those the model's task did "
                            "not learn from, e.g. CT given to an X-ray model)")
    infer.set_defaults(func=_cmd_infer)

    export = sub.add_parser("export", help="export a trained model to ONNX or TorchScript, checked against PyTorch")
    export.add_argument("--model", type=Path, required=True, help="a trained model's folder (a complete package)")
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="the file format to write")
    export.add_argument("--out", type=Path, default=None,
                        help="the file to write (default: model.onnx or model.pt in the model folder)")
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max abs difference of the logits to PyTorch (default 1e-4)")
    export.set_defaults(func=_cmd_export)

    package = sub.add_parser("package", help="complete an evaluated model folder's package (model.json inference "
                                             "block, MODEL_CARD.md) from its study")
    package.add_argument("--config", type=Path, required=True, help="the study config YAML the model was trained by")
    package.add_argument("--task", required=True, choices=TASKS,
                         help="the model's task")
    package.add_argument("--model-dir", type=Path, required=True,
                         help="the model folder (model.safetensors, model.json, metrics.json)")
    package.set_defaults(func=run_stage)

    def stage(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, required=True, help="study config YAML")
        p.add_argument("--task", required=True, choices=TASKS,
                       help="the study task to run it for")
        p.set_defaults(func=run_stage)
        return p

    split = stage("split", "patient-level split of a task's manifest")
    split.add_argument("--out", type=Path, required=True, help="split manifest CSV to write")

    preprocess = stage("preprocess", "build a task's disk cache of preprocessed samples (study key `cache`)")
    preprocess.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    preprocess.add_argument("--out", type=Path, default=None,
                            help="cache folder (default <results_dir>/<study>/<task>/cache/<grid>)")
    preprocess.add_argument("--workers", type=int, default=None, help="decoding threads (default: cores, up to 8)")

    fsplit = sub.add_parser("fold-split", help="the train/val/test split of one cross-validation fold")
    fsplit.add_argument("--split", type=Path, required=True, help="split manifest with a `fold` column")
    fsplit.add_argument("--fold", type=int, required=True, help="0-based fold: its patients form the test split")
    fsplit.add_argument("--out", type=Path, required=True, help="split manifest CSV of the fold to write")
    fsplit.set_defaults(func=run_stage)

    train = stage("train", "train one model of a task")
    train.add_argument("--model", required=True, help="registered model name from the task's `models`")
    train.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    train.add_argument("--out", type=Path, required=True, help="model folder (checkpoints, weights, log)")
    train.add_argument("--seed", type=int, default=None,
                       help="training seed replacing the study's (repeated runs for mean ± sd; classification tasks)")

    pretrain = stage("pretrain", "MAE pretraining of a task's ViT encoder on its training split")
    pretrain.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    pretrain.add_argument("--out", type=Path, required=True,
                          help="folder for encoder.safetensors, reconstructions.png, train.log, checkpoints/")

    predict = stage("predict", "predict the validation and test splits")
    predict.add_argument("--model", required=True, help="the model name it was trained as")
    predict.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    predict.add_argument("--weights", type=Path, required=True, help="model.safetensors from `medvit train`")
    predict.add_argument("--out", type=Path, required=True, help="predictions.csv to write")

    compare = stage("compare", "compare a task's models: accuracy (mean ± sd over seeds) against params, FLOPs "
                               "and CPU latency")
    compare.add_argument("--out", type=Path, required=True,
                         help="folder for comparison.json and accuracy_vs_flops.png")

    evaluate = stage("evaluate", "patient- and sample-level metrics with bootstrap CIs")
    evaluate.add_argument("--model", required=True, help="the model name recorded in metrics.json")
    evaluate.add_argument("--predictions", type=Path, required=True, help="predictions.csv from `medvit predict`")
    evaluate.add_argument("--out", type=Path, required=True, help="metrics.json to write")

    detect = stage("detect", "train, validate and run the YOLOv8 detector (offline) on a task's split")
    detect.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    detect.add_argument("--out", type=Path, required=True, help="detector folder (weights, predictions.csv, mAP)")

    ptp = stage("ptp", "patient-to-patient evaluation of slice detections (docs/brain.md)")
    ptp.add_argument("--predictions", type=Path, required=True, help="slice predictions.csv of the detector or cascade")
    ptp.add_argument("--section", choices=["detection", "cascade"], default="detection",
                     help="config block whose threshold flags a slice (detection.conf or cascade.threshold)")
    ptp.add_argument("--out", type=Path, required=True, help="ptp.json to write")

    distill = stage("distill", "train, predict and evaluate the CNN teacher or a DeiT student")
    distill.add_argument("role", choices=["teacher", "student", "student_distilled"],
                         help="the CNN teacher, the plain DeiT student, or the student distilled from the teacher")
    distill.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    distill.add_argument("--teacher", type=Path, default=None,
                         help="the teacher's model.safetensors (required for student_distilled)")
    distill.add_argument("--reuse", type=Path, default=None,
                         help="teacher only: model.safetensors of the same model already trained by `medvit train`")
    distill.add_argument("--out", type=Path, required=True, help="the role's folder")

    dcompare = stage("distill-compare", "teacher vs distilled vs plain student: metrics, params, CPU latency")
    dcompare.add_argument("--distill-dir", type=Path, required=True, help="folder holding the three role folders")
    dcompare.add_argument("--out", type=Path, required=True, help="comparison.json to write")

    cascade = stage("cascade", "detection then classification of the flagged slices, evaluated per patient")
    cascade.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    cascade.add_argument("--detector", type=Path, required=True,
                         help="the detector folder (predictions.csv, boxes.csv)")
    cascade.add_argument("--classifier", type=Path, required=True, help="the classifier's model.safetensors")
    cascade.add_argument("--out", type=Path, required=True, help="cascade folder")

    # prostate: self-supervised pretraining and patient-level cross-validation (docs/prostate.md)
    ssl = stage("ssl-pretrain", "multi-task self-supervised pretraining of the CSwin encoder on one fold")
    ssl.add_argument("--split", type=Path, required=True, help="split manifest with a `fold` column")
    ssl.add_argument("--fold", type=int, required=True, help="0-based cross-validation fold")
    ssl.add_argument("--out", type=Path, required=True, help="folder for encoder.safetensors, inpainting.png")
    cv_fold = stage("cv-fold", "train one segmentation model on one fold and predict its held-out volumes")
    cv_fold.add_argument("--model", required=True, help="segmentation model name from the task's `models`")
    cv_fold.add_argument("--split", type=Path, required=True, help="split manifest with a `fold` column")
    cv_fold.add_argument("--fold", type=int, required=True, help="0-based cross-validation fold")
    cv_fold.add_argument("--init", type=Path, default=None, help="SSL encoder.safetensors (cswin_unet_ssl)")
    cv_fold.add_argument("--out", type=Path, required=True, help="the fold folder")
    cv_pool = stage("cv-pool", "pool a model's folds: out-of-fold predictions.csv and the fold ensemble")
    cv_pool.add_argument("--model", required=True, help="segmentation model name")
    cv_pool.add_argument("--split", type=Path, required=True, help="split manifest with a `fold` column")
    cv_pool.add_argument("--folds", type=Path, nargs="+", required=True, help="the fold folders, in fold order")
    cv_pool.add_argument("--out", type=Path, required=True, help="the model folder")
    external = stage("external-test", "evaluate a trained model on the external cohort")
    external.add_argument("--model", required=True, help="segmentation model name")
    external.add_argument("--split", type=Path, required=True, help="the task's split manifest")
    external.add_argument("--weights", type=Path, required=True, help="the model's model.safetensors")
    external.add_argument("--out", type=Path, required=True, help="folder for predictions.csv, metrics.json, maps/")
    cv_summary = stage("cv-summary", "fold table, FLOPs, inference time and overlays of every model")
    cv_summary.add_argument("--split", type=Path, required=True, help="split manifest with a `fold` column")
    cv_summary.add_argument("--out", type=Path, required=True, help="cv_summary.json (overlays.png beside it)")

    # DVPT and the other ways to adapt a frozen ViT (docs/dvpt.md)
    adapt = stage("adapt", "adapt the frozen backbone with one method (linear, vpt, dvpt, full) at each "
                           "fraction of the training patients: adapter, predictions, metrics")
    adapt.add_argument("--method", required=True, choices=adapt_methods(),
                       help="how the frozen backbone is adapted (docs/dvpt.md)")
    adapt.add_argument("--split", type=Path, required=True, help="split manifest from `medvit split`")
    adapt.add_argument("--fraction", type=float, nargs="+", default=None,
                       help="fractions of the training patients (default: the study's adapt.fractions)")
    adapt.add_argument("--out", type=Path, required=True, help="the task's adapt folder (<method>_p<percent>/ inside)")
    acompare = stage("adapt-compare", "every adaptation run side by side: comparison.json, label_efficiency.png")
    acompare.add_argument("--adapt-dir", type=Path, required=True, help="the task's adapt folder")
    acompare.add_argument("--out", type=Path, required=True, help="comparison.json to write")

    report = sub.add_parser("report", help="write the HTML evaluation report")
    report.add_argument("--config", type=Path, required=True, help="the study config YAML")
    report.add_argument("--out", type=Path, required=True, help="index.html to write (figures beside it)")
    report.add_argument("metrics", type=Path, nargs="+", help="metrics.json files")
    report.set_defaults(func=run_stage)
    _group_commands(parser, sub)
    return parser


# What a user types; the other subcommands are the pipeline's stages, run by the workflow's rules.
USER_COMMANDS = ("ingest", "synth", "import", "config", "manifest", "infer", "export", "package", "report")
_EXAMPLES = """examples:
  medvit synth xray --patients 40 --out data/synth_xray        # a synthetic study to try things on
  medvit config my_study.yaml                                   # the config with defaults, or its errors
  snakemake --cores 4 --configfile my_study.yaml                # run the study (profiles/default applies)
  medvit infer --model results/demo/xray/densenet121 --input new_patients/ --out scored/
  medvit export --model results/demo/xray/densenet121 --format onnx
  MEDVIT_PSEUDONYM_KEY=... medvit ingest dicom_export/ --out data/my_cxr.csv

`medvit COMMAND -h` describes a command and its arguments; docs/ has the details."""


def _group_commands(parser: argparse.ArgumentParser, sub) -> None:
    """``medvit --help``: user commands apart from the internal stage commands, then examples."""
    helps = {a.dest: a.help for a in sub._choices_actions}

    def block(names) -> str:
        return "\n".join(f"  {n:<16}{helps[n]}" for n in names)

    stages = [n for n in helps if n not in USER_COMMANDS]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "medvit [-h] [--version] COMMAND ..."
    parser.epilog = ("user commands:\n" + block([n for n in USER_COMMANDS if n in helps])
                     + "\n\nstage commands (run by the workflow's rules, workflows/README.md):\n" + block(stages)
                     + "\n\n" + _EXAMPLES)
    sub.help = argparse.SUPPRESS


# Commands that train into one output folder: it is locked while they run (medvit.fileio.folder_lock).
_LOCKED_COMMANDS = {"train", "pretrain", "distill", "ssl-pretrain", "cv-fold", "detect"}


# Stage commands that serve only the tasks whose schema has a given block (the rest refuse in one line).
_TASK_BLOCKS = {"pretrain": "pretrain", "adapt": "adapt", "adapt-compare": "adapt", "detect": "detection",
                "ptp": "detection", "cascade": "cascade", "distill": "distill", "distill-compare": "distill",
                "ssl-pretrain": "ssl", "cv-fold": "roi_size", "cv-pool": "roi_size", "external-test": "roi_size",
                "cv-summary": "roi_size"}
# Commands that run a network: on a multi-GPU machine each claims its own GPU (medvit.engine.gpu_slots).
_GPU_COMMANDS = {"train", "predict", "pretrain", "distill", "cascade", "detect", "ssl-pretrain", "cv-fold",
                 "cv-pool", "external-test", "adapt", "infer"}


def served_tasks(command: str) -> list[str] | None:
    """The tasks a stage command serves (None: every task)."""
    from medvit.config import load_schema

    block = _TASK_BLOCKS.get(command)
    if block is None:
        return None
    tasks = load_schema()["properties"]["tasks"]["properties"]
    return [t for t, schema in tasks.items() if block in schema.get("properties", {})]


def _check_task_served(args: argparse.Namespace) -> None:
    from medvit.errors import ConfigError

    served = served_tasks(args.command) if getattr(args, "task", None) else None
    if served is not None and args.task not in served:
        raise ConfigError(f"`medvit {args.command}` serves task {' and '.join(served)}, not {args.task!r}")


def _study_device(args: argparse.Namespace) -> str:
    if getattr(args, "device", None):
        return str(args.device)
    config = getattr(args, "config", None)
    if config is None or not Path(config).is_file():
        return "auto"
    import yaml

    try:
        study = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return "auto"
    return str(study.get("device", "auto")) if isinstance(study, dict) else "auto"


def main(argv: list[str] | None = None) -> int:
    from medvit.errors import MedvitError

    args = build_parser().parse_args(argv)
    try:
        _check_task_served(args)
        if args.command in _GPU_COMMANDS and _study_device(args) != "cpu":
            from medvit.engine.gpu_slots import assign_gpu

            assign_gpu()
        if args.command in _LOCKED_COMMANDS:
            # held to the end of the process: the weights written after training are covered too
            from medvit.fileio import folder_lock

            with folder_lock(args.out):
                return args.func(args)
        return args.func(args)
    except MedvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a write outside medvit.fileio (a library writing its own file): same report as DiskFullError
        from medvit.errors import DiskFullError
        from medvit.fileio import _free_bytes

        path = Path(exc.filename or ".")
        print(f"error: {DiskFullError(path, _free_bytes(path.parent if exc.filename else path), exc.errno)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head`, which closed early: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def console_main() -> None:
    """The ``medvit`` command: :func:`main`, then :func:`medvit.cpu_ops.process.fast_exit`.

    Once torch (and MONAI, timm, ultralytics) are imported, the interpreter's own teardown
    costs every one of a study's jobs seconds; every output is written and closed by the time
    :func:`main` returns, so the process leaves without it (a process-level speed setting,
    kept with the others in :mod:`medvit.cpu_ops.process`).
    """
    fast_exit(int(main() or 0))


if __name__ == "__main__":  # pragma: no cover
    console_main()
