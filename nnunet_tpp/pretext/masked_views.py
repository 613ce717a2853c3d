"""Views and block masks for the masked-reconstruction pretext (3-D), after nnU-Net's self-supervised framework
(MIC-DKFZ/nnssl ``src/nnssl/training/nnsslTrainer/masked_image_modeling/BaseMAETrainer.py``: ``create_blocky_mask``,
``mask_creation``).

As nnssl: the view is divided into blocks of ``block_size`` voxels per axis (16), a fixed share of the blocks
(``mask_ratio``, 0.75; exactly ``int(ratio * blocks)`` per sample, chosen by a random permutation) is masked, the
mask is repeated to the view's voxels, 1 = visible and 0 = masked; the masked input is ``view * mask`` (masked voxels
are 0: the mean of nnU-Net's z-scored data, no mask token); the views are mirrored along random axes.

Not as nnssl (each a setting here): a block is at most the view along each axis (nnssl needs the patch to be a
multiple of 16 on every axis; a view of 10 slices gets blocks of 10 slices), and blocks that cross the view's border
are cut; the view is a random crop of the training case at ``view_size`` (cases smaller than the view are padded
with 0, as nnU-Net's loader pads), without nnssl's random rotation and scaling (applied by nnssl to 20 % of its
samples): only mirroring.
"""
from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

from nnunet_tpp.pretext.dino import PretextSettingsError


def block_grid(view_size, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(blocks per axis, block extent per axis)``: blocks of ``block_size`` voxels, at most the view per axis;
    the last block of an axis is cut at the border."""
    extent = tuple(max(1, min(int(block_size), int(s))) for s in view_size)
    grid = tuple(-(-int(s) // e) for s, e in zip(view_size, extent))
    return grid, extent


def block_mask(view_size, block_size: int, mask_ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """A ``(1, *view_size)`` float mask, 1 visible / 0 masked: ``int(mask_ratio * blocks)`` blocks masked, chosen
    uniformly without replacement (nnssl ``create_blocky_mask``)."""
    grid, extent = block_grid(view_size, block_size)
    n = int(np.prod(grid))
    flat = torch.ones(n)
    flat[torch.from_numpy(rng.permutation(n)[:int(mask_ratio * n)].copy())] = 0
    mask = flat.reshape(grid)
    for axis, e in enumerate(extent):
        mask = mask.repeat_interleave(e, dim=axis)
    return mask[tuple(slice(0, int(s)) for s in view_size)][None].contiguous()


def check_mask_settings(mask_ratio: float, block_size: int, view_size) -> None:
    """Refuses a mask ratio outside (0, 1) or one that masks no block of the view, and a block below 1 voxel."""
    if not 0 < float(mask_ratio) < 1:
        raise PretextSettingsError(f"the mask ratio must lie between 0 and 1 (exclusive), got {mask_ratio}")
    if int(block_size) < 1:
        raise PretextSettingsError(f"the mask block size must be >= 1 voxel, got {block_size}")
    grid, _ = block_grid(view_size, block_size)
    if int(mask_ratio * int(np.prod(grid))) < 1:
        raise PretextSettingsError(f"a view of {list(view_size)} has {int(np.prod(grid))} blocks of {block_size} "
                                   f"voxels: mask ratio {mask_ratio} masks none; use smaller blocks or a larger view")


class MaskedViewSampler:
    """Draws masked-reconstruction samples from preprocessed cases: ``draw(key) -> (view (C, *size), mask
    (1, *size))``, fixed by the key and the seed (:mod:`nnunet_tpp.pretext.feed`).

    Args:
        dataset: an nnU-Net dataset object (``load_case(identifier) -> (data, seg, seg_prev, properties)``).
        identifiers: the cases to draw from.
        view_size: the view per axis (the network's input: a multiple of its pooling).
        block_size, mask_ratio: the masking (see the module docstring).
        seed: random seed.
    """

    def __init__(self, dataset, identifiers: list[str], view_size, block_size: int = 16, mask_ratio: float = 0.75,
                 seed: int = 0):
        if not identifiers:
            raise ValueError("no training cases to draw pretext views from")
        check_mask_settings(mask_ratio, block_size, view_size)
        self.dataset, self.identifiers = dataset, list(identifiers)
        self.view_size = tuple(int(v) for v in view_size)
        self.block_size, self.mask_ratio, self.seed = int(block_size), float(mask_ratio), int(seed)
        self.mirror = MirrorTransform(allowed_axes=tuple(range(len(self.view_size))))

    def draw(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: a random crop of a random case, mirrored, and its block mask."""
        from nnunet_tpp.pretext.feed import seeded
        with seeded((self.seed, *key)) as rng:
            identifier = self.identifiers[int(rng.integers(len(self.identifiers)))]
            image = self.dataset.load_case(identifier)[0]
            view = torch.from_numpy(crop_or_pad(image, self.view_size, rng))
            view = self.mirror(image=view)["image"].contiguous()
            return view, block_mask(self.view_size, self.block_size, self.mask_ratio, rng)

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``(views (B, C, *size), masks (B, 1, *size))``."""
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def crop_or_pad(image, size, rng: np.random.Generator) -> np.ndarray:
    """A crop of ``size`` at a uniform position of ``image`` (C, *spatial) as float32; axes shorter than ``size``
    are padded with 0 on both sides (at a random offset)."""
    spatial = image.shape[1:]
    starts = [int(rng.integers(0, max(s - v, 0) + 1)) for s, v in zip(spatial, size)]
    crop = np.asarray(image[(slice(None),) + tuple(slice(a, a + v) for a, v in zip(starts, size))],
                      dtype=np.float32)
    if crop.shape[1:] == tuple(size):
        return np.ascontiguousarray(crop)
    out = np.zeros((crop.shape[0], *size), dtype=np.float32)
    offsets = [int(rng.integers(0, v - c + 1)) for c, v in zip(crop.shape[1:], size)]
    out[(slice(None),) + tuple(slice(o, o + c) for o, c in zip(offsets, crop.shape[1:]))] = crop
    return out
