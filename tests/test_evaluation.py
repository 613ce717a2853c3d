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


# --- nothing dropped or ignored silently (issue 15) -------------------------------------------------------------

CT3 = {"background": 0, "liver": 1, "kidney": 2}


def _snapshot(*folders):
    """Every file under the folders with a hash of its bytes (to prove a refused command wrote nothing)."""
    import hashlib
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def _write(arr, like, path):
    image = sitk.GetImageFromArray(arr.astype(np.uint8))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def ct_folders(tmp_path):
    """ref/ and pred/ with two cases cut from the real CT labels (a: exact, b: shifted two voxels)."""
    labels = sitk.ReadImage(str(require(CT_LABELS)))[:, :, 30:90]
    arr = sitk.GetArrayFromImage(labels)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for name, p in (("a", arr), ("b", np.roll(arr, 2, axis=2))):
        _write(arr, labels, ref / f"{name}.nii.gz")
        _write(p, labels, pred / f"{name}.nii.gz")
    return tmp_path, ref, pred, labels, arr


def test_a_missing_prediction_is_an_error_naming_the_case(ct_folders, capsys):
    from nnunet_tpp.cli import main
    from nnunet_tpp.evaluation import EvaluationError
    tmp, ref, pred, _, _ = ct_folders
    (pred / "b.nii.gz").unlink()
    before = _snapshot(tmp)
    with pytest.raises(EvaluationError, match=r"1 of 2 reference case\(s\) have no prediction .*b\.nii\.gz.*"
                                              r"--allow-missing"):
        evaluate_folder(ref, pred, CT3)
    assert main(["evaluate", str(ref), str(pred), "--labels", json.dumps(CT3), "--json", str(tmp / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "nothing was evaluated" in err and "weights_only" not in err
    assert _snapshot(tmp) == before and not (tmp / "m.json").exists()


def test_allow_missing_scores_the_case_as_worst_and_says_so(ct_folders, capsys):
    from nnunet_tpp.cli import main
    tmp, ref, pred, labels, arr = ct_folders
    (pred / "b.nii.gz").unlink()
    assert main(["evaluate", str(ref), str(pred), "--labels", json.dumps(CT3), "--allow-missing",
                 "--json", str(tmp / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 case(s) had no prediction and are scored as Dice 0 / HD95 = image diagonal" in out
    saved = json.loads((tmp / "m.json").read_text())
    assert saved["units"] == {"dice": "fraction", "hd95": "mm"}
    assert saved["missing_cases"] == ["b.nii.gz"] and saved["num_cases"] == 2
    diagonal = float(np.linalg.norm(np.array(labels.GetSize()) * np.array(labels.GetSpacing())))
    case_b = next(c for c in saved["per_case"] if c["case"] == "b.nii.gz")
    assert case_b["missing"] is True
    assert case_b["labels"] == {"liver": {"dice": 0.0, "hd95": pytest.approx(diagonal)},
                                "kidney": {"dice": 0.0, "hd95": pytest.approx(diagonal)}}
    assert saved["per_label"]["liver"]["dice"] == pytest.approx(0.5)  # (1 + 0) / 2: the missing case counts


def test_unknown_label_values_are_listed_by_file_and_value(ct_folders, capsys):
    from nnunet_tpp.cli import main
    tmp, ref, pred, labels, arr = ct_folders
    bad = arr.copy()
    bad[0, 0, :3] = 7
    _write(bad, labels, pred / "a.nii.gz")
    bad_ref = arr.copy()
    bad_ref[0, 0, 0] = 3
    _write(bad_ref, labels, ref / "b.nii.gz")
    before = _snapshot(tmp)
    assert main(["evaluate", str(ref), str(pred), "--labels", json.dumps(CT3), "--json", str(tmp / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "label values the dataset does not have" in err
    assert f"{pred / 'a.nii.gz'}: [7]" in err and f"{ref / 'b.nii.gz'}: [3]" in err
    assert _snapshot(tmp) == before


def test_a_prediction_without_reference_is_an_error_naming_it(ct_folders):
    from nnunet_tpp.evaluation import EvaluationError
    tmp, ref, pred, labels, arr = ct_folders
    _write(arr, labels, pred / "c.nii.gz")
    before = _snapshot(tmp)
    with pytest.raises(EvaluationError, match=r"1 prediction\(s\) have no reference .*c\.nii\.gz"):
        evaluate_folder(ref, pred, CT3, allow_missing=True)  # not something --allow-missing covers
    assert _snapshot(tmp) == before


def test_json_destination_is_checked_before_evaluating(ct_folders, capsys):
    from nnunet_tpp.cli import main
    tmp, ref, pred, _, _ = ct_folders
    before = _snapshot(tmp)
    assert main(["evaluate", str(ref), str(pred), "--labels", json.dumps(CT3),
                 "--json", str(tmp / "no_such_dir" / "m.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert _snapshot(tmp) == before and not (tmp / "no_such_dir").exists()


def test_subset_of_cases_and_ignore_label(ct_folders):
    tmp, ref, pred, labels, arr = ct_folders
    (pred / "b.nii.gz").unlink()
    result = evaluate_folder(ref, pred, CT3, cases=["a"])  # e.g. one fold's validation cases
    assert [c["case"] for c in result.per_case] == ["a.nii.gz"] and result.per_label["liver"]["dice"] == 1.0
    # an ignore label (nnU-Net's dataset.json "ignore"): its voxels count neither way, and it is not scored
    with_ignore = arr.copy()
    with_ignore[:, :, :10] = 9
    _write(with_ignore, labels, ref / "a.nii.gz")
    noisy = arr.copy()
    noisy[:, :, :10] = 1
    _write(noisy, labels, pred / "a.nii.gz")
    result = evaluate_folder(ref, pred, {**CT3, "ignore": 9}, cases=["a"])
    assert set(result.per_label) == {"liver", "kidney"} and result.per_label["liver"]["dice"] == 1.0


def test_one_fold_against_all_references(ct_folders, monkeypatch, capsys):
    """gt_segmentations holds every case, a fold's validation folder only that fold's: --fold names the cases."""
    from nnunet_tpp.cli import main
    tmp, ref, pred, _, _ = ct_folders
    (pred / "b.nii.gz").unlink()
    pre = tmp / "pre" / "Dataset043_CT"
    pre.mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps({"labels": CT3}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["b"], "val": ["a"]}, {"train": ["a"], "val": ["b"]}]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp / "pre"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["evaluate", str(ref), str(pred), "-d", "43", "--fold", "0"]) == 0
    assert "(1 cases;" in capsys.readouterr().out
    assert main(["evaluate", str(ref), str(pred), "-d", "43", "--fold", "1"]) == 2  # b's prediction is missing
    assert "b.nii.gz" in capsys.readouterr().err
