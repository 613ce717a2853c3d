"""Raw dataset writing: checks before writing, sources untouched."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.data.nnunet_raw import Case, DatasetError, cases_from_folder, write_raw_dataset
from tests.conftest import CT_IMAGE, CT_LABELS, require

LABELS = {"background": 0, "liver": 1, "kidney": 2}


def test_writes_an_nnunet_raw_dataset_from_the_real_ct(tmp_path):
    folder = write_raw_dataset(tmp_path, 7, "CT", [Case("ct", require(CT_IMAGE), require(CT_LABELS))], LABELS)
    assert (folder / "imagesTr" / "ct_0000.nii.gz").exists() and (folder / "labelsTr" / "ct.nii.gz").exists()
    written = sitk.ReadImage(str(folder / "imagesTr" / "ct_0000.nii.gz"))
    original = sitk.ReadImage(str(CT_IMAGE))
    assert written.GetSize() == original.GetSize() and written.GetSpacing() == original.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    with pytest.raises(DatasetError, match="exists"):
        write_raw_dataset(tmp_path, 7, "CT", [Case("ct", CT_IMAGE, CT_LABELS)], LABELS)


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_labels_outside_the_label_set_are_named(tmp_path):
    _write(tmp_path / "a.nii.gz", np.zeros((16, 16, 16), np.float32))
    _write(tmp_path / "a_labels.nii.gz", np.full((16, 16, 16), 5, np.uint8))
    with pytest.raises(DatasetError, match=r"a_labels.nii.gz: label values \[5\] are not in the dataset's label set"):
        write_raw_dataset(tmp_path / "raw", 8, "X", cases_from_folder(tmp_path), LABELS)
    assert not (tmp_path / "raw").exists()


def test_two_channel_images_and_mismatched_grids_are_rejected(tmp_path):
    two = sitk.Compose(*[sitk.GetImageFromArray(np.zeros((16, 16, 16), np.float32))] * 2)
    sitk.WriteImage(two, str(tmp_path / "b.nii.gz"))
    _write(tmp_path / "b_labels.nii.gz", np.zeros((16, 16, 16), np.uint8))
    with pytest.raises(DatasetError, match="expected a 3-D single-channel image, found 3-D with 2 component"):
        write_raw_dataset(tmp_path / "raw", 9, "X", cases_from_folder(tmp_path), LABELS)
    _write(tmp_path / "b.nii.gz", np.zeros((16, 16, 16), np.float32), spacing=(2.0, 2.0, 2.0))
    with pytest.raises(DatasetError, match="does not match its image"):
        write_raw_dataset(tmp_path / "raw", 9, "X", cases_from_folder(tmp_path), LABELS)


def test_image_without_label_is_named(tmp_path):
    _write(tmp_path / "c.nii.gz", np.zeros((16, 16, 16), np.float32))
    with pytest.raises(DatasetError, match="c.nii.gz has no label file"):
        cases_from_folder(tmp_path)
