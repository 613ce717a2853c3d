"""A CPU-sized nnU-Net plan for the evidence protocol, made by nnU-Net's own planner.

The images are resampled so that the median case fits a voxel budget (:func:`target_spacing`: the finest axes are
coarsened first, an axis already coarser than the target keeps its spacing, so a stack of 6-10 thick slices keeps
all its slices), then ``nnUNetv2_plan_and_preprocess -overwrite_target_spacing`` plans patch and pooling as it
would for any data (no pooling along a short axis). The plan's batch size is then set to the protocol's (plans are
data). ``--full`` skips both and keeps nnU-Net's own plan.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tpp.nnunet_commands import run_nnunet


def header_geometry(images: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The median spacing and the median size (nnU-Net's axis order, z y x) read from the image headers only."""
    spacings, sizes = [], []
    for path in images:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        spacings.append(reader.GetSpacing()[::-1])
        sizes.append(reader.GetSize()[::-1])
    return np.median(np.array(spacings, float), 0), np.median(np.array(sizes, float), 0)


def target_spacing(spacing, size, voxels: int) -> list[float]:
    """The spacing at which an image of ``size`` voxels at ``spacing`` has at most ``voxels`` voxels: every axis
    finer than a threshold ``t`` is resampled to ``t`` (the smallest such ``t``, found by bisection), the others
    keep their spacing. Returns ``spacing`` itself when the image already fits."""
    spacing, size = np.asarray(spacing, float), np.asarray(size, float)
    extent = spacing * size

    def count(t: float) -> float:
        return float(np.prod(extent / np.maximum(spacing, t)))

    if count(0.0) <= voxels:
        return [float(s) for s in spacing]
    lo, hi = float(spacing.min()), float(extent.max())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count(mid) <= voxels else (mid, hi)
    return [float(s) for s in np.maximum(spacing, hi)]


def plan_and_preprocess(dataset_id: int, images: list[Path], voxels: int | None, batch_size: int | None, env: dict,
                        log: Path, echo=print) -> dict:
    """Plans and preprocesses one raw dataset (``3d_fullres``).

    Args:
        images: the dataset's image files (headers read for the spacing).
        voxels: the median case's voxel budget (None: nnU-Net's own target spacing).
        batch_size: written into the plan (None: nnU-Net's).
    Returns:
        ``{"spacing", "patch_size", "batch_size", "pool_sizes", "median_size", "seconds"}`` of the plan.
    """
    args = ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1", "-npfp", "1"]
    if voxels is not None:
        spacing, size = header_geometry(images)
        args += ["-overwrite_target_spacing", *[f"{s:.4f}" for s in target_spacing(spacing, size, voxels)]]
    seconds = run_nnunet(args, env, log, echo)
    plans_file = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{int(dataset_id):03d}_*/nnUNetPlans.json"))
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    if batch_size is not None and config["batch_size"] != batch_size:
        config["batch_size"] = int(batch_size)
        plans_file.write_text(json.dumps(plans, indent=2))
    return {"spacing": config["spacing"], "patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "pool_sizes": config["architecture"]["arch_kwargs"]["strides"][1:],
            "median_size": config["median_image_size_in_voxels"], "seconds": seconds}
