"""medvit.cpu_ops: every fast path computes what its plain reference computes, outputs and
gradients (several shapes and both memory layouts, fp32 tightly, bf16 autocast loosely), and
the process-level settings do what they say."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvit.cpu_ops import attention as attention_mod
from medvit.cpu_ops import norm as norm_mod
from medvit.cpu_ops.attention import (
    CPU_FLASH_MIN_HEAD_DIM,
    UnfusedAttention,
    flash_friendly_attention,
    padded_attention,
    reference_attention,
    unfused_attention,
)
from medvit.cpu_ops.conv import (
    PointwiseConv3d,
    UnetBasicBlockLite,
    reference_pointwise_conv3d,
    reference_unet_basic_block_lite,
)
from medvit.cpu_ops.norm import instance_norm_leaky_relu, reference_instance_norm_leaky_relu
from medvit.cpu_ops.process import glibc_malloc
from medvit.engine.compute import count_flops

LAYOUTS = [torch.contiguous_format, torch.channels_last_3d]


def outputs_and_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      params: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """``fn(*inputs)``, then the gradients of ``out.square().sum()`` for fresh copies of
    ``inputs`` and for ``params``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    loss = out.float().square().sum()
    grads = torch.autograd.grad(loss, [*leaves, *params])
    return [out.detach(), *grads]


def assert_all_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float = 1e-5,
                     rtol: float = 1e-4) -> None:
    """Each tensor of ``got`` equals the one of ``want`` (same dtype), up to ``rtol`` and
    ``atol`` times the reference's largest magnitude (at least 1): a weight gradient sums
    thousands of products, whose float32 rounding grows with their size."""
    names = ["output"] + [f"grad {i}" for i in range(len(want) - 1)]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, name
        scale = max(1.0, float(w.detach().abs().max()))
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize(("cin", "cout", "spatial"), [(4, 1, (8, 8, 8)), (8, 2, (4, 6, 5)), (3, 16, (1, 7, 2))])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pointwise_conv3d_is_a_1x1x1_conv3d(cin, cout, spatial, layout):
    torch.manual_seed(0)
    layer = PointwiseConv3d(cin, cout).to(memory_format=layout)
    plain = nn.Conv3d(cin, cout, 1)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, cin, *spatial).contiguous(memory_format=layout)
    params = [layer.weight, layer.bias]
    fast = outputs_and_grads(layer, [x], params)
    ref = outputs_and_grads(lambda t: reference_pointwise_conv3d(layer, t), [x], params)
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fast[0], plain(x).detach(), atol=1e-5, rtol=1e-5)


def test_pointwise_conv3d_under_bf16_autocast_is_close_to_the_conv3d():
    torch.manual_seed(0)
    layer = PointwiseConv3d(8, 2)
    x = torch.randn(2, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outputs_and_grads(layer, [x], [layer.weight, layer.bias])
        ref = outputs_and_grads(lambda t: reference_pointwise_conv3d(layer, t), [x], [layer.weight, layer.bias])
    assert fast[0].dtype == torch.bfloat16
    assert_all_close(fast, ref, atol=0.1, rtol=0.05)


def _lite_block(cin: int, cout: int, layout: torch.memory_format) -> UnetBasicBlockLite:
    block = UnetBasicBlockLite(cin, cout).to(memory_format=layout)
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.5, 0.5)
    return block


