"""``nnunet-tpp evidence`` end to end on real MRI (CHAOS upstream, a left-atrium downstream cut to 8 thick slices,
two volumes per subject), a very short schedule: the report, the split, the TPP stage's images, resume and reuse."""
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.cli import main
from tests.conftest import LA2018, SHARED, require

CHAOS = SHARED / "data" / "mri3d" / "chaos_t2"
ARGS = ["--seeds", "1", "--labelled", "2", "--epochs", "1", "--iters", "2", "--upstream-epochs", "1",
        "--pretext-epochs", "1", "--voxels", "20000", "--arms", "conv_adapter,conv_adapter_tpp_mae",
        "--group", r"(la\d+)_"]


def _few_slices(source, out, slices=8):
    """The volume resampled to ``slices`` thick slices along its last axis (cine-MRI-like anisotropy)."""
    image = sitk.ReadImage(str(source))
    size, spacing = list(image.GetSize()), list(image.GetSpacing())
    spacing[2], size[2] = spacing[2] * size[2] / slices, slices
    nearest = "labels" in source.name
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                              image.GetOrigin(), spacing, image.GetDirection(), 0, image.GetPixelID())
    sitk.WriteImage(resampled, str(out))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    up, down = root / "up", root / "down"
    up.mkdir()
    down.mkdir()
    for name in ("chaos_01", "chaos_02", "chaos_03"):
        for suffix in ("", "_labels"):
            (up / f"{name}{suffix}.nii.gz").symlink_to(require(CHAOS / f"{name}{suffix}.nii.gz"))
    (up / "labels.json").write_text((CHAOS / "labels.json").read_text())
    for i in range(5):  # 5 subjects, two volumes each (the second one flipped), 8 slices of ~6 mm
        for frame in (0, 1):
            for suffix in ("", "_labels"):
                target = down / f"la{i:03d}_f{frame}{suffix}.nii.gz"
                _few_slices(require(LA2018 / f"la_{i:03d}{suffix}.nii.gz"), target)
                if frame:
                    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(target)), [True, False, False]), str(target))
    (down / "labels.json").write_text((LA2018 / "labels.json").read_text())
    return up, down, root / "out"


def test_the_protocol_reports_every_arm_on_whole_test_subjects_and_resumes(folders, capsys):
    up, down, out = folders
    assert main(["evidence", "--upstream", str(up), "--downstream", str(down), "--out", str(out), *ARGS]) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    assert set(evidence["arms"]) == {"conv_adapter", "conv_adapter_tpp_mae"}
    test, pool = evidence["split"]["test"], evidence["split"]["pool"]
    assert len(test) == 2 and test[0][:5] == test[1][:5] and not {t[:5] for t in test} & {p[:5] for p in pool}
    for arm in evidence["arms"].values():
        assert sorted(r["case"] for r in arm["per_case"]) == sorted(f"{t}.nii.gz" for t in test)
        assert set(arm["dice"]) == {"left_atrium"} and isinstance(arm["learnt"], bool)
    assert len(evidence["untrained"]["per_case"]) == 2
    for key in ("conv_adapter_tpp_mae - conv_adapter",):
        assert evidence["paired"][key]["n"] == 2 and len(evidence["paired"][key]["ci95"]) == 2
    downstream = evidence["plan"]["downstream"]
    assert downstream["patch_size"][0] <= 8 and any(p[0] == 1 for p in downstream["pool_sizes"])  # thick slices kept
    assert (out / "evidence.png").stat().st_size > 0 and "paired difference" in (out / "evidence.md").read_text()
    # the TPP stage drew from the whole training pool (8 cases), the supervised stage from the 2 labelled ones
    log = next((out / "runs" / "conv_adapter_tpp_mae").rglob("training_log_*.txt")).read_text()
    assert re.search(r"pretext stage on 8 training cases", log)
    assert json.loads(next(out.rglob("splits_final.json")).read_text())[0]["train"] == evidence["split"]["labelled"]["0"]

    # a stopped run resumes: finished arms are read back, the upstream model and the data are reused
    kept = (out / "runs" / "conv_adapter" / "seed_0" / "result.json").read_text()
    (out / "runs" / "conv_adapter_tpp_mae" / "seed_0" / "result.json").unlink()
    (out / "evidence.json").unlink()
    capsys.readouterr()
    assert main(["evidence", "--upstream", str(up), "--downstream", str(down), "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "conv_adapter, seed 0: finished earlier" in printed and "[upstream] pre-trained STU-Net-S: reused" in printed
    assert "nnUNetv2_train" not in printed and "nnUNetv2_predict" in printed  # the trained arm is only predicted
    assert (out / "runs" / "conv_adapter" / "seed_0" / "result.json").read_text() == kept
    again = json.loads((out / "evidence.json").read_text())
    assert again["arms"]["conv_adapter_tpp_mae"]["per_case"] == evidence["arms"]["conv_adapter_tpp_mae"]["per_case"]
    assert np.isfinite(again["arms"]["conv_adapter"]["dice_mean"])
