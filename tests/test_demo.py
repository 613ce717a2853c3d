"""The main job, ``nnunet-tpp demo``, on a tiny schedule: phantom -> nnU-Net -> table, whose labels are marked
learnt only where their Dice lies above chance (:mod:`nnunet_tpp.demo.report`)."""
import json

import pytest

from nnunet_tpp.cli import main
from nnunet_tpp.demo.report import NOT_LEARNT, chance_dice

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end_and_reports(tmp_path, capsys):
    work = tmp_path / "work"
    code = main(["demo", "--work-dir", str(work), "--epochs", "1", "--iters", "2", "--upstream-epochs", "1",
                 "--dataset-id", "521"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| label / region | Dice | HD95 (mm) | untrained Dice | chance Dice | learnt |" in out
    assert "trainable %" in out
    summary = json.loads((work / "demo_summary.json").read_text())
    assert set(summary["dice"]) == {"liver", "kidney", "lesion"}
    labels_ts = work / "nnUNet_raw" / "Dataset521_Demo" / "labelsTs"
    assert summary["chance_dice"] == chance_dice(labels_ts, {"background": 0, "liver": 1, "kidney": 2, "lesion": 3})
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for label, dice in summary["dice"].items():  # learnt exactly where the Dice beats both floors, and said so
        above = dice > summary["chance_dice"][label] and dice > summary["untrained_dice"][label]
        assert summary["learnt"][label] == above
        assert rows[label].endswith("| yes |" if above else f"| {NOT_LEARNT} |")
    assert ("Not learnt by this schedule (1 epochs x 2 iterations): " in out) == (not all(summary["learnt"].values()))
    assert (work / "predictions_untrained" / "test100.nii.gz").exists()
    assert 0 < float(summary["trainable_percent"]) < 5
    assert (work / "predictions" / "test100.nii.gz").exists()


def test_demo_with_bad_data_folder_fails_clearly(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "case1.nii.gz").write_bytes(b"not a nifti")
    (data / "case1_labels.nii.gz").write_bytes(b"not a nifti")
    (data / "labels.json").write_text('{"background": 0, "liver": 1}')
    code = main(["demo", "--work-dir", str(tmp_path / "w"), "--data", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert "case1.nii.gz" in err and "not a valid image file" in err
    assert (data / "case1.nii.gz").read_bytes() == b"not a nifti"