@pytest.mark.parametrize(("cin", "cout", "side"), [(5, 4, 8), (3, 8, 6), (16, 8, 4)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unet_basic_block_lite_is_conv_instance_norm_leaky_relu(cin, cout, side, layout):
    """Against its own modules in sequence, and against an affine InstanceNorm3d with the same
    state (the nnU-Net layer it stands for); the output is channels_last_3d."""
    torch.manual_seed(0)
    block = _lite_block(cin, cout, layout)
    x = (torch.randn(2, cin, side, side, side) * 2 + 1).contiguous(memory_format=layout)
    params = list(block.parameters())
    fast = outputs_and_grads(block, [x], params)
    ref = outputs_and_grads(lambda t: reference_unet_basic_block_lite(block, t), [x], params)
    assert_all_close(fast, ref, atol=2e-5, rtol=1e-4)
    norm = nn.InstanceNorm3d(cout, affine=True)
    norm.load_state_dict(block[1].state_dict())
    want = F.leaky_relu(norm(F.conv3d(x, block[0].weight, padding=1)), 0.01)
    torch.testing.assert_close(fast[0], want.detach(), atol=1e-5, rtol=1e-5)
    assert fast[0].is_contiguous(memory_format=torch.channels_last_3d)


# ---------------------------------------------------------------------------------- instance norm


CL3D, STD = torch.channels_last_3d, torch.contiguous_format


@pytest.mark.parametrize(("channels", "side", "layout"), [(8, 8, CL3D), (5, 8, CL3D), (4, 3, CL3D), (8, 4, STD),
                                                          (16, 5, CL3D), (3, 6, STD)])
def test_instance_norm_leaky_relu_equals_the_modules_with_gradients(channels, side, layout):
    """The CPU path (rows of 128 floats when C divides 128, else of C) gives GroupNorm(C, C) +
    LeakyReLU's output and gradients, also when the incoming gradient is a channel slice of a
    concatenation (as in CSwinUNet's skip branch)."""
    torch.manual_seed(0)
    norm, act = nn.GroupNorm(channels, channels), nn.LeakyReLU(0.01)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, channels, side, side, side) * 2 + 1).contiguous(memory_format=layout)
    upstream = torch.randn(3, 2 * channels, side, side, side).contiguous(memory_format=torch.channels_last_3d)
    results = []
    for fn in (reference_instance_norm_leaky_relu, instance_norm_leaky_relu):
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        out = fn(xi, norm, act)
        torch.cat([out, out * 0.5], dim=1).backward(upstream)  # out's gradient: a channel slice
        results.append((out.detach(), xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    assert_all_close(results[1], results[0], atol=2e-5, rtol=1e-4)
    if layout == CL3D:  # as a convolution gives it in UnetBasicBlockLite: the output keeps the layout
        assert results[1][0].is_contiguous(memory_format=CL3D)


def test_instance_norm_leaky_relu_of_a_bf16_input_is_computed_in_fp32():
    """A bf16 convolution output (under autocast) is normalised in fp32: the output is fp32,
    the gradient reaching the bf16 input is bf16, and both are the reference's on the input's
    fp32 copy (CPU autocast would run the modules themselves in bf16)."""
    torch.manual_seed(0)
    norm, act = nn.GroupNorm(8, 8), nn.LeakyReLU(0.01)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    xb = torch.randn(2, 8, 8, 8, 8).contiguous(memory_format=CL3D).to(torch.bfloat16)
    params = [norm.weight, norm.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outputs_and_grads(lambda t: instance_norm_leaky_relu(t, norm, act), [xb], params)
    ref = outputs_and_grads(lambda t: reference_instance_norm_leaky_relu(t, norm, act), [xb.float()], params)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.bfloat16
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    assert_all_close([fast[1].float(), *fast[2:]], ref[1:], atol=1e-2, rtol=1e-2)


def test_instance_norm_leaky_relu_leaves_other_norms_to_the_modules(monkeypatch):
    """A GroupNorm with fewer groups than channels, or without affine parameters, is not an
    instance norm the fast path covers: the reference computes it."""
    calls = []
    monkeypatch.setattr(norm_mod, "_InstanceNormLeakyReLU", SimpleNamespace(apply=lambda *a: calls.append(1)))
    x = torch.randn(2, 8, 4, 4, 4)
    for norm in (nn.GroupNorm(2, 8), nn.GroupNorm(8, 8, affine=False)):
        torch.testing.assert_close(instance_norm_leaky_relu(x, norm, nn.LeakyReLU(0.01)),
                                   F.leaky_relu(norm(x), 0.01))
    assert calls == []


# ---------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("head_dim", [3, 6, 16, 24])
@pytest.mark.parametrize("pad_to", [8, 16, 32])
def test_padded_attention_is_plain_attention(head_dim, pad_to):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, head_dim) for _ in range(3))
    fast = outputs_and_grads(lambda *t: padded_attention(*t, pad_to), [q, k, v])
    ref = outputs_and_grads(reference_attention, [q, k, v])
    assert fast[0].shape == q.shape
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [6, 16, 24])
def test_flash_friendly_attention_is_plain_attention_and_counts_useful_flops(head_dim):
    q, k, v = (torch.randn(3, 2, 40, head_dim, dtype=torch.float64) for _ in range(3))
    assert_all_close(outputs_and_grads(flash_friendly_attention, [q, k, v]),
                     outputs_and_grads(reference_attention, [q, k, v]), atol=1e-10, rtol=1e-7)
    # FLOPs counted are those of the unpadded head dim (count_flops disables the flash kernel)
    flops = count_flops(lambda t: flash_friendly_attention(t, t, t), q)
    assert flops == 2 * (2 * 40 * 40 * head_dim) * 2 * 3
    assert CPU_FLASH_MIN_HEAD_DIM == 16


