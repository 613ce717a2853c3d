"""Task models around a :class:`~nnunet_tpp.models.vit.VisionTransformer`: a classifier (CLS or mean
pooling + linear head) and a UNETR-style 2D segmenter (skips from blocks 3/6/9 and the final tokens,
decoder built from MONAI's UNETR blocks).

Both keep the backbone under ``backbone`` (so its parameter names are ``backbone.<timm name>``) and list
their task heads in ``head_prefixes``, which the PEFT interface always keeps trainable.
"""
from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetOutBlock
from torch import nn

from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS
from nnunet_tpp.models.vit import VisionTransformer


VIT_PEFT_DEFAULTS = PEFT_DEFAULTS  # options a PEFT method takes on these models when the user gives none


def _size_name(backbone: VisionTransformer) -> str:
    c = backbone.config
    return f"d{c.embed_dim}x{c.depth}-p{c.patch_size}-r{c.num_register_tokens}"


class ViTClassifier(nn.Module):
    """Image -> class logits.

    Args:
        backbone: the ViT.
        num_classes: outputs of the linear head.
        pool: ``"cls"`` (the class token) or ``"mean"`` (mean of the patch tokens).
    """

    head_prefixes = ("head",)
    peft_defaults = VIT_PEFT_DEFAULTS

    def __init__(self, backbone: VisionTransformer, num_classes: int, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.size_name = _size_name(backbone)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The pooled feature (B, D)."""
        tokens = self.backbone(image)
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.backbone.num_prefix_tokens:].mean(dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self.head(self.features(image))


def skip_blocks(depth: int, levels: int) -> tuple[int, ...]:
    """0-based indices of the blocks whose outputs feed the decoder: ``levels`` evenly spaced blocks, the
    last one being the final block (depth 12, 4 levels: blocks 3/6/9/12 -> (2, 5, 8, 11))."""
    return tuple(depth * (j + 1) // levels - 1 for j in range(levels))


class UNETRDecoder2d(nn.Module):
    """UNETR's decoder in 2D for a patch size 2^L: the final tokens are the bottleneck (H/p), the tokens of
    L-1 earlier blocks are projected up to H/2 ... H/2^(L-1), and a conv block on the image gives the
    full-resolution skip.

    Args:
        in_chans: image channels.
        embed_dim: token width.
        patch_size: a power of two >= 2.
        depth: number of transformer blocks.
        num_classes: output channels.
        feature_size: channels at full resolution (doubling per level).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, depth: int, num_classes: int,
                 feature_size: int = 16):
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if 2 ** levels != patch_size or levels < 1:
            raise ValueError(f"the segmentation decoder needs a power-of-two patch size, got {patch_size}")
        if depth < levels:
            raise ValueError(f"a ViT of depth {depth} has too few blocks for {levels} decoder levels")
        self.levels = levels
        self.taps = skip_blocks(depth, levels)[:-1]
        width = [feature_size * 2 ** j for j in range(levels)] + [embed_dim]
        norm = "instance"
        self.image_skip = UnetrBasicBlock(2, in_chans, width[0], 3, 1, norm, res_block=True)
        self.token_skips = nn.ModuleList(
            UnetrPrUpBlock(2, embed_dim, width[j], num_layer=levels - j - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm, conv_block=True, res_block=True)
            for j in range(1, levels))
        self.ups = nn.ModuleList(
            UnetrUpBlock(2, width[j + 1], width[j], 3, 2, norm, res_block=True) for j in range(levels))
        self.out = UnetOutBlock(2, width[0], num_classes)

    def forward(self, image: torch.Tensor, bottleneck: torch.Tensor, tapped: list[torch.Tensor]) -> torch.Tensor:
        """``bottleneck`` and ``tapped`` are feature maps (B, D, H/p, W/p); returns logits (B, K, H, W)."""
        skips = [self.image_skip(image)] + [proj(t) for proj, t in zip(self.token_skips, tapped)]
        x = bottleneck
        for j in reversed(range(self.levels)):
            x = self.ups[j](x, skips[j])
        return self.out(x)


class ViTSegmenter(nn.Module):
    """Image -> per-pixel class logits with a :class:`UNETRDecoder2d` (``decoder``) on the ViT."""

    head_prefixes = ("decoder",)
    peft_defaults = VIT_PEFT_DEFAULTS

    def __init__(self, backbone: VisionTransformer, num_classes: int, feature_size: int = 16):
        super().__init__()
        c = backbone.config
        self.backbone = backbone
        self.decoder = UNETRDecoder2d(c.in_chans, c.embed_dim, c.patch_size, c.depth, num_classes, feature_size)
        self.size_name = _size_name(backbone)

    @staticmethod
    def _to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The patch tokens (always the last ones, after prefix and prompt tokens) as a map (B, D, H/p, W/p)."""
        patches = tokens[:, tokens.shape[1] - grid[0] * grid[1]:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes, H, W)."""
        grid = self.backbone.grid_for(image)
        tokens, tapped = self.backbone.forward_features(image, taps=self.decoder.taps)
        return self.decoder(image, self._to_map(tokens, grid), [self._to_map(t, grid) for t in tapped])
