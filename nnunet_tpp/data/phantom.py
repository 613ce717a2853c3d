"""A procedurally generated, deterministic abdominal CT phantom: body, fat, spine, a liver-like organ with
hypodense lesions and two kidney-like organs, in Hounsfield units with noise.

Labels: 0 background, 1 liver, 2 kidney, 3 lesion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

__all__ = ["LABELS", "make_phantom", "write_phantom_case"]

LABELS = {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    z, y, x = grid
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def make_phantom(seed: int, shape: tuple[int, int, int] = (40, 56, 56)) -> tuple[np.ndarray, np.ndarray]:
    """Generates one phantom case.

    Args:
        seed: the case's random seed (same seed, same case).
        shape: (z, y, x) voxels; the anatomy scales with it.
    Returns:
        ``(image, label)``: float32 HU volume and uint8 label volume, both (z, y, x).
    """
    rng = np.random.default_rng(seed)
    zs, ys, xs = shape
    grid = np.meshgrid(np.arange(zs), np.arange(ys), np.arange(xs), indexing="ij")
    j = lambda scale: 1.0 + rng.uniform(-scale, scale)  # noqa: E731  (size jitter)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    body_c = (zs / 2, ys * 0.52, xs / 2)
    body = _ellipsoid(grid, body_c, (zs * 0.9, ys * 0.40 * j(0.05), xs * 0.46 * j(0.05)))
    inner = _ellipsoid(grid, body_c, (zs * 0.9, ys * 0.36 * j(0.03), xs * 0.42 * j(0.03)))
    image[body] = -100.0  # subcutaneous fat
    image[inner] = 35.0   # soft tissue
    spine = _ellipsoid(grid, (zs / 2, ys * 0.78, xs / 2), (zs * 0.9, ys * 0.07, xs * 0.06))
    image[spine & inner] = 450.0

    liver_c = (zs * rng.uniform(0.45, 0.55), ys * rng.uniform(0.42, 0.5), xs * rng.uniform(0.30, 0.36))
    liver_r = (zs * 0.30 * j(0.1), ys * 0.20 * j(0.1), xs * 0.20 * j(0.1))
    liver = _ellipsoid(grid, liver_c, liver_r) & inner & ~spine
    image[liver] = 60.0
    label[liver] = 1
    for _ in range(rng.integers(1, 4)):
        offset = rng.uniform(-0.5, 0.5, size=3) * np.array(liver_r)
        radius = min(liver_r) * rng.uniform(0.22, 0.38)
        lesion = _ellipsoid(grid, tuple(np.array(liver_c) + offset), (radius,) * 3) & liver
        image[lesion] = rng.uniform(5.0, 25.0)
        label[lesion] = 3

    for side in (-1, 1):
        kidney_c = (zs * rng.uniform(0.45, 0.6), ys * 0.66, xs * (0.5 + side * 0.2 * j(0.05)))
        kidney = _ellipsoid(grid, kidney_c, (zs * 0.18 * j(0.1), ys * 0.10 * j(0.1), xs * 0.08 * j(0.1)))
        kidney &= inner & (label == 0) & ~spine
        image[kidney] = 160.0
        label[kidney] = 2

    image = gaussian_filter(image, sigma=0.7) + rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return image.astype(np.float32), label


def write_phantom_case(folder: Path, name: str, seed: int, shape=(40, 56, 56), spacing=(3.0, 2.5, 2.5)
                       ) -> tuple[Path, Path]:
    """Writes ``NAME.nii.gz`` and ``NAME_labels.nii.gz`` (spacing given as z, y, x in mm).

    Returns:
        ``(image_path, label_path)``.
    """
    image, label = make_phantom(seed, shape)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}.nii.gz", folder / f"{name}_labels.nii.gz"
    for array, path in zip((image, label), paths):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        itk.SetOrigin((-100.0, -120.0, 50.0 + seed))
        sitk.WriteImage(itk, str(path), useCompression=True)
    return paths
