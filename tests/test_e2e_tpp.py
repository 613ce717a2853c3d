"""End to end: the TPP trainer through the stock ``nnUNetv2_train`` on real MRI (3 CHAOS T2 volumes of
``../shared/data/mri3d``, resampled to 10 slices of 3 x 3 mm: anisotropic, as few slices as cine MRI), with the
masked-reconstruction pretext and its control: the pretext moved the target parameters, the supervised stage
started from them, and the stage wrote its target check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.data.nnunet_raw import Case, write_raw_dataset
from nnunet_tpp.nnunet_commands import NNUNetFolders, run_nnunet
from tests.conftest import SHARED, require

pytestmark = pytest.mark.e2e
DATASET_ID = 631
CHAOS = SHARED / "data" / "mri3d" / "chaos_t2"
LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}


def _few_slices(src, dst, slices=10, in_plane=3.0, label=False):
    """``src`` resampled to ``slices`` slices and ``in_plane`` mm (linear; nearest for labels), written to ``dst``
    (the shared file is only read)."""
    image = sitk.ReadImage(str(require(src)))
    size, spacing = image.GetSize(), image.GetSpacing()
    new_spacing = (in_plane, in_plane, spacing[2] * size[2] / slices)
    new_size = [int(round(size[0] * spacing[0] / in_plane)), int(round(size[1] * spacing[1] / in_plane)), slices]
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        image.GetOrigin(), new_spacing, image.GetDirection(), 0, image.GetPixelID())
    sitk.WriteImage(out, str(dst))
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_tpp")
    folders = NNUNetFolders(root)
    folders.make()
    cases = []
    for name in ("chaos_01", "chaos_02", "chaos_03"):
        image = _few_slices(CHAOS / f"{name}.nii.gz", root / f"{name}.nii.gz")
        label = _few_slices(CHAOS / f"{name}_labels.nii.gz", root / f"{name}_labels.nii.gz", label=True)
        cases.append(Case(name, image, label))
    write_raw_dataset(folders.raw, DATASET_ID, "ChaosFew", cases, LABELS, channel_name="MRI")
    env = folders.env(NNUNET_TPP_EPOCHS="1", NNUNET_TPP_ITERS_PER_EPOCH="1", NNUNET_TPP_SKIP_VALIDATION="1",
                      NNUNET_TPP_PRETEXT_EPOCHS="2", NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH="2")
    log = root / "log.txt"
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
               env, log)
    plans_file = next(folders.preprocessed.rglob("nnUNetPlans.json"))
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    divisor = np.prod(np.array(config["architecture"]["arch_kwargs"]["strides"]), axis=0)
    # a small patch: two pooling divisors along the pooled axes (the short axis is left as nnU-Net planned it)
    config["patch_size"] = [int(p if d <= 2 else min(p, 2 * d)) for p, d in zip(config["patch_size"], divisor)]
    plans_file.write_text(json.dumps(plans, indent=2))
    recipe = root / "recipe.yaml"
    recipe.write_text("pretext: mae\npretext_control: true\npretext_eval_samples: 2\npretext_workers: 0\n")
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "TPPConvAdapterTrainer_S", "-device", "cpu"],
               dict(env, NNUNET_TPP_RECIPE=str(recipe)), log)
    fold = next(folders.results.rglob("TPPConvAdapterTrainer_S__nnUNetPlans__3d_fullres")) / "fold_all"
    return fold, log


def test_the_pretext_moved_the_target_parameters_and_fine_tuning_started_from_them(trained):
    fold, log = trained
    before = torch.load(fold / "tpp_initial_target_parameters.pth", weights_only=True)["target_parameters"]
    after = torch.load(fold / "tpp_target_parameters.pth", weights_only=True)["target_parameters"]
    assert before.keys() == after.keys() and before
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(".adapter." in n and "conv_blocks_context" in n for n in moved)  # encoder adapters
    assert any(".adapter." in n and "conv_blocks_localization" in n for n in moved)  # decoder adapters (mae)
    text = log.read_text()
    assert "masked-reconstruction pretext stage on 2 training cases" in text
    assert "supervised fine-tuning starts from the pre-trained target parameters" in text
    assert (fold / "tpp_progress.png").stat().st_size > 0 and (fold / "checkpoint_final.pth").exists()


def test_the_stage_wrote_its_target_check(trained):
    fold, _ = trained
    check = json.loads((fold / "tpp_target_check.json").read_text())
    assert check["pretext"] == "mae" and check["control_steps"] == 4 and check["eval_samples"] == 2
    for key in ("loss_trained", "loss_reset", "loss_control", "relative_change"):
        assert np.isfinite(check[key]) and check[key] > 0, key
    before = torch.load(fold / "tpp_initial_target_parameters.pth", weights_only=True)["target_parameters"]
    after = torch.load(fold / "tpp_target_parameters.pth", weights_only=True)["target_parameters"]
    diff = sum(float((after[n].double() - b.double()).pow(2).sum()) for n, b in before.items()) ** 0.5
    norm = sum(float(b.double().pow(2).sum()) for b in before.values()) ** 0.5
    assert check["relative_change"] == pytest.approx(diff / norm, rel=1e-6)
