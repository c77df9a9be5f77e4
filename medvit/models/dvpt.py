"""Parameter-efficient adaptation of a frozen timm ViT: DVPT, VPT-deep, linear probe, full fine-tuning.

DVPT (He et al., "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical
Image Analysis", Neural Networks 2025, arXiv:2307.09787): the frozen token features of a
transformer layer go through a lightweight bottleneck (down-projection), a few learnable
prompts act as queries that cross-attend to the transformed tokens (so each image gets its own
"dynamic" prompts), the result is projected back to the model width and added to the frozen
features. One module is shared by all adapted layers by default (a per-layer copy is an
option). See docs/dvpt.md for the details the paper's description leaves open and how they
are filled here.

VPT-deep (Jia et al., ECCV 2022): ``prompts`` learnable tokens are inserted after the class
token in front of every block and replaced by the next layer's own ones; they are dropped
before pooling.

Nothing in timm is edited: :class:`PromptedViT` wraps a ``VisionTransformer`` and inserts the
adapters through forward (pre-)hooks on its blocks, so the backbone's own ``state_dict`` keys
are unchanged (``backbone.<timm key>``) and its weights load from any ViT/MAE checkpoint::

    model = PromptedViT(build_vit("base", in_chans=3, num_classes=14), method="dvpt")
    load_pretrained(model.backbone, "encoder.safetensors")   # the shared, frozen backbone
    model.adapter_state_dict()                                 # what a task stores
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medvit.models.vit import build_vit

METHODS = ("linear", "vpt", "dvpt", "full")
"""Adaptation methods: linear probe (head only), VPT-deep prompts, DVPT, full fine-tuning."""

# Parameters of the backbone that belong to the task head: trained by every method, stored
# with every adapter (an MAE encoder has no average-pooling norm nor classifier).
HEAD_PREFIXES = ("head.", "fc_norm.")


class DVPT(nn.Module):
    """One DVPT module: frozen tokens (B, N, D) -> additive update (B, N, D).

    Steps, with ``r = bottleneck`` and ``k = prompts``:

    1. ``z = GELU(W_down LN(x))``: (B, N, r), the task-specific transform of the frozen features.
    2. ``p = P + MHA(q=W_q P, k=W_k z, v=W_v z)``: the k learnable prompts P (k, r) query the
       image's transformed tokens and become sample-specific (dynamic) prompts (B, k, r).
    3. ``u = softmax(z p^T / sqrt(r)) p``: every token reads the dynamic prompts back
       (parameter-free attention, (B, N, r)), so the prompts' knowledge reaches each token.
    4. ``delta = scale * W_up u`` (B, N, D); ``W_up`` starts at zero, so before training the
       adapted model computes exactly what the frozen one does.

    Attention uses ``F.scaled_dot_product_attention``.

    Args:
        dim: token width D of the ViT.
        bottleneck: r, width of the transformed features and of the prompts.
        prompts: k, number of learnable prompts.
        heads: attention heads of step 2 (``bottleneck`` must be a multiple).
        scale: factor of the update added to the frozen features.
    """

    def __init__(self, dim: int, bottleneck: int = 32, prompts: int = 8, heads: int = 4, scale: float = 1.0):
        super().__init__()
        if bottleneck % heads:
            raise ValueError(f"bottleneck {bottleneck} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = float(scale)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.prompts = nn.Parameter(torch.empty(prompts, bottleneck))
        self.q = nn.Linear(bottleneck, bottleneck)
        self.kv = nn.Linear(bottleneck, 2 * bottleneck)
        self.proj = nn.Linear(bottleneck, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.trunc_normal_(self.prompts, std=0.02)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def dynamic_prompts(self, z: torch.Tensor) -> torch.Tensor:
        """Prompts after cross-attention to the transformed tokens ``z`` (B, N, r) -> (B, k, r)."""
        b = z.shape[0]
        # the queries are the same for every image: project the k prompts once, then broadcast
        q = self.q(self.prompts).unsqueeze(0).expand(b, -1, -1)
        k, v = self.kv(z).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        return self.prompts + self.proj(attn.transpose(1, 2).reshape(b, -1, q.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) frozen features -> (B, N, D) update to add to them."""
        z = F.gelu(self.down(self.norm(x)))
        p = self.dynamic_prompts(z)
        u = F.scaled_dot_product_attention(z.unsqueeze(1), p.unsqueeze(1), p.unsqueeze(1)).squeeze(1)
        return self.scale * self.up(u)


