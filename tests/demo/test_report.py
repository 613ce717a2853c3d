"""The demo's table marks the labels its schedule did not learn: chance Dice by hand, the marks, the note."""
import numpy as np
import SimpleITK as sitk

from nnunet_tpp.demo.report import NOT_LEARNT, chance_dice, learnt, result_table
from nnunet_tpp.evaluation import Evaluation

LABELS = {"background": 0, "liver": 1, "lesion": 2, "kidney": 3}


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(folder / f"{name}.nii.gz"))


def test_chance_dice_is_the_dice_of_marking_the_label_everywhere(tmp_path):
    a = np.zeros((10, 10, 10))
    a[:1] = 1  # liver: 100 of 1000 voxels
    a[5, 5, :5] = 2  # lesion: 5 voxels
    b = np.zeros((10, 10, 10))
    b[:3] = 1  # liver: 300 voxels; no lesion
    _write(tmp_path, "a", a)
    _write(tmp_path, "b", b)
    chance = chance_dice(tmp_path, LABELS)
    everywhere = lambda f: 2 * f / (1 + f)  # noqa: E731
    assert np.isclose(chance["liver"], (everywhere(0.1) + everywhere(0.3)) / 2)
    assert np.isclose(chance["lesion"], everywhere(0.005) / 2) and chance["kidney"] == 0.0
    # the definition: Dice of the all-label prediction against the reference, case by case
    assert np.isclose(2 * 100 / (100 + 1000), everywhere(0.1))


def _evaluation(dice: dict[str, float]) -> Evaluation:
    return Evaluation({name: {"dice": d, "hd95": 5.0 if d > 0 else 232.0} for name, d in dice.items()})


def test_labels_not_above_the_untrained_network_and_chance_are_marked_not_learnt_and_named_in_a_note():
    chance = {"liver": 0.12, "lesion": 0.004, "kidney": 0.03}
    untrained = _evaluation({"liver": 0.05, "lesion": 0.01, "kidney": 0.0})
    evaluation = _evaluation({"liver": 0.93, "lesion": 0.008, "kidney": 0.03})
    # lesion: above chance but below the untrained network; kidney: above the untrained network, equal to chance
    assert learnt(evaluation, untrained, chance) == {"liver": True, "lesion": False, "kidney": False}
    table = result_table(evaluation, untrained, chance, "15 epochs x 20 iterations")
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["liver"].endswith("| 0.0500 | 0.1200 | yes |")
    assert rows["lesion"].endswith(f"| 0.0100 | 0.0040 | {NOT_LEARNT} |") and rows["kidney"].endswith(f"| {NOT_LEARNT} |")
    assert "Not learnt by this schedule (15 epochs x 20 iterations): lesion, kidney." in table
    every = result_table(_evaluation({"liver": 0.9, "lesion": 0.5, "kidney": 0.8}), untrained, chance, "x")
    assert "Not learnt" not in every and NOT_LEARNT not in every
