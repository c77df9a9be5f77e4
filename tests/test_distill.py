"""DeiT hard-label distillation: the loss on a small hand-checked example, the trainer's
heads, and the timm student's inference rule (mean of the two heads)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvit.models import create_model
from medvit.tasks.common import TaskSpec
from medvit.tasks.distill import DistillTrainer, hard_distillation_loss, role_decisions, teacher_labels


def _ce(logits: list[float], target: int) -> float:
    """Cross-entropy of one sample by hand: -log softmax(logits)[target]."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_loss_is_deits_hard_distillation_on_a_small_example():
    cls = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    dist = torch.tensor([[0.3, 0.2, 1.5], [1.0, -2.0, 0.5]])
    y = torch.tensor([0, 1])
    teacher = torch.tensor([[0.1, 0.0, 3.0], [2.0, 1.0, 0.0]])  # argmax: 2, 0 (both disagree with y)
    expected = 0.5 * (_ce([2.0, 0.5, -1.0], 0) + _ce([0.0, 1.0, 0.0], 1)) / 2 \
        + 0.5 * (_ce([0.3, 0.2, 1.5], 2) + _ce([1.0, -2.0, 0.5], 0)) / 2
    loss = hard_distillation_loss(cls, dist, y, teacher, "multiclass")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the teacher's confidence does not matter, only its decision (hard labels)
    assert hard_distillation_loss(cls, dist, y, 10 * teacher, "multiclass").item() == pytest.approx(expected, rel=1e-6)
    # without teacher the distillation head learns the true labels
    plain = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, y)
    assert hard_distillation_loss(cls, dist, y, None, "multiclass").item() == pytest.approx(plain.item())


def test_binary_loss_equals_two_class_softmax_ce():
    cls = torch.tensor([[1.2], [-0.4], [0.3]])
    dist = torch.tensor([[-0.7], [0.9], [2.0]])
    y = torch.tensor([[1.0], [0.0], [0.0]])
    teacher = torch.tensor([[-3.0], [0.5], [0.0]])  # decisions 0, 1, 0 (logit 0 -> p = 0.5 -> not tumour)
    assert teacher_labels(teacher, "binary").flatten().tolist() == [0.0, 1.0, 0.0]

    def two(z):  # one logit -> two-class logits [0, z]
        return torch.cat([torch.zeros_like(z), z], 1)

    expected = 0.5 * F.cross_entropy(two(cls), y[:, 0].long()) + 0.5 * F.cross_entropy(two(dist),
                                                                                          torch.tensor([0, 1, 0]))
    got = hard_distillation_loss(cls, dist, y, teacher, "binary")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(Exception, match="binary or multiclass"):
        hard_distillation_loss(cls, dist, y, teacher, "multilabel")


def test_student_heads_train_apart_and_average_at_inference():
    torch.manual_seed(0)
    student = create_model("deit_tiny_distilled", in_chans=1, num_classes=3, img_size=16, patch_size=8)
    student.set_distilled_training(True)
    x = torch.randn(2, 1, 16, 16)
    student.train()
    cls, dist = student(x)
    assert cls.shape == dist.shape == (2, 3) and not torch.allclose(cls, dist)
    student.eval()
    feats = student.forward_features(x)
    expected = (student.head(feats[:, 0]) + student.head_dist(feats[:, 1])) / 2
    assert torch.allclose(student(x), expected, atol=1e-5)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 16, 16, generator=g)
        self.y = (torch.arange(n) % 2).float()[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def test_distill_trainer_feeds_the_frozen_teacher(tmp_path):
    student = create_model("deit_tiny_distilled", in_chans=1, num_classes=1, img_size=16, patch_size=8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(256, 1))
    before = [p.clone() for p in teacher.parameters()]
    seen = []

    def loss_fn(outputs, batch):
        cls_logits, dist_logits, teacher_logits = outputs
        seen.append(teacher_logits is not None and teacher_logits.shape == cls_logits.shape)
        return hard_distillation_loss(cls_logits, dist_logits, batch["label"], teacher_logits, "binary")

    trainer = DistillTrainer(student, _Data(), _Data(4), {"epochs": 1, "batch_size": 4, "warmup_epochs": 0,
                                                          "device": "cpu"}, tmp_path, loss_fn=loss_fn,
                             val_metric_fn=lambda o, t: float(-((o.sigmoid() - t) ** 2).mean()), teacher=teacher,
                             progress=False)
    result = trainer.fit(resume=False)
    assert seen == [True, True] and result.best_metric is not None
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # teacher frozen
    assert not any(p.requires_grad for p in teacher.parameters())


def test_role_decisions_use_each_roles_validation_threshold():
    """A student whose probabilities sit below 0.5 decides at its own validation threshold."""
    binary = TaskSpec(kind="binary", classes=["tumor"], column="label", all_classes=["normal", "tumor"])
    rows = pd.DataFrame({"score_tumor": [0.2, 0.4, 0.6]})
    chosen = {"threshold": {"sample": {"tumor": 0.37}, "patient": {"tumor": 0.5}}}
    assert role_decisions(rows, chosen, binary)[:, 0].tolist() == [False, True, True]
    assert role_decisions(rows, {}, binary)[:, 0].tolist() == [False, False, True]  # none chosen: 0.5
    multi = TaskSpec(kind="multiclass", classes=["a", "b", "c"], column="label", all_classes=["a", "b", "c"])
    scores = pd.DataFrame({"score_a": [0.5, 0.1], "score_b": [0.3, 0.2], "score_c": [0.2, 0.7]})
    assert np.array_equal(role_decisions(scores, chosen, multi), [[True, False, False], [False, False, True]])
