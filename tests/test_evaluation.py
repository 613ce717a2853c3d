"""Dice / HD95 against hand-computed values, regions, empty-mask convention, geometry check."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.evaluation import dice_hd95, evaluate_folder, regions_for
from tests.conftest import CT_LABELS, require


def test_dice_and_hd95_by_hand():
    ref = np.zeros((1, 1, 20), bool)
    pred = np.zeros((1, 1, 20), bool)
    ref[0, 0, 2:6] = True      # 4 voxels
    pred[0, 0, 4:10] = True    # 6 voxels, 2 shared
    dice, hd = dice_hd95(ref, pred, (1.0, 1.0, 2.0))
    assert dice == pytest.approx(2 * 2 / (4 + 6))
    # a one-voxel-thin line is all surface. pred->ref distances (mm, 2 mm voxels): 0 0 2 4 6 8, whose 95th
    # percentile (linear interpolation) is 7.5; ref->pred: 4 2 0 0 -> 3.7; the symmetric HD95 is the larger
    assert hd == pytest.approx(7.5)


def test_empty_mask_convention():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert dice_hd95(empty, empty, (1, 1, 1)) == (1.0, 0.0)
    dice, hd = dice_hd95(full, empty, (1.0, 2.0, 3.0))
    assert dice == 0.0 and hd == pytest.approx(np.sqrt(4 ** 2 + 8 ** 2 + 12 ** 2))


def test_regions_follow_the_challenges():
    assert regions_for({"liver": 1, "tumor": 2}) == {"liver (liver+tumor)": [1, 2], "tumor": [2]}
    assert regions_for({"kidney": 1, "tumor": 2, "cyst": 3}) == {"kidney+masses": [1, 2, 3], "masses": [2, 3],
                                                                  "tumor": [2]}
    assert regions_for({"liver": 1, "kidney": 2}) == {}


def test_evaluate_folder_on_the_real_ct_labels(tmp_path):
    labels = sitk.ReadImage(str(require(CT_LABELS)))
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(labels, str(tmp_path / "ref" / "ct.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    shifted = np.roll(arr, 2, axis=2)  # two voxels along x: 2 x 3 mm
    pred = sitk.GetImageFromArray(shifted.astype(arr.dtype))
    pred.CopyInformation(labels)
    sitk.WriteImage(pred, str(tmp_path / "pred" / "ct.nii.gz"))
    result = evaluate_folder(tmp_path / "ref", tmp_path / "pred", {"background": 0, "liver": 1, "kidney": 2})
    assert 0.8 < result.per_label["liver"]["dice"] < 1.0
    assert result.per_label["liver"]["hd95"] == pytest.approx(6.0, abs=0.5)
    assert json.loads(json.dumps(result.to_json()))["per_case"][0]["case"] == "ct.nii.gz"
    moved = sitk.GetImageFromArray(arr)
    moved.CopyInformation(labels)
    moved.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(moved, str(tmp_path / "pred" / "ct.nii.gz"))
    with pytest.raises(ValueError, match="geometry"):
        evaluate_folder(tmp_path / "ref", tmp_path / "pred", {"background": 0, "liver": 1})


def test_evaluate_command_reads_labels_from_the_dataset(tmp_path, monkeypatch, capsys):
    from nnunet_tpp.cli import main
    labels = sitk.ReadImage(str(require(CT_LABELS)))
    for sub in ("ref", "pred"):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(labels, str(tmp_path / sub / "ct.nii.gz"))
    raw = tmp_path / "raw" / "Dataset042_CT"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "kidney": 2}}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert main(["evaluate", str(tmp_path / "ref"), str(tmp_path / "pred"), "-d", "42",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert "| liver | 1.0000 | 0.0000 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["per_label"]["kidney"] == {"dice": 1.0, "hd95": 0.0}
