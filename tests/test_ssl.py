"""Multi-task SSL pretraining of the CSwin encoder: the pretext tasks, switching them, the
encoder it hands to fine-tuning, and the rows it may read (never validation/test patients)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from medvit.data.manifest import Manifest
from medvit.errors import ConfigError, LeakageError
from medvit.models import create_model
from medvit.models.cswin import CSwinEncoder
from medvit.tasks.common import StageContext, TaskSpec
from medvit.tasks.segmentation import fold_split
from medvit.tasks.ssl import MultiTaskSSL, cube_mask, nt_xent, rotate_inplane, ssl_rows

TINY = {"embed_dim": 4, "depths": [1, 1], "num_heads": [2, 2], "split_size": [2, 8]}


def _ssl(**weights) -> MultiTaskSSL:
    torch.manual_seed(0)
    return MultiTaskSSL(CSwinEncoder(in_chans=3, **TINY), 3, weights, mask_ratio=0.3, mask_size=2)


def test_each_task_is_switchable():
    x = torch.rand(2, 3, 8, 8, 8)
    out = _ssl(inpaint=1.0, rotation=1.0, contrastive=1.0)(x)
    assert set(out.parts) == {"inpaint", "rotation", "contrastive"}
    torch.testing.assert_close(out.loss, sum(out.parts.values()))
    assert out.reconstruction.shape == (4, 3, 8, 8, 8)  # both views
    only_rot = _ssl(inpaint=0.0, rotation=2.0, contrastive=0.0)
    assert not hasattr(only_rot, "decoder") and not hasattr(only_rot, "projector")
    out = only_rot(x)
    assert set(out.parts) == {"rotation"}
    torch.testing.assert_close(out.loss, 2.0 * out.parts["rotation"])
    with pytest.raises(ConfigError, match="at least one"):
        _ssl(inpaint=0.0, rotation=0.0, contrastive=0.0)
    with pytest.raises(ConfigError):
        _ssl(jigsaw=1.0)


def test_pretext_pieces():
    x = torch.arange(2 * 1 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 1, 2, 2)
    r = rotate_inplane(x, torch.tensor([0, 2]))
    torch.testing.assert_close(r[0], x[0])
    torch.testing.assert_close(r[1], x[1].flip(-1).flip(-2))  # 180 degrees
    torch.manual_seed(0)
    keep = cube_mask((4, 1, 16, 16, 16), 4, 0.3, torch.device("cpu"))
    assert set(keep.unique().tolist()) <= {0.0, 1.0} and 0.5 < keep.mean() < 0.9
    # whole cubes are blanked
    cubes = keep.view(4, 1, 4, 4, 4, 4, 4, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(4, 64, 64)
    assert (cubes.min(-1).values == cubes.max(-1).values).all()
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.5) < nt_xent(z, torch.randn(8, 16), 0.5)


def test_pretraining_improves_and_the_encoder_loads_into_cswin_unet():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8, 8)
    model = _ssl(inpaint=1.0, rotation=1.0, contrastive=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)

    def loss_now() -> float:
        torch.manual_seed(1)  # the same views every time
        with torch.no_grad():
            return float(model(x).loss)

    first = loss_now()
    for _ in range(12):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < first
    unet = create_model("cswin_unet_ssl", in_chans=3, **TINY)
    unet.encoder.load_state_dict(model.encoder.state_dict(), strict=True)
    torch.testing.assert_close(unet.encoder.stem.conv.weight, model.encoder.stem.conv.weight)


def _ctx(df: pd.DataFrame) -> StageContext:
    manifest = Manifest(df=df, path=Path("split.csv"), root=Path("."), problems=[])
    return StageContext({"seed": 0}, Path("study.yaml"), "prostate", {}, manifest,
                        TaskSpec("binary", ["cspca"], "label", ["no_cspca", "cspca"]))


def _df() -> pd.DataFrame:
    rows = [{"patient_id": f"P{i}", "sample_id": f"P{i}_0", "label": "cspca" if i % 3 == 0 else "no_cspca",
             "split": ["train", "val", "test"][i % 3]} for i in range(15)]
    rows += [{"patient_id": f"U{j}", "sample_id": f"U{j}_0", "label": "", "split": "unlabeled"} for j in range(3)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("folds", [1, 3])
def test_validation_and_test_patients_never_reach_ssl(folds):
    for fold in range(folds):
        df = fold_split(_df(), folds, fold, seed=0, val_fraction=0.25)
        rows = ssl_rows(_ctx(df))
        held_out = set(df.loc[df["split"].isin(["val", "test"]), "patient_id"])
        assert held_out and not set(rows["patient_id"]) & held_out
        assert set(rows["split"]) == {"train", "unlabeled"}
        assert {"U0", "U1", "U2"} <= set(rows["patient_id"])
        assert set(rows["patient_id"]) == set(df.loc[df["split"].isin(["train", "unlabeled"]), "patient_id"])


def test_a_leaking_patient_stops_ssl():
    df = _df()
    df.loc[len(df)] = {"patient_id": "P1", "sample_id": "P1_extra", "label": "no_cspca", "split": "train"}  # P1 is val
    with pytest.raises(LeakageError):
        ssl_rows(_ctx(df))
