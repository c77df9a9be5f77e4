"""Grad-CAM saliency for the report: map shapes and determinism, the same fixed test
patients for every model of a task, CNN and ViT target layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medvit.engine import save_weights
from medvit.evaluation.report_sections import TaskResults
from medvit.evaluation.saliency import choose_patients, gradcam_maps, saliency_figure
from medvit.models import create_model
from medvit.tasks.package import classifier_package
from medvit.tasks.saliency import task_saliency

SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_patients_are_fixed_balanced_and_independent_of_row_order():
    split = pd.DataFrame({"patient_id": [f"p{i}" for i in range(12) for _ in range(2)],
                          "sample_id": [f"p{i}-{k}" for i in range(12) for k in range(2)],
                          "split": ["test"] * 20 + ["val"] * 4})
    truth = {f"p{i}": int(i % 3 == 0) for i in range(12)}
    a = choose_patients(split, truth, 4, seed=7)
    b = choose_patients(split.iloc[::-1].reset_index(drop=True), truth, 4, seed=7)
    assert list(a["patient_id"]) == list(b["patient_id"]) and len(a) == 4
    assert a["patient_id"].str[1:].astype(int).max() < 10  # test patients only
    assert [truth[p] for p in a["patient_id"]] == [1, 0, 1, 0]
    assert all(s.endswith("-0") for s in a["sample_id"])  # each patient's first sample


# at 32 px ResNet's layer3 is 2x2 and layer4 1x1: the last map of at least 4x4 is layer2
@pytest.mark.parametrize("name,kwargs,layer", [("resnet10t", {}, "layer2"),
                                                ("vit_tiny", {"img_size": SIZE, "patch_size": 8}, "last block")])
def test_gradcam_maps_shape_range_and_determinism(name, kwargs, layer):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, num_classes=2, **kwargs)
    x = np.random.default_rng(0).random((3, 1, SIZE, SIZE)).astype(np.float32)
    maps, logits, used = gradcam_maps(model, x, class_index=[0, 1, 0])
    again, _, _ = gradcam_maps(model, x, class_index=[0, 1, 0])
    assert maps.shape == (3, SIZE, SIZE) and logits.shape == (3, 2) and used == layer
    assert maps.min() >= 0 and maps.max() <= 1 and np.array_equal(maps, again)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(torch.as_tensor(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_task_saliency_uses_the_same_patients_for_every_model(tmp_path):
    rng = np.random.default_rng(0)
    task_dir = tmp_path / "brain"
    (task_dir / "images").mkdir(parents=True)
    rows = []
    for p in range(10):
        for k in range(2):
            arr = (rng.random((SIZE, SIZE)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(task_dir / "images" / f"p{p}_{k}.png")
            rows.append({"patient_id": f"p{p}", "sample_id": f"p{p}-{k}", "image": f"images/p{p}_{k}.png",
                         "label": "tumor" if p % 2 else "normal", "split": "test" if p >= 4 else "train"})
    pd.DataFrame(rows).to_csv(task_dir / "split.csv", index=False)
    metrics = {"threshold": {"method": "youden", "selected_on": "val", "patient": {"tumor": 0.5},
                             "sample": {"tumor": 0.5}}, "aggregate": {"method": "max", "top_k": None}}
    spec = {"kind": "binary", "classes": ["tumor"], "column": "label", "all_classes": ["normal", "tumor"]}
    tr = TaskResults("brain", [], split_csv=task_dir / "split.csv")
    for name, extra in (("resnet10t", {}), ("vit_tiny", {"patch_size": 8})):
        torch.manual_seed(1)
        model = create_model(name, in_chans=1, num_classes=1, **({"img_size": SIZE, **extra} if extra else {}))
        meta = {"task": "brain", "model": name, "spec": spec, "in_chans": 1, "image_size": SIZE, **extra}
        folder = task_dir / name
        save_weights(folder / "model.safetensors", model, meta)
        card = __import__("json").loads((folder / "model.json").read_text())
        card["inference"] = classifier_package(card, metrics, name)
        (folder / "model.json").write_text(__import__("json").dumps(card))
        tr.dirs[name] = folder
    tr.tables = {"resnet10t": pd.DataFrame({"patient_id": [f"p{p}" for p in range(4, 10)],
                                            "true_tumor": [p % 2 for p in range(4, 10)]})}
    first = task_saliency(tr, seed=3)
    second = task_saliency(tr, seed=3)
    assert set(first["models"]) == {"resnet10t", "vit_tiny"}
    assert len(first["samples"]) == 4 and set(first["samples"]["split"]) == {"test"}
    for name, m in first["models"].items():
        assert m["maps"].shape == (4, SIZE, SIZE) and m["images"].shape == (4, 1, SIZE, SIZE)
        np.testing.assert_array_equal(m["maps"], second["models"][name]["maps"])
        np.testing.assert_array_equal(m["images"], first["images"])  # same inputs for every model
    png = saliency_figure(first, tmp_path / "saliency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
