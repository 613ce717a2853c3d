"""2D metrics against hand-computed values."""
import math

import numpy as np
import pytest

from nnunet_tpp.vision2d.metrics import classification_metrics, segmentation_metrics, segmentation_per_image


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(labels, probs)
    assert m["acc"] == pytest.approx(0.75)  # fractions
    # every positive scores above every negative but one (0.6 < 0.7, 0.8): AUC = 4/4 = 1.0
    assert m["auc"] == pytest.approx(1.0)
    # class 0: precision 1, recall 0.5 -> 2/3; class 1: precision 2/3, recall 1 -> 0.8
    assert m["f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_auc_is_nan_for_one_class_and_multiclass_works():
    assert math.isnan(classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))["auc"])
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[labels] * 0.7 + 0.1
    assert classification_metrics(labels, probs)["auc"] == pytest.approx(1.0)


def test_segmentation_dice_and_hd95_by_hand():
    ref = np.zeros((20, 20), int)
    ref[5:10, 5:10] = 1
    pred = np.zeros((20, 20), int)
    pred[5:10, 5:12] = 1  # 25 vs 35 pixels, 25 shared: Dice 50/60; the extra columns lie 1 and 2 px away
    m = segmentation_metrics([ref], [pred], num_classes=2)
    assert m["dice"] == pytest.approx(50 / 60)
    assert 1.0 <= m["hd95"] <= 2.0
    both_empty = segmentation_metrics([np.zeros((8, 8), int)], [np.zeros((8, 8), int)], 2)
    assert both_empty == {"dice": 1.0, "hd95": 0.0}
    missed = segmentation_metrics([ref], [np.zeros_like(ref)], 2)
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(math.hypot(20, 20))


def test_old_percent_files_are_read_as_fractions(tmp_path):
    import json

    from nnunet_tpp.vision2d.metrics import UNITS, read_metrics
    old = {"acc": 75.0, "auc": 90.0, "f1": 60.0, "trainable_ratio": 2.5, "hd95": 3.0, "peak_memory_mb": 900.0,
           "val": {"acc": 80.0, "auc": 85.0, "f1": 70.0}, "method": "adapter", "seed": 0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = read_metrics(tmp_path / "old.json")
    assert {k: read[k] for k in ("acc", "auc", "f1", "trainable_ratio")} == pytest.approx(
        {"acc": 0.75, "auc": 0.9, "f1": 0.6, "trainable_ratio": 0.025})
    assert read["hd95"] == 3.0 and read["peak_memory_mb"] == 900.0 and read["seed"] == 0  # not fractions
    assert read["val"]["acc"] == pytest.approx(0.8) and read["units"]["acc"] == "fraction"
    new = {"acc": 0.75, "units": {"acc": "fraction"}}
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert read_metrics(tmp_path / "new.json") == new  # a file with units is read as it is
    (tmp_path / "odd.json").write_text(json.dumps({"acc": 75.0, "units": {"acc": "percent"}}))
    with pytest.raises(ValueError, match="unexpected units"):
        read_metrics(tmp_path / "odd.json")
    assert UNITS["hd95"] == "pixel" and UNITS["dice"] == "fraction"


def test_per_image_scores_name_the_classes_and_average_to_the_means():
    ref = np.zeros((20, 20), int)
    ref[5:10, 5:10], ref[12:16, 12:16] = 1, 2
    pred = ref.copy()
    pred[12:16, 12:16] = 0  # class 2 missed in the first image; the second image is perfect
    records = segmentation_per_image([ref, ref], [pred, ref], ["background", "lesion", "other"])
    assert [r["dice"] for r in records] == [{"lesion": 1.0, "other": 0.0}, {"lesion": 1.0, "other": 1.0}]
    assert records[0]["hd95"]["other"] == pytest.approx(math.hypot(20, 20)) and records[1]["hd95"]["lesion"] == 0.0
    assert segmentation_metrics([ref, ref], [pred, ref], 3)["dice"] == pytest.approx((0.5 + 1.0) / 2)
