"""Masked image modelling as SimMIM does it (Xie et al., 2022; microsoft/SimMIM, ``models/simmim.py`` and the
mask generator of ``data/data_simmim.py``), for a hierarchical, convolution-stemmed encoder such as LiteMedSAM's
TinyViT, where MAE's dropping of patches does not apply.

* **Mask:** a random ``mask_ratio`` (0.6) of the ``mask_patch_size`` (32 px) squares of the image, exactly that
  many per image, repeated up to the grid the mask token replaces.
* **Mask token:** one learnable vector (zeros, then a truncated normal of std 0.02) that replaces the encoder's
  stem output at masked positions (``x * (1 - w) + token * w``); here the stem is a module whose output is
  replaced by a forward hook (:class:`MaskedStem`), so the encoder's own forward runs unchanged.
* **Decoder:** a 1 x 1 convolution from the encoder's output channels to ``stride^2 * 3`` and a pixel shuffle by
  the encoder's output stride.
* **Loss:** L1 between the reconstruction and the encoder's input on the masked pixels only, divided by the
  number of masked pixels and by the input channels.
"""
from __future__ import annotations

import torch
from torch import nn


def simmim_mask(batch: int, size: int, mask_patch_size: int, ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM's random mask: (B, size/mask_patch_size, size/mask_patch_size), 1 = masked, ``ceil(count * ratio)``
    masked squares per image."""
    if size % mask_patch_size:
        raise ValueError(f"the image size {size} must be a multiple of the mask patch size {mask_patch_size}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    grid = size // mask_patch_size
    count = grid * grid
    masked = int(-(-count * ratio // 1))
    order = torch.rand(batch, count, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, count)
    mask.scatter_(1, order[:, :masked], 1.0)
    return mask.view(batch, grid, grid)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, g, g) -> (B, 1, g * factor, g * factor), each square repeated."""
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2).unsqueeze(1)


def simmim_loss(target: torch.Tensor, reconstruction: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """L1 on the masked pixels: ``sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / channels``."""
    loss = nn.functional.l1_loss(reconstruction, target, reduction="none")
    return (loss * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / target.shape[1]


class MaskedStem(nn.Module):
    """The mask token and the hook that mixes it into a stem's output (B, C, H, W) where the current mask is 1.

    Args:
        stem: the module whose output is masked (LiteMedSAM: ``image_encoder.patch_embed``).
        channels: its output channels.
    """

    def __init__(self, stem: nn.Module, channels: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mask: torch.Tensor | None = None  # (B, 1, H, W) at the stem's resolution while masking
        self._handle = stem.register_forward_hook(self._mix)

    def _mix(self, module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None:
            return None
        w = self.mask.to(output.dtype)
        return output * (1 - w) + self.mask_token.to(output.dtype) * w

    def remove(self) -> None:
        """Takes the hook off the stem (the encoder is as before)."""
        self._handle.remove()


class SimMIMPretext(nn.Module):
    """Encoder + SimMIM decoder; ``forward(images)`` returns the loss.

    Args:
        backbone: maps the loader's images to features (B, ``embed_dim``, H / ``output_stride``, W /
            ``output_stride``); it must have ``prepare(images)`` (the encoder's input, the reconstruction target),
            ``encode(prepared)`` and ``simmim_stem()`` -> (module, its output channels, its stride): the mask token
            replaces its output.
        mask_patch_size, mask_ratio: SimMIM's mask.
    """

    def __init__(self, backbone: nn.Module, mask_patch_size: int = 32, mask_ratio: float = 0.6):
        super().__init__()
        self.backbone = backbone
        features, stride = backbone.embed_dim, backbone.output_stride
        stem, channels, self.stem_stride = backbone.simmim_stem()
        if mask_patch_size % self.stem_stride:
            raise ValueError(f"the mask patch size {mask_patch_size} must be a multiple of the stem's stride "
                             f"{self.stem_stride}")
        self.stem = MaskedStem(stem, channels)
        self.decoder = nn.Sequential(nn.Conv2d(features, stride ** 2 * backbone.in_chans, 1), nn.PixelShuffle(stride))
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The SimMIM loss of a batch of loader images (masks drawn from ``generator``)."""
        target = self.backbone.prepare(images)
        mask = simmim_mask(images.shape[0], images.shape[-1], self.mask_patch_size, self.mask_ratio, generator)
        self.stem.mask = upsample_mask(mask, self.mask_patch_size // self.stem_stride).to(images.device)
        try:
            reconstruction = self.decoder(self.backbone.encode(target))
        finally:
            self.stem.mask = None
        pixel_mask = upsample_mask(mask, self.mask_patch_size).to(images.device)
        return simmim_loss(target.float(), reconstruction.float(), pixel_mask)
