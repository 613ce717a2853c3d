"""3-D multi-crop views for DINO, sampled from nnU-Net's preprocessed training cases and augmented with
nnU-Net's own transform library (batchgeneratorsv2).

The views of one sample come from one shared region, as DINO's come from one image: a region of the global view
size is placed uniformly in the case, each global view is a crop of 60-100 % of the region per axis and each
local view one of 25-50 %, each resized to its view size. Two global views therefore always overlap (by at least
20 % of the region per axis); placed independently anywhere in a case of twice the view size they were disjoint a
third of the time.
"""
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

from nnunet_tpp.pretext.dino import PretextSettingsError


@dataclass
class MultiCropConfig:
    """Views per sample and their extent, as fractions of the sample's region along each axis.

    Attributes:
        n_global, n_local: number of global and local views.
        global_scale, local_scale: range of the crop extent (fraction of the region, which has the global view
            size, per axis) before resizing to the global or local view size.
    """

    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.6, 1.0)
    local_scale: tuple[float, float] = (0.25, 0.5)


def view_sizes(global_size, divisor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The global view size as given; local views at half of it, but at least 1.5 divisors per axis (``divisor``:
    the product of the network's pool sizes), so that the encoder's strided convolutions (which round up) leave
    2 voxels per axis at its deepest stage: an instance norm over one voxel outputs a constant. Only the encoder
    sees the views, so local views need not be multiples of the divisor."""
    local = tuple(min(int(g), max(int(g) // 2, 3 * int(d) // 2)) for g, d in zip(global_size, divisor))
    return tuple(int(g) for g in global_size), local


def default_view_size(patch_size, divisor) -> tuple[int, ...]:
    """The default global view: half the plan's patch per axis, rounded to the nearest multiple of the pooling
    divisor, at least two divisors (where the axis is pooled), at most the patch. A 128^3 patch pooled 5 times
    gives 64^3 views."""
    out = []
    for p, d in zip(patch_size, divisor):
        p, d = int(p), int(d)
        low = 2 * d if d > 1 else 1
        out.append(min(max(low, int(round(p / 2 / d)) * d), max(low, p // d * d)))
    return tuple(out)


def check_views(global_size, divisor, case_shapes: dict[str, tuple[int, ...]] | None = None,
                batch_size: int | None = None) -> None:
    """Refuses views the network's poolings do not fit, views larger than a case, and a batch below 1.

    Args:
        global_size: the global view size per axis: a multiple of the divisor, at least 2 divisors on pooled axes
            (2 voxels per axis at the deepest stage).
        divisor: the product of the network's pool sizes per axis.
        case_shapes: ``{case: spatial shape}`` of the cases the views are drawn from.
        batch_size: the pretext batch size.
    Raises:
        PretextSettingsError: naming the setting and what fits.
    """
    size, div = [int(v) for v in global_size], [int(v) for v in divisor]
    if len(size) != len(div) or any(s < 1 for s in size):
        raise PretextSettingsError(f"pretext view size {size} must give {len(div)} positive sizes (one per axis)")
    bad = [a for a, (s, d) in enumerate(zip(size, div)) if s % d or (d > 1 and s < 2 * d)]
    if bad:
        fit = [max(2 * d if d > 1 else 1, round(s / d) * d) for s, d in zip(size, div)]
        raise PretextSettingsError(f"pretext view size {size} does not fit the plan's pooling: each axis must be a "
                                   f"multiple of {div} (the product of the pool sizes) and at least twice it, so "
                                   f"that 2 voxels per axis reach the deepest stage (axis {bad}); e.g. {fit}")
    if batch_size is not None and int(batch_size) < 1:
        raise PretextSettingsError(f"the pretext batch size must be >= 1, got {batch_size}")
    if case_shapes:
        small = {c: tuple(int(v) for v in s) for c, s in case_shapes.items()
                 if any(int(v) < w for v, w in zip(s, size))}
        if small:
            listed = ", ".join(f"{c} {list(s)}" for c, s in sorted(small.items())[:5])
            fit = [min(int(s[a]) for s in case_shapes.values()) // d * d for a, d in enumerate(div)]
            raise PretextSettingsError(
                f"pretext view size {size} is larger than {len(small)} of the {len(case_shapes)} training cases "
                f"({listed}{', ...' if len(small) > 5 else ''}); set pretext_view_size to at most {fit} "
                f"(multiples of {div})")


def box_iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two boxes ``(starts, extents)``."""
    inter = np.prod([max(0, min(sa + ea, sb + eb) - max(sa, sb)) for sa, ea, sb, eb in zip(*a, *b)])
    union = np.prod(a[1]) + np.prod(b[1]) - inter
    return float(inter / union) if union else 0.0


class MultiCropSampler:
    """Draws batches of views from a set of preprocessed cases.

    Args:
        dataset: an nnU-Net dataset object (``load_case(identifier) -> (data, seg, seg_prev, properties)``).
        identifiers: the cases to sample from (the fold's training cases only).
        global_size: the global view size (also the size of each sample's region).
        divisor: product of the network's pool sizes per axis.
        cfg: :class:`MultiCropConfig`.
        seed: random seed.
    """

    def __init__(self, dataset, identifiers: list[str], global_size, divisor, cfg: MultiCropConfig | None = None,
                 seed: int = 0):
        if not identifiers:
            raise ValueError("no training cases to sample pretext views from")
        self.dataset, self.identifiers = dataset, list(identifiers)
        self.cfg = cfg or MultiCropConfig()
        self.global_size, self.local_size = view_sizes(global_size, divisor)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.global_ious: list[float] = []
        self.augment = ComposeTransforms([
            MirrorTransform(allowed_axes=(0, 1, 2)),
            MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
                                              p_per_channel=1.0),
            ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                              synchronize_channels=False, p_per_channel=1.0),
            GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_channel=1.0, synchronize_channels=True),
        ])

    def _region(self, shape, rng) -> tuple[int, ...]:
        """The start of a region of the global view size in a case of spatial ``shape`` (uniform)."""
        return tuple(int(rng.integers(0, max(s - r, 0) + 1)) for s, r in zip(shape, self.global_size))

    def _box(self, scale: tuple[float, float], rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A crop ``(starts, extents)`` inside the region (region coordinates)."""
        extent = tuple(min(r, max(2, int(round(r * rng.uniform(*scale))))) for r in self.global_size)
        start = tuple(int(rng.integers(0, r - e + 1)) for r, e in zip(self.global_size, extent))
        return start, extent

    def _view(self, region: torch.Tensor, box, out_size) -> torch.Tensor:
        (starts, extents) = box
        crop = region[(slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, extents))]
        view = F.interpolate(crop[None], size=out_size, mode="trilinear", align_corners=False)[0]
        return self.augment(image=view)["image"]

    def global_overlap(self, draws: int = 2000, seed: int = 0) -> dict[str, float]:
        """How two global views of one sample overlap, from ``draws`` pairs of boxes (no images):
        ``{"mean_iou", "disjoint"}`` (the mean intersection over union, the fraction of disjoint pairs)."""
        rng = np.random.default_rng(seed)
        ious = np.array([box_iou(self._box(self.cfg.global_scale, rng), self._box(self.cfg.global_scale, rng))
                         for _ in range(draws)])
        return {"mean_iou": float(ious.mean()), "disjoint": float((ious == 0).mean())}

    def sample(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns ``(global_views, local_views)``: lists (one entry per view index) of ``(B, C, *size)``, drawn from
        the sampler's own generator (each call continues it; see :meth:`draw` for views fixed by a key)."""
        return self.collate([self._sample_one(self.rng) for _ in range(batch_size)])

    def draw(self, key: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The views of one sample, fixed by ``key`` and the sampler's seed (:mod:`nnunet_tpp.pretext.feed`):
        ``(global_views, local_views)``, each a list of ``(C, *size)``."""
        from nnunet_tpp.pretext.feed import seeded
        with seeded((self.seed, *key)) as rng:
            return self._sample_one(rng)

    def collate(self, samples: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stacks the draws of a batch: lists (one entry per view index) of ``(B, C, *size)``."""
        n_global, n_local = self.cfg.n_global, self.cfg.n_local
        return ([torch.stack([s[0][v] for s in samples]) for v in range(n_global)],
                [torch.stack([s[1][v] for s in samples]) for v in range(n_local)])

    def _sample_one(self, rng) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        identifier = self.identifiers[int(rng.integers(len(self.identifiers)))]
        image = self.dataset.load_case(identifier)[0]
        shape = tuple(image.shape[1:])
        if any(s < r for s, r in zip(shape, self.global_size)):
            raise PretextSettingsError(f"case {identifier} {list(shape)} is smaller than the pretext view "
                                       f"{list(self.global_size)}")
        start = self._region(shape, rng)
        region = torch.from_numpy(np.asarray(
            image[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, self.global_size))],
            dtype=np.float32))
        boxes = [self._box(self.cfg.global_scale, rng) for _ in range(self.cfg.n_global)]
        if len(boxes) >= 2:
            self.global_ious.append(box_iou(boxes[0], boxes[1]))
        globals_ = [self._view(region, box, self.global_size) for box in boxes]
        locals_ = [self._view(region, self._box(self.cfg.local_scale, rng), self.local_size)
                   for _ in range(self.cfg.n_local)]
        return globals_, locals_