def test_flash_friendly_attention_under_bf16_autocast_is_close_to_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 64, 6) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outputs_and_grads(flash_friendly_attention, [q, k, v])
        ref = outputs_and_grads(reference_attention, [q, k, v])
    assert_all_close(fast, ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 4, 17, 6), (6, 1, 9, 16)])
@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"}])
def test_unfused_attention_is_scaled_dot_product_attention(shape, kwargs):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    T, kwargs = shape[-2], dict(kwargs)  # parametrize shares one dict between the shapes
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = (torch.rand(T, T) > 0.4) | torch.eye(T, dtype=torch.bool)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(T, T)
    fast = outputs_and_grads(lambda *t: unfused_attention(*t, **kwargs), [q, k, v])
    ref = outputs_and_grads(lambda *t: reference_attention(*t, **kwargs), [q, k, v])
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-4)
    ref_fused = outputs_and_grads(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), [q, k, v])
    assert_all_close(fast, ref_fused, atol=1e-5, rtol=1e-4)


def test_unfused_attention_mode_reroutes_sdpa_and_computes_the_same(monkeypatch):
    """Inside UnfusedAttention every F.scaled_dot_product_attention call goes to
    unfused_attention; fp32 outputs and gradients equal the reference, bf16 autocast stays
    close; calls with enable_gqa keep the fused kernel."""
    calls = []
    real = attention_mod.unfused_attention
    monkeypatch.setattr(attention_mod, "unfused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))

    def sdpa(*t):
        with UnfusedAttention():
            return F.scaled_dot_product_attention(*t)

    assert_all_close(outputs_and_grads(sdpa, [q, k, v]), outputs_and_grads(reference_attention, [q, k, v]),
                     atol=1e-5, rtol=1e-4)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outputs_and_grads(sdpa, [q, k, v])
        ref = outputs_and_grads(reference_attention, [q, k, v])
    assert fast[0].dtype == ref[0].dtype == torch.bfloat16
    assert_all_close(fast, ref, atol=0.05, rtol=0.05)
    assert len(calls) == 2
    kv = torch.randn(1, 2, 5, 8)
    with UnfusedAttention():
        F.scaled_dot_product_attention(torch.randn(1, 4, 5, 8), kv, kv, enable_gqa=True)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------- process settings

_MALLINFO_SCRIPT = """
import ctypes, sys, torch
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t)
                for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                             "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "retain":
    from medvit.cpu_ops.process import retain_freed_memory
    assert retain_freed_memory() and retain_freed_memory()  # applied once, the same answer after
mapped = libc.mallinfo2().hblks
x = torch.ones(5 << 20)  # 20 MiB
mapped_after, heap = libc.mallinfo2().hblks, libc.mallinfo2().arena
del x
print(mapped_after - mapped, heap - libc.mallinfo2().arena)
"""


@pytest.mark.skipif(not glibc_malloc(), reason="glibc's mallopt")
def test_retain_freed_memory_keeps_large_blocks_on_the_heap():
    """glibc's default (the reference) maps a 20 MiB tensor with mmap (its pages go back to the
    kernel when it is freed and fault in zeroed for the next step); after retain_freed_memory()
    it comes from the heap and freeing it does not shrink the heap (each case in its own
    process)."""
    def run(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _MALLINFO_SCRIPT, mode], capture_output=True, text=True,
                             check=True)
        return [int(v) for v in out.stdout.split()]

    assert run("default")[0] == 1  # one more mmapped block
    new_maps, trimmed = run("retain")
    assert new_maps == 0 and trimmed == 0


def test_the_command_and_its_process_settings_import_no_torch():
    """The `medvit` command imports medvit.cpu_ops.process at its start (for the fast exit):
    neither loads torch, nor the package's torch modules."""
    code = ("import sys, medvit.cli, medvit.cpu_ops.process; "
            "sys.exit('torch' in sys.modules or 'medvit.cpu_ops.attention' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
