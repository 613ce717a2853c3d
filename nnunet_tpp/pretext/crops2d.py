"""Random resized crops of 2-D image batches, computed on the images' device with one ``grid_sample`` each: the
augmentation of the upstream MAE pre-training and the multi-crop views of the DINO-style pretexts (2-D TPP with
DINO, ESSA's DINOv2 SSA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def view_sizes(img_size: int, patch: int, local_fraction: float) -> tuple[int, int]:
    """Global views at the image size; local views at ``local_fraction`` of it, a multiple of the patch."""
    return img_size, max(patch, int(round(img_size * local_fraction / patch)) * patch)


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        generator: torch.Generator | None = None, size: int | None = None) -> torch.Tensor:
    """Per-image random resized crop of a batch (B, C, H, W): area fraction ``U(scale)``, log-uniform aspect ratio
    in ``ratio``, horizontal flip with p 0.5 when ``flip``; resampled bilinearly to ``size`` x ``size`` (None: the
    input's size). Random numbers come from ``generator`` on the CPU, so results do not depend on the device."""
    b = images.shape[0]
    rand = torch.rand(b, 5, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    theta = torch.zeros(b, 2, 3)  # output [-1, 1]^2 -> the crop, which lies inside the image
    theta[:, 0, 0] = width * torch.where((rand[:, 4] < 0.5) & flip, -1.0, 1.0)
    theta[:, 1, 1] = height
    theta[:, 0, 2], theta[:, 1, 2] = (2 * rand[:, 2] - 1) * (1 - width), (2 * rand[:, 3] - 1) * (1 - height)
    shape = list(images.shape[:2]) + ([size, size] if size else list(images.shape[2:]))
    grid = F.affine_grid(theta.to(images.device, images.dtype), shape, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_views(images: torch.Tensor, count: int, size: int, scale: tuple[float, float],
                 generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` batches of random resized crops (:func:`random_resized_crop`, aspect 3/4-4/3, flips) of
    ``images`` (B, C, H, W) at ``size`` x ``size``, with contrast (x0.6-1.4) and brightness (+-0.4 std) jitter
    with p 0.8 (images are normalised, so the jitter works around each image's mean and std)."""
    b = images.shape[0]
    mean, std = images.mean(dim=(1, 2, 3), keepdim=True), images.std(dim=(1, 2, 3), keepdim=True)
    views = []
    for _ in range(count):
        view = random_resized_crop(images, scale, generator=generator, size=size)
        u = torch.rand(b, 3, generator=generator).to(images.device, images.dtype)[:, :, None, None, None]
        jitter = (u[:, 0] < 0.8).to(images.dtype)
        contrast = 1 + jitter * (0.8 * u[:, 1] - 0.4)
        views.append((view - mean) * contrast + mean + jitter * 0.4 * (2 * u[:, 2] - 1) * std)
    return views
