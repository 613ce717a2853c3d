"""Shared fixtures: paths to the real test data in ../shared and small STU-Nets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNUNET_TPP_SHARED", REPO.parent / "shared"))
CT_IMAGE = SHARED / "data" / "ct" / "abdomen_ct_001.nii.gz"
CT_LABELS = SHARED / "data" / "ct" / "abdomen_ct_001_labels.nii.gz"
REFERENCE = SHARED / "reference"
PNEUMONIA = SHARED / "data" / "2d" / "pneumoniamnist_balanced.npz"


def require(path: Path) -> Path:
    """The path, or a test failure that says where the shared data was expected."""
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set NNUNET_TPP_SHARED to the shared/ folder)")
    return path


def balanced_pneumonia_subset(out: Path, sizes: dict[str, int]) -> Path:
    """Writes ``out`` (.npz): the first ``sizes[split]`` images of each split of the shared PneumoniaMNIST file,
    half of each class (the file is sorted by class); returns ``out``."""
    import numpy as np
    data = np.load(require(PNEUMONIA))
    arrays = {}
    for split, n in sizes.items():
        labels = data[f"{split}_labels"].reshape(-1)
        keep = np.concatenate([np.flatnonzero(labels == c)[:n // 2] for c in (0, 1)])
        arrays.update({f"{split}_images": data[f"{split}_images"][keep], f"{split}_labels": labels[keep]})
    np.savez(out, **arrays)
    return out


@pytest.fixture
def tiny_stunet():
    """A factory for small STU-Nets (size S widths, 2 classes) with a fixed seed."""
    from nnunet_tpp.models.stunet import build_stunet

    def make(size: str = "S", channels: int = 1, classes: int = 3, seed: int = 0):
        torch.manual_seed(seed)
        return build_stunet(size, channels, classes)
    return make


@pytest.fixture
def micro_stunet():
    """A factory for very small STU-Nets (the published layout: 6 stages, 5 poolings, depth 1 or 2) for tests that
    train: a step at 16^3 takes milliseconds."""
    from nnunet_tpp.models.stunet import STUNet

    def make(classes: int = 3, seed: int = 0, depth: int = 1, channels: int = 1):
        torch.manual_seed(seed)
        return STUNet(channels, classes, [depth] * 6, [8, 16, 16, 16, 16, 16], [[2, 2, 2]] * 4 + [[1, 1, 1]],
                      size_name="micro")
    return make
