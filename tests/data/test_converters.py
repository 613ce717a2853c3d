"""LiTS / KiTS converters on small release layouts built from the real CT in ../shared/data/ct."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.cli import main
from nnunet_tpp.data.converters import convert, label_values
from nnunet_tpp.data.nnunet_raw import DatasetError
from tests.conftest import CT_IMAGE, CT_LABELS, require


def _ct():
    return sitk.ReadImage(str(require(CT_IMAGE))), sitk.ReadImage(str(require(CT_LABELS)))


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lits_challenge_layout(tmp_path):
    image, labels = _ct()
    src = tmp_path / "LiTS" / "Training Batch 1"
    src.mkdir(parents=True)
    for n in (0, 3):
        sitk.WriteImage(image, str(src / f"volume-{n}.nii"))
        sitk.WriteImage(labels, str(src / f"segmentation-{n}.nii"))  # 1 liver, 2 (kidney) stands in for tumor
    before = _snapshot(tmp_path / "LiTS")
    folder = convert("lits", tmp_path / "LiTS", tmp_path / "raw", 3)
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "liver": 1, "tumor": 2} and info["numTraining"] == 2
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["lits000_0000.nii.gz", "lits003_0000.nii.gz"]
    assert label_values(folder / "labelsTr" / "lits003.nii.gz") == [0, 1, 2]
    assert _snapshot(tmp_path / "LiTS") == before


def test_msd_task03_layout(tmp_path):
    image, labels = _ct()
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "Task03_Liver" / sub).mkdir(parents=True)
    sitk.WriteImage(image, str(tmp_path / "Task03_Liver" / "imagesTr" / "liver_7.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "Task03_Liver" / "labelsTr" / "liver_7.nii.gz"))
    folder = convert("lits", tmp_path / "Task03_Liver", tmp_path / "raw", 4, name="MSDLiver")
    assert folder.name == "Dataset004_MSDLiver"
    assert (folder / "labelsTr" / "liver007.nii.gz").exists()


def test_kits_layouts_with_cyst_and_bad_cases_reported_by_name(tmp_path):
    image, labels = _ct()
    arr = sitk.GetArrayFromImage(labels)
    with_cyst = sitk.GetImageFromArray(np.where(arr == 1, 3, arr).astype(np.uint8))  # liver voxels as "cyst"
    with_cyst.CopyInformation(labels)
    for n, seg_name, seg in ((0, "segmentation.nii.gz", labels), (1, "aggregated_MAJ_seg.nii.gz", with_cyst)):
        case = tmp_path / "kits" / f"case_{n:05d}"
        case.mkdir(parents=True)
        sitk.WriteImage(image, str(case / "imaging.nii.gz"))
        sitk.WriteImage(seg, str(case / seg_name))
    bad = tmp_path / "kits" / "case_00002"
    bad.mkdir()
    (bad / "imaging.nii.gz").write_bytes(b"corrupt")
    (bad / "segmentation.nii.gz").write_bytes(b"corrupt")
    small = tmp_path / "kits" / "case_00003"
    small.mkdir()
    sitk.WriteImage(image, str(small / "imaging.nii.gz"))
    sitk.WriteImage(labels[:, :, :50], str(small / "segmentation.nii.gz"))

    with pytest.raises(DatasetError) as err:
        convert("kits", tmp_path / "kits", tmp_path / "raw", 5)
    assert "kits00002" in str(err.value) and "kits00003" in str(err.value) and "does not match" in str(err.value)
    assert not (tmp_path / "raw").exists()

    assert main(["convert", "kits", str(tmp_path / "kits"), "-d", "5", "--raw", str(tmp_path / "raw"),
                 "--skip-invalid"]) == 0
    folder = tmp_path / "raw" / "Dataset005_KiTS"
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3} and info["numTraining"] == 2
    assert set(json.loads((folder / "skipped_cases.json").read_text())) == {"kits00002", "kits00003"}


def test_empty_source_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetError, match="volume-N.nii"):
        convert("lits", tmp_path, tmp_path / "raw", 6)
