"""benchmarks/quality.py reads learning curves the same way from a run's history.csv and from
a train.log written before history.csv existed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medvit.engine.trainer import HISTORY_COLUMNS

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_page", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_validation_curve_from_history_and_from_the_log_read_alike(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    header = ",".join("val_auroc" if c == "val_metric" else c for c in HISTORY_COLUMNS)
    (new / "history.csv").write_text(f"{header}\n1,0.7,0.6,0.610985,0.001,3.2\n2,0.6,0.5,0.75359,0.001,3.1\n")
    (old / "train.log").write_text("epoch 1 train_loss 0.7 val_metric 0.6110 lr 1e-3\n"
                                   "epoch 2 train_loss 0.6 val_metric 0.7536 lr 1e-3\n")
    assert quality.validation_curve(new) == quality.validation_curve(old) == ["0.6110", "0.7536"]
    assert quality.validation_curve(tmp_path) == []