class DeepPrompts(nn.Module):
    """VPT-deep prompt tokens: ``depth`` sets of ``prompts`` tokens of width ``dim``.

    Initialised uniformly in ``[-a, a]`` with ``a = sqrt(6 / (3 * patch_area + dim))`` (VPT's
    Xavier-style rule for a patch embedding of ``patch_area * 3`` inputs; ``in_chans`` here).
    """

    def __init__(self, depth: int, prompts: int, dim: int, patch_inputs: int):
        super().__init__()
        bound = math.sqrt(6.0 / float(patch_inputs + dim))
        self.tokens = nn.Parameter(torch.empty(depth, prompts, dim).uniform_(-bound, bound))

    @property
    def count(self) -> int:
        return int(self.tokens.shape[1])


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` adapted by one of :data:`METHODS`.

    Args:
        backbone: the ViT (its head already sized for the task; ``num_classes`` outputs).
        method: ``linear`` (train ``fc_norm`` + ``head``), ``vpt`` (+ VPT-deep prompts),
            ``dvpt`` (+ DVPT), ``full`` (train everything).
        dvpt: DVPT settings: ``bottleneck``, ``prompts``, ``heads``, ``scale`` (see
            :class:`DVPT`), ``shared`` (one module for every adapted layer, default True) and
            ``layers`` (0-based block indices to adapt; empty or None: every block).
        vpt_prompts: prompt tokens per layer of VPT-deep.

    Input (B, C, H, W) -> logits (B, num_classes). Every parameter of the backbone but the
    head is frozen except with ``full``.
    """

    def __init__(self, backbone: VisionTransformer, method: str, dvpt: dict[str, Any] | None = None,
                 vpt_prompts: int = 10):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown adaptation method {method!r}; allowed: {', '.join(METHODS)}")
        self.backbone = backbone
        self.method = method
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self._hooks: list[Any] = []
        self.dvpt: nn.Module | None = None
        self.prompts: DeepPrompts | None = None
        if method == "dvpt":
            cfg = dict(dvpt or {})
            layers = parse_layers(cfg.pop("layers", None), depth)
            if layers[0] < 0 or layers[-1] >= depth:
                raise ValueError(f"dvpt layers {layers} outside the {depth} blocks (0..{depth - 1})")
            shared = bool(cfg.pop("shared", True))
            self.dvpt_layers = layers
            if shared:
                self.dvpt = DVPT(dim, **cfg)
            else:
                self.dvpt = nn.ModuleDict({str(i): DVPT(dim, **cfg) for i in layers})
            for i in layers:
                self._hooks.append(backbone.blocks[i].register_forward_hook(functools.partial(self._dvpt_hook, i)))
        elif method == "vpt":
            patch = backbone.patch_embed.proj
            self.prompts = DeepPrompts(depth, vpt_prompts, dim, patch.in_channels * math.prod(patch.kernel_size))
            for i, block in enumerate(backbone.blocks):
                self._hooks.append(block.register_forward_pre_hook(functools.partial(self._vpt_pre_hook, i)))
            self._hooks.append(backbone.blocks[depth - 1].register_forward_hook(self._vpt_drop_hook))
        self.set_trainable()

    # ------------------------------------------------------------------ hooks
    def _dvpt_module(self, layer: int) -> DVPT:
        assert self.dvpt is not None
        return self.dvpt if isinstance(self.dvpt, DVPT) else self.dvpt[str(layer)]  # type: ignore[index]

    # Hooks are bound methods (with the layer in a partial), not closures over self: deepcopy
    # (EMA copies, moving a copy to another device) rebinds bound methods to the copy, whereas a
    # copied closure would still run the original model's adapters.
    def _dvpt_hook(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self._dvpt_module(layer)(output)

    def _vpt_pre_hook(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        assert self.prompts is not None
        x, rest = args[0], args[1:]
        n_prefix, k = self.backbone.num_prefix_tokens, self.prompts.count
        p = self.prompts.tokens[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        # block 0 receives the plain sequence; later blocks the previous layer's prompts,
        # which VPT-deep replaces by this layer's own
        tail = x[:, n_prefix:] if layer == 0 else x[:, n_prefix + k:]
        return (torch.cat([x[:, :n_prefix], p, tail], dim=1), *rest)

    def _vpt_drop_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        assert self.prompts is not None
        n_prefix = self.backbone.num_prefix_tokens
        return torch.cat([output[:, :n_prefix], output[:, n_prefix + self.prompts.count:]], dim=1)

    # ------------------------------------------------------------------ parameters
    def set_trainable(self) -> None:
        """Freeze the backbone except its head (all trainable with ``full``); adapters train."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self.method == "full" or name.startswith(HEAD_PREFIXES))
        for module in (self.dvpt, self.prompts):
            if module is not None:
                module.requires_grad_(True)

    def train(self, mode: bool = True) -> PromptedViT:
        """Frozen parts stay in eval mode (no dropout/drop-path noise on features that do not learn)."""
        super().train(mode)
        if mode and self.method != "full":
            self.backbone.eval()
            for name in ("fc_norm", "head", "head_drop"):
                getattr(self.backbone, name).train(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay: the backbone's (``pos_embed``, ``cls_token``) and the prompts."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        names |= {n for n, _ in self.named_parameters() if n.startswith(("prompts.", "dvpt.")) and "prompts" in n}
        return names

    def backbone_parameters(self) -> int:
        """Parameters of the shared backbone (the encoder, head and ``fc_norm`` excluded)."""
        return sum(p.numel() for n, p in self.backbone.named_parameters() if not n.startswith(HEAD_PREFIXES))

    def adapter_keys(self) -> list[str]:
        """``state_dict`` keys a task must store: the trainable tensors (with ``full``, all of them);
        the frozen backbone's come from the shared backbone file."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        keys = []
        for name in self.state_dict():
            inside = name.removeprefix("backbone.")
            # the input standardisation travels with the adapter: a backbone trained elsewhere
            # has none, and the adapter then carries the training split's
            if name in trainable or self.method == "full" or not name.startswith("backbone.") \
                    or inside.startswith(HEAD_PREFIXES + ("input_norm.",)):
                keys.append(name)
        return keys

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of :meth:`adapter_keys` (detached, on the CPU)."""
        state = self.state_dict()
        return {k: state[k].detach().cpu() for k in self.adapter_keys()}


def build_prompted_vit(size: str, method: str, in_chans: int = 1, num_classes: int = 1, img_size: int = 224,
                       patch_size: int = 16, dvpt: dict[str, Any] | None = None, vpt_prompts: int = 10,
                       drop_path: float = 0.0) -> PromptedViT:
    """A randomly initialised ``vit_<size>`` wrapped for ``method`` (no download); load the
    backbone with :func:`medvit.engine.pretrained.load_pretrained` on ``model.backbone``."""
    backbone = build_vit(size, in_chans=in_chans, num_classes=num_classes, img_size=img_size,
                         patch_size=patch_size, drop_path=drop_path)
    return PromptedViT(backbone, method, dvpt=dvpt, vpt_prompts=vpt_prompts)


def trainable_summary(model: PromptedViT) -> dict[str, Any]:
    """Trainable parameters, as a count and as a percentage of the backbone's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = model.backbone_parameters()
    return {"trainable_params": trainable, "backbone_params": backbone,
            "trainable_percent": 100.0 * trainable / backbone,
            "params": sum(p.numel() for p in model.parameters())}


def parse_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Adapted block indices: ``layers`` or, when empty/None, every block."""
    return sorted(set(layers or range(depth)))
