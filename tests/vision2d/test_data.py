"""The 2D data layer on the real sets in ../shared/data/2d and on layouts built from them."""
import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nnunet_tpp.vision2d.data import DataError, image_mask_pairs, is_image_folder, load_dataset, load_image_folder
from tests.conftest import SHARED, require

D2 = SHARED / "data" / "2d"


def test_npz_keeps_the_given_splits_and_channels():
    splits = load_dataset(require(D2 / "pneumoniamnist_balanced.npz"), "cls", 32, in_chans=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2428, 270, 468)
    assert splits.num_classes == 2 and splits.in_chans == 3
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64
    assert torch.equal(splits.train.images[0][0], splits.train.images[0][2])  # grey repeated (before normalising)
    few = load_dataset(D2 / "pneumoniamnist_balanced.npz", "cls", 28, label_fraction=0.1, seed=3)
    assert np.bincount(few.train.targets.numpy()).tolist() == [121, 121]  # stratified 10 %
    assert len(few.test) == 468


@pytest.mark.parametrize("name,count", [("glas_mini", 22), ("lits2d_mini", 24)])
def test_image_mask_folders_split_deterministically(name, count):
    a = load_dataset(require(D2 / name), "seg", 64, seed=0)
    b = load_dataset(D2 / name, "seg", 64, seed=0)
    c = load_dataset(D2 / name, "seg", 64, seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == count
    assert set(a.train.targets.unique().tolist()) == {0, 1} and a.train.targets.shape[1:] == (64, 64)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split does not depend on the seed
    assert not torch.equal(a.train.images, c.train.images)


def test_segmentation_augmentation_keeps_image_and_mask_aligned():
    splits = load_dataset(D2 / "lits2d_mini", "seg", 32)
    # a synthetic sample whose mask is exactly "image > 0.5"
    img = torch.rand(1, 1, 32, 32)
    splits.train.images, splits.train.targets = img, (img[0, 0] > 0.5).long()[None]
    torch.manual_seed(0)
    for _ in range(8):
        image, mask = splits.train[0]
        assert torch.equal(mask, (image[0] * 0.5 + 0.5 > 0.5).long())


def _png(array, path):
    Image.fromarray(array).save(path)


def test_class_folders_and_mhist_layouts(tmp_path):
    data = np.load(D2 / "pneumoniamnist_balanced.npz")
    root = tmp_path / "cls"
    for i in range(20):
        label = int(data["train_labels"][i * 100].reshape(-1)[0])
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        _png(data["train_images"][i * 100], root / f"class{label}" / f"{i}.png")
    splits = load_dataset(root, "cls", 28)
    assert splits.layout == "class_folders" and splits.class_names == ["class0", "class1"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
    mhist = tmp_path / "mhist"
    (mhist / "images").mkdir(parents=True)
    with (mhist / "annotations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)",
                         "Partition"])
        for i in range(12):
            _png(data["train_images"][i], mhist / "images" / f"MHIST_{i}.png")
            writer.writerow([f"MHIST_{i}.png", "SSA" if i % 2 else "HP", 3, "test" if i >= 8 else "train"])
    splits = load_dataset(mhist, "cls", 28)
    assert splits.class_names == ["HP", "SSA"] and len(splits.test) == 4 and len(splits.train) + len(splits.val) == 8


def test_bad_data_is_named(tmp_path):
    root = tmp_path / "seg"
    shutil.copytree(D2 / "glas_mini", root)
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    (root / "masks" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset(root, "seg", 32)
    (root / "images" / "broken.jpg").unlink()
    with pytest.raises(DataError, match="no image for.*broken.jpg"):
        load_dataset(root, "seg", 32)
    (root / "masks" / "broken.jpg").unlink()
    first = sorted((root / "masks").iterdir())[0]
    Image.new("L", (10, 10)).save(first, format="JPEG")
    with pytest.raises(DataError, match=f"mask .*{first.name} is 10x10"):
        load_dataset(root, "seg", 32)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for task in ("cls", "seg"):  # an empty folder: no images, whatever the task (not "needs masks")
        with pytest.raises(DataError, match="found no images"):
            load_dataset(tmp_path / "empty", task, 32)
    (tmp_path / "loose").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "loose", "cls", 32)
    np.savez(tmp_path / "multi.npz", **{f"{s}_{k}": (np.zeros((4, 8, 8), np.uint8) if k == "images" else np.zeros((4, 3)))
                                        for s in ("train", "val", "test") for k in ("images", "labels")})
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(tmp_path / "multi.npz", "cls", 8)
    with pytest.raises(DataError, match="cannot be used for task 'seg'"):
        load_dataset(D2 / "pneumoniamnist_balanced.npz", "seg", 28)


def test_a_plain_folder_of_images_loads_whole_and_pairs_are_matched_or_named(tmp_path):
    (tmp_path / "pics").mkdir()
    for i, mode in enumerate(("L", "RGB", "RGB")):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).convert(mode).save(tmp_path / "pics" / f"p{i}.png")
    assert is_image_folder(tmp_path / "pics") and not is_image_folder(tmp_path)
    pictures = load_image_folder(tmp_path / "pics", 32, 3)
    assert len(pictures) == 3 and pictures.images.shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="no .* files"):
        load_image_folder(tmp_path, 32, 3)
    for part in ("images", "masks"):
        (tmp_path / "set" / part).mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "set" / "images" / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "set" / "masks" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "set" / "masks" / "c.png")
    with pytest.raises(DataError, match=r"no mask for \['b.jpg'\][\s\S]*no image for \['c.png'\]"):
        image_mask_pairs(tmp_path / "set")
    (tmp_path / "set" / "masks" / "c.png").rename(tmp_path / "set" / "masks" / "b.png")
    assert [(i.name, m.name) for i, m in image_mask_pairs(tmp_path / "set")] == [("a.png", "a.png"), ("b.jpg", "b.png")]
