"""Masked autoencoding (He et al., 2022) for the package's ViT: random patch masking, a light decoder with
MAE's parameter names (so the decoder of a MAE pre-training checkpoint loads as it is) and the
normalised-pixel loss on the masked patches.

The encoder is the ViT itself: ``vit.forward_features(images, keep=keep)`` sees only the visible patches. The
decoder's blocks are timm's ``Block`` (as MAE's own ``models_mae.py``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (1, [1 +] grid^2, dim), half of the channels per axis."""
    if dim % 4:
        raise ValueError(f"the sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([axis(xs), axis(ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb[None].float()


def random_masking(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of ``ratio`` of the patches.

    Returns:
        ``(keep, mask, restore)``: indices of the visible patches (B, K), the mask (B, N; 1 = masked, in
        the original patch order) and the permutation that puts ``[visible, masked]`` back in order (B, N).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    visible = max(1, int(round(num_patches * (1 - ratio))))
    noise = torch.rand(batch, num_patches, generator=generator).to(device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :visible] = 0
    return shuffle[:, :visible], torch.gather(mask, 1, restore), restore


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in raster order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True
             ) -> torch.Tensor:
    """Mean squared error on the masked patches; with ``norm_pix`` each target patch is normalised by its own
    mean and standard deviation (MAE's default)."""
    target = patchify(images, patch).float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


class MAEDecoder(nn.Module):
    """MAE's decoder: visible tokens -> pixels of every patch.

    Args:
        embed_dim: the encoder's width.
        num_patches: patches per image (grid^2).
        patch_size, in_chans: what ``decoder_pred`` predicts per patch.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder transformer.
        num_prefix_tokens: class + register tokens in the encoder output (the class token gets position 0,
            registers none).
    """

    def __init__(self, embed_dim: int, num_patches: int, patch_size: int, in_chans: int,
                 decoder_embed_dim: int = 128, decoder_depth: int = 2, decoder_num_heads: int = 4,
                 num_prefix_tokens: int = 1):
        super().__init__()
        grid = int(round(math.sqrt(num_patches)))
        if grid * grid != num_patches:
            raise ValueError(f"MAEDecoder needs a square patch grid, got {num_patches} patches")
        self.num_prefix_tokens = num_prefix_tokens
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], num_patches: int, patch_size: int, in_chans: int,
                        num_prefix_tokens: int = 1, num_heads: int | None = None) -> "MAEDecoder":
        """A decoder shaped like, and loaded from, the ``decoder_*`` / ``mask_token`` tensors of a MAE
        checkpoint, for ``num_patches`` patches (the fixed sin-cos position table is rebuilt for that grid).
        Heads do not show in the weights: default one per 32 channels (MAE: 512 / 16)."""
        d_dec, d_enc = state["decoder_embed.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        decoder = cls(d_enc, num_patches, patch_size, in_chans, d_dec, depth, num_heads or max(1, d_dec // 32),
                      num_prefix_tokens)
        weights = {k: v for k, v in state.items() if k != "decoder_pos_embed"}
        missing, unexpected = decoder.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "decoder_pos_embed"]
        if missing or unexpected:
            raise ValueError(f"MAE decoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return decoder

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, prefix + K, D) and the restore permutation (B, N) -> predictions (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        n = restore.shape[1]
        filler = self.mask_token.to(x.dtype).expand(x.shape[0], n - patches.shape[1], -1)
        full = torch.gather(torch.cat([patches, filler], 1), 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        pos = self.decoder_pos_embed.to(x.dtype)
        prefix_pos = torch.cat([pos[:, :1], torch.zeros_like(pos[:, :1]).expand(-1, prefix.shape[1] - 1, -1)], 1)
        x = torch.cat([prefix + prefix_pos, full + pos[:, 1:]], 1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, self.num_prefix_tokens:]
