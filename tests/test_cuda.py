"""On a CUDA GPU every model family computes what it computes on the CPU: the same weights and
input give the same output and gradients (fp32, TF32 off), and a bf16 autocast step stays close
and finite. The CPU paths that only the CPU takes (CSwin's fused instance norm and padded
attention heads, DCT's channels-last maps) are thereby checked against the plain modules the GPU
runs. Skipped without CUDA; ``benchmarks/gpu_run.sh`` runs it on a GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medvit.cpu_ops.attention import flash_friendly_attention
from medvit.cpu_ops.conv import depthwise_conv
from medvit.models import create_model
from medvit.models.dvpt import build_prompted_vit
from medvit.models.mae import build_mae
from medvit.models.vit import build_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODELS = {  # name -> (builder, input shape)
    "vit_tiny": (lambda: build_vit("tiny", in_chans=1, num_classes=2, img_size=32, patch_size=8), (2, 1, 32, 32)),
    "dvpt_vit_tiny": (lambda: build_prompted_vit("tiny", "dvpt", in_chans=1, num_classes=2, img_size=32, patch_size=8),
                      (2, 1, 32, 32)),
    "dct_histo_tiny": (lambda: create_model("dct_histo_tiny", in_chans=3, num_classes=2), (2, 3, 48, 48)),
    "deit_tiny_distilled": (lambda: create_model("deit_tiny_distilled", in_chans=1, num_classes=2, img_size=32,
                                                 patch_size=8), (2, 1, 32, 32)),
    "cswin_unet": (lambda: create_model("cswin_unet", in_chans=3, num_classes=1), (2, 3, 16, 32, 32)),
    "unet3d": (lambda: create_model("unet3d", in_chans=3, num_classes=1), (2, 3, 16, 16, 16)),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off, so CUDA fp32 matmuls and convolutions are comparable with the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _loss(out) -> torch.Tensor:
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.float().square().mean()


def _output_and_grads(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    _loss(out).backward()
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                        if p.grad is not None}


def _assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err = (got - want).norm().item()
    assert err <= rel * want.norm().item() + 1e-6, f"{what}: |diff| {err:.3g} vs |ref| {want.norm().item():.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_model_on_cuda_computes_what_it_computes_on_the_cpu(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    cpu_model = build().train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(*shape)
    out_cpu, grads_cpu = _output_and_grads(cpu_model, x)
    out_cuda, grads_cuda = _output_and_grads(cuda_model, x.cuda())
    assert grads_cpu.keys() == grads_cuda.keys() and grads_cpu
    _assert_close_rel(out_cuda, out_cpu, 1e-4, "output")
    for n, g in grads_cpu.items():
        _assert_close_rel(grads_cuda[n], g, 1e-3, f"grad of {n}")


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_on_cuda_stays_close_to_fp32(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train().cuda()
    x = torch.randn(*shape, device="cuda")
    out32, _ = _output_and_grads(model, x)
    out16, grads16 = _output_and_grads(model, x, bf16=True)
    assert torch.isfinite(out16).all() and all(torch.isfinite(g).all() for g in grads16.values())
    _assert_close_rel(out16, out32, 0.05, "bf16 output")


def test_mae_on_cuda_computes_what_it_computes_on_the_cpu():
    torch.manual_seed(0)
    cpu_model = build_mae("vit_tiny", in_chans=1, img_size=32, patch_size=8, mask_ratio=0.75).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(3, 1, 32, 32)
    ids_keep, mask, ids_restore = cpu_model.random_masking(3, torch.device("cpu"))
    results = []
    for model, dev in ((cpu_model, "cpu"), (cuda_model, "cuda")):
        xi = x.to(dev)
        pred = model.forward_decoder(model.forward_encoder(xi, ids_keep.to(dev)), ids_restore.to(dev))
        loss = model.loss(xi, pred, mask.to(dev))
        loss.backward()
        results.append((loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4)
    for n, g in results[0][1].items():
        _assert_close_rel(results[1][1][n], g, 1e-3, f"grad of {n}")


@pytest.mark.parametrize("head_dim", [6, 8, 16])
def test_cswin_attention_on_cuda_is_plain_attention(head_dim):
    q, k, v = (torch.randn(4, 2, 64, head_dim, device="cuda", requires_grad=True) for _ in range(3))
    out = flash_friendly_attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("spatial", [(1, 7), (5, 4), (6, 1, 1), (3, 4, 2)])
def test_depthwise_conv_on_cuda_equals_the_module(spatial):
    torch.manual_seed(0)
    conv_cls = torch.nn.Conv2d if len(spatial) == 2 else torch.nn.Conv3d
    conv = conv_cls(4, 4, 3, padding=1, groups=4).cuda()
    x = torch.randn(3, 4, *spatial, device="cuda")
    torch.testing.assert_close(depthwise_conv(conv, x), conv(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tf32", [True, False])
def test_trainer_sets_tf32_on_cuda(tmp_path, tf32):
    from medvit.engine import TrainConfig, Trainer

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = [{"image": torch.randn(4), "label": torch.tensor(i % 2)} for i in range(4)]
    Trainer(model, data, None, TrainConfig(device="cuda", tf32=tf32, epochs=1, batch_size=2), tmp_path,
            loss_fn=lambda out, b: F.cross_entropy(out, b["label"]), progress=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
