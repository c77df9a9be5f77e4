"""Masked autoencoder (He et al., CVPR 2022) around a timm ViT encoder, as used by Medical
MAE (Xiao et al., WACV 2023) for chest X-ray pretraining.

The encoder IS a timm :class:`~timm.models.vision_transformer.VisionTransformer` (built with
``num_classes=0``), so after pretraining ``mae.encoder.state_dict()`` initialises the same
ViT for fine-tuning (:func:`medvit.engine.pretrained.load_pretrained`). MONAI's
``MaskedAutoEncoderViT`` is not used because its encoder is not a timm ViT.

Per image, a random ``mask_ratio`` of the patches is removed (exactly
``L - round(L * (1 - mask_ratio))`` of ``L``, at least one kept); the encoder sees only the
visible patches (plus the class token); a light decoder (``decoder_depth`` blocks of width
``decoder_dim``) gets the encoded tokens and a shared mask token at every removed position
and predicts each patch's pixels. The loss is the mean squared error on the removed
patches only, against per-patch normalised pixels (``norm_pix_loss``, the paper's default).
Attention runs through ``F.scaled_dot_product_attention`` (timm's ``Attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medvit.models import create_model


@dataclass
class MAEOutput:
    """What :meth:`MaskedAutoencoder.forward` returns.

    Attributes:
        loss: scalar, mean over masked patches of the per-patch MSE.
        pred: (B, L, p*p*C) predicted patches (normalised pixels when ``norm_pix_loss``).
        mask: (B, L) 1 for removed (predicted) patches, 0 for visible ones.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ViT encoder.

    Args:
        encoder: a timm ``VisionTransformer`` with a class token and absolute position
            embeddings (e.g. ``create_model("vit_tiny", num_classes=0, ...)``).
        mask_ratio: fraction of patches removed per image (0 < r < 1; Medical MAE: 0.9).
        decoder_dim: decoder width.
        decoder_depth: decoder transformer blocks.
        decoder_heads: decoder attention heads.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1 per patch).
    """

    def __init__(self, encoder: VisionTransformer, mask_ratio: float = 0.9, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if encoder.cls_token is None or encoder.num_prefix_tokens != 1 or encoder.pos_embed is None:
            raise ValueError("the MAE encoder must be a ViT with one class token and absolute position embeddings")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.num_patches = int(encoder.patch_embed.num_patches)
        dim = encoder.embed_dim
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * self.in_chans)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in the encoder's row-major order."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W) (square grid)."""
        p, c = self.patch_size, self.in_chans
        gh, gw = self.encoder.patch_embed.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def num_visible(self, mask_ratio: float | None = None) -> int:
        """Patches the encoder sees per image."""
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        return max(1, int(round(self.num_patches * (1.0 - r))))

    # ------------------------------------------------------------------ model
    def random_masking(self, b: int, device: torch.device, mask_ratio: float | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random choice of visible patches.

        Returns:
            ids_keep (B, K) indices of visible patches, mask (B, L) 1 = removed,
            ids_restore (B, L) the permutation undoing the shuffle.
        """
        n, keep = self.num_patches, self.num_visible(mask_ratio)
        noise = torch.rand(b, n, device=device, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(b, n, device=device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches only: (B, C, H, W) -> (B, 1 + K, D) (class token first)."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        x = enc.blocks(x)
        # an average-pooling ViT has no final `norm` (Identity) but `fc_norm`; MAE normalises
        # the encoder output with whichever the encoder has
        return enc.norm(x) if not isinstance(enc.norm, nn.Identity) else enc.fc_norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) encoded tokens -> (B, L, p*p*C) predicted patches."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) regression target: patches, normalised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch mean squared error."""
        per_patch = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def standardize(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's input standardisation (``encoder.input_norm``; identity without one).
        The encoder sees, and the loss targets, standardised images, so the fine-tuned ViT
        that inherits ``input_norm`` sees the input distribution it was pretrained on."""
        norm = getattr(self.encoder, "input_norm", None)
        return norm(imgs) if norm is not None else imgs

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """(B, C, H, W) images -> :class:`MAEOutput` (loss, predicted patches, mask)."""
        imgs = self.standardize(imgs)
        ids_keep, mask, ids_restore = self.random_masking(imgs.shape[0], imgs.device, mask_ratio, generator)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return MAEOutput(self.loss(imgs, pred, mask), pred, mask)

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`standardize`."""
        norm = getattr(self.encoder, "input_norm", None)
        return norm.inverse(x) if norm is not None else x

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: (masked input, reconstruction), both (B, C, H, W) in the input's units.

        The masked input has removed patches set to 0; the reconstruction shows visible
        patches as given and removed ones as predicted (de-normalised with the true patch
        mean and variance when ``norm_pix_loss``, as in the MAE authors' visualisation).
        """
        out = self.forward(imgs, generator=generator)
        patches = self.patchify(imgs)
        pred = out.pred.float()
        if self.norm_pix_loss:
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
        else:  # predicted in standardised units: back to the input's
            pred = self.patchify(self.unstandardize(self.unpatchify(pred)))
        m = out.mask[..., None]
        masked = self.unpatchify(patches * (1 - m))
        recon = self.unpatchify(patches * (1 - m) + pred * m)
        return masked, recon


def build_mae(model: str = "vit_tiny", in_chans: int = 1, img_size: int = 224, patch_size: int = 16,
              mask_ratio: float = 0.9, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
              norm_pix_loss: bool = True) -> MaskedAutoencoder:
    """An MAE whose encoder is the registered ViT ``model`` (``vit_tiny``/``vit_small``/``vit_base``)."""
    encoder = create_model(model, in_chans=in_chans, num_classes=0, img_size=img_size, patch_size=patch_size)
    return MaskedAutoencoder(encoder, mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                             decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss)
