"""The CPU-sized target spacing: the budget is met, thick slices keep their spacing."""
import numpy as np
import pytest

from nnunet_tpp.evidence.plan3d import target_spacing


@pytest.mark.parametrize("spacing, size", [((7.7, 1.25, 1.25), (36, 256, 256)), ((1.25, 1.25, 1.25), (88, 144, 192)),
                                           ((8.0, 1.5, 1.5), (8, 192, 192))])
def test_the_median_case_fits_the_budget_without_resampling_thick_slices_finer(spacing, size):
    target = np.array(target_spacing(spacing, size, 40000))
    voxels = np.prod(np.array(spacing) * np.array(size) / target)
    assert voxels <= 40000 * 1.001 and voxels > 40000 * 0.95  # the finest spacing that fits
    assert (target >= np.array(spacing) - 1e-9).all()
    if spacing[0] >= target[1]:  # a stack of thick slices keeps all its slices
        assert target[0] == spacing[0]


def test_an_image_that_fits_keeps_its_spacing():
    assert target_spacing((2.0, 1.0, 1.0), (10, 50, 50), 40000) == [2.0, 1.0, 1.0]
