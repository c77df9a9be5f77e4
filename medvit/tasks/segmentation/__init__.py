"""3D lesion segmentation stages (prostate bpMRI, the CSwin-UNet paper): a multi-channel
volume in, a lesion probability map out, a patient-level csPCa score from the map (its
maximum), compared across models in patient-level k-fold cross-validation.

Stages (each one ``medvit`` subcommand; workflows/rules/prostate.smk runs them):

* :func:`cv_fold_stage` (``medvit cv-fold``): train one model on one fold and predict the
  fold's validation and test volumes (``fold<i>/{model.safetensors, predictions.csv,
  split.csv, maps/}``); ``cswin_unet_ssl`` starts from that fold's SSL encoder
  (:mod:`medvit.tasks.ssl`).
* :func:`cv_pool_stage` (``medvit cv-pool``): the model-level ``predictions.csv`` pooling the
  out-of-fold test predictions (with a ``fold`` column; evaluated by the generic
  ``evaluate`` rule) and ``model.safetensors``: the k fold models as one ensemble (mean
  probability), used for the external test.
* :func:`external_test_stage` (``medvit external-test``): the ensemble on a second manifest.
* :func:`cv_summary_stage` (``medvit cv-summary``): the fold table (mean +- sd over folds),
  parameters, FLOPs, inference time, external results, slice overlays.

Folds (:func:`fold_split`): ``folds: 1`` keeps the split of ``split.csv``; ``folds: k >= 2``
assigns every labelled patient to one of k test folds (:func:`medvit.data.splits.patient_kfold`,
stratified by csPCa), and for fold i holds out ``split.val_fraction`` of the other
patients for model selection. ``unlabeled`` rows are only ever read by SSL pretraining.

Predicted maps are written as NIfTI on the input's grid with the input's affine, and as
DICOM SEG when the input was a DICOM series (:mod:`medvit.data.export`).

Modules: :mod:`.stages` (the stage functions above, and ``train``/``predict`` on the split as
given), :mod:`.folds` (:func:`fold_split`, the fold's context), :mod:`.data` (the volume
datasets), :mod:`.models` (networks, the fold ensemble, loading), :mod:`.training` (the
trainer, loss and validation metric of one fold), :mod:`.inference` (sliding-window
prediction, the maps) and :mod:`.summary` (``medvit cv-summary``). The overlays figure is
report content: :func:`medvit.evaluation.prostate_report.save_overlays`.
"""

from medvit.tasks.segmentation.data import volume_dataset
from medvit.tasks.segmentation.folds import fold_context, fold_split, ssl_encoder_path
from medvit.tasks.segmentation.inference import patient_score, predict_rows, write_maps
from medvit.tasks.segmentation.models import FoldEnsemble, build_model, model_kwargs
from medvit.tasks.segmentation.stages import cv_fold_stage, cv_pool_stage, external_test_stage, predict, train
from medvit.tasks.segmentation.summary import cv_summary_stage, fold_metrics
from medvit.tasks.segmentation.training import SegmentationTrainer, fit_fold, validation_metric

__all__ = [
    "FoldEnsemble",
    "SegmentationTrainer",
    "build_model",
    "cv_fold_stage",
    "cv_pool_stage",
    "cv_summary_stage",
    "external_test_stage",
    "fit_fold",
    "fold_context",
    "fold_metrics",
    "fold_split",
    "model_kwargs",
    "patient_score",
    "predict",
    "predict_rows",
    "ssl_encoder_path",
    "train",
    "validation_metric",
    "volume_dataset",
    "write_maps",
]
