"""3-D multi-crop views for DINO, sampled from nnU-Net's preprocessed training cases and augmented with
nnU-Net's own transform library (batchgeneratorsv2)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms


@dataclass
class MultiCropConfig:
    """Views per sample and their extent, as fractions of the patch along each axis.

    Attributes:
        n_global, n_local: number of global and local views.
        global_scale, local_scale: range of the crop extent (fraction of the patch size per axis) before
            resizing to the global (patch) or local (half patch) view size.
    """

    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.6, 1.0)
    local_scale: tuple[float, float] = (0.25, 0.5)


def view_sizes(patch_size, divisor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Global views at the patch size; local views at half of it, rounded to what the network's poolings
    divide (``divisor`` per axis), and never below one divisor."""
    local = tuple(max(int(d), (int(p) // 2) // int(d) * int(d)) for p, d in zip(patch_size, divisor))
    return tuple(int(p) for p in patch_size), local


class MultiCropSampler:
    """Draws batches of views from a set of preprocessed cases.

    Args:
        dataset: an nnU-Net dataset object (``load_case(identifier) -> (data, seg, seg_prev, properties)``).
        identifiers: the cases to sample from (the fold's training cases only).
        patch_size: the plan's patch size (the global view size).
        divisor: product of the network's pool sizes per axis.
        cfg: :class:`MultiCropConfig`.
        seed: random seed.
    """

    def __init__(self, dataset, identifiers: list[str], patch_size, divisor, cfg: MultiCropConfig | None = None,
                 seed: int = 0):
        if not identifiers:
            raise ValueError("no training cases to sample pretext views from")
        self.dataset, self.identifiers = dataset, list(identifiers)
        self.cfg = cfg or MultiCropConfig()
        self.global_size, self.local_size = view_sizes(patch_size, divisor)
        self.rng = np.random.default_rng(seed)
        self.augment = ComposeTransforms([
            MirrorTransform(allowed_axes=(0, 1, 2)),
            MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
                                              p_per_channel=1.0),
            ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                              synchronize_channels=False, p_per_channel=1.0),
            GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_channel=1.0, synchronize_channels=True),
        ])

    def _crop(self, image: np.ndarray, scale: tuple[float, float], out_size: tuple[int, ...]) -> torch.Tensor:
        extent = [max(4, int(round(p * self.rng.uniform(*scale)))) for p in self.global_size]
        starts, pads = [], []
        for size, want in zip(image.shape[1:], extent):
            starts.append(int(self.rng.integers(0, max(size - want, 0) + 1)))
            pads.append(max(want - size, 0))
        crop = np.asarray(image[(slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, extent))],
                          dtype=np.float32)
        view = torch.from_numpy(crop)
        if any(pads):
            view = F.pad(view, [v for p in reversed(pads) for v in (p // 2, p - p // 2)])
        view = F.interpolate(view[None], size=out_size, mode="trilinear", align_corners=False)[0]
        return self.augment(image=view)["image"]

    def sample(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns ``(global_views, local_views)``: lists (one entry per view index) of ``(B, C, *size)``."""
        globals_, locals_ = [[] for _ in range(self.cfg.n_global)], [[] for _ in range(self.cfg.n_local)]
        for _ in range(batch_size):
            identifier = self.identifiers[int(self.rng.integers(len(self.identifiers)))]
            image = self.dataset.load_case(identifier)[0]
            for views in globals_:
                views.append(self._crop(image, self.cfg.global_scale, self.global_size))
            for views in locals_:
                views.append(self._crop(image, self.cfg.local_scale, self.local_size))
        return [torch.stack(v) for v in globals_], [torch.stack(v) for v in locals_]
