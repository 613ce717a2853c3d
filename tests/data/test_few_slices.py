"""nnU-Net plans volumes with few slices (cardiac cine MRI, 6-10 slices) by not pooling along the short axis, so the
raw-dataset writer accepts them; the checks that are right stay (3-D single channel, label on the image's grid)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.data.nnunet_raw import Case, DatasetError, write_raw_dataset


def _volume(path, shape=(9, 40, 48), spacing=(1.5, 1.5, 8.0), label=False):
    array = (np.arange(np.prod(shape)).reshape(shape) % 3 if label else np.random.default_rng(0).normal(size=shape))
    image = sitk.GetImageFromArray(array.astype(np.uint8 if label else np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_a_volume_of_nine_slices_is_accepted(tmp_path):
    image, label = _volume(tmp_path / "a.nii.gz"), _volume(tmp_path / "a_labels.nii.gz", label=True)
    folder = write_raw_dataset(tmp_path / "raw", 801, "FewSlices", [Case("a", image, label)],
                               {"background": 0, "one": 1, "two": 2}, channel_name="MRI")
    written = sitk.ReadImage(str(folder / "imagesTr" / "a_0000.nii.gz"))
    assert written.GetSize() == (48, 40, 9)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1


def test_a_label_off_the_images_grid_is_still_refused(tmp_path):
    image = _volume(tmp_path / "a.nii.gz")
    label = _volume(tmp_path / "a_labels.nii.gz", shape=(8, 40, 48), label=True)
    with pytest.raises(DatasetError, match="does not match its image"):
        write_raw_dataset(tmp_path / "raw", 802, "FewSlices", [Case("a", image, label)],
                          {"background": 0, "one": 1, "two": 2}, channel_name="MRI")
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())
