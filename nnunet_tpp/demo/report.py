"""The demo's result table, honest about what a short schedule learnt.

A label's Dice means something only above what a network that learnt nothing about that label reaches. The
floor used here is the **chance Dice**: the Dice of predicting the label on every voxel of the test case,
``2 f / (1 + f)`` for a label that fills the fraction ``f`` of the image (mean over test cases). A prediction made
without looking at the image, marking any share of voxels, reaches at most that in expectation. A label whose
Dice is not above it is marked as not learnt by the schedule, and its Dice and HD95 say nothing about the method.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tpp.evaluation import Evaluation, markdown_table, split_labels

HEADER = ["label / region", "Dice", "HD95 (mm)", "chance Dice", "learnt"]
NOT_LEARNT = "no (not above chance)"


def chance_dice(reference_dir: Path, labels: dict[str, int], file_ending: str = ".nii.gz") -> dict[str, float]:
    """The chance Dice of every foreground label (module docstring), the mean over the reference cases.

    Args:
        reference_dir: the test cases' label maps (``CASE.nii.gz``).
        labels: ``{"background": 0, "liver": 1, ...}``.
    Returns:
        ``{label: chance Dice}``; a label absent from every case gets 0.
    """
    foreground, _, ignore = split_labels(labels)
    per_case = []
    for path in sorted(Path(reference_dir).glob(f"*{file_ending}")):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        scored = ref.size - (int((ref == ignore).sum()) if ignore is not None else 0)
        fractions = {name: float((ref == value).sum()) / max(scored, 1) for name, value in foreground.items()}
        per_case.append({name: 2 * f / (1 + f) for name, f in fractions.items()})
    return {name: float(np.mean([c[name] for c in per_case])) if per_case else 0.0 for name in foreground}


def learnt(evaluation: Evaluation, chance: dict[str, float]) -> dict[str, bool]:
    """Whether each label's mean Dice lies above its chance Dice."""
    return {name: bool(evaluation.dice[name] > chance[name]) for name in evaluation.dice}


def result_table(evaluation: Evaluation, chance: dict[str, float], schedule: str) -> str:
    """The demo's table: Dice, HD95, chance Dice and whether each label was learnt, the regions, the mean, and a
    note naming the labels the schedule did not learn (empty note when it learnt all).

    Args:
        evaluation: the test cases' evaluation.
        chance: :func:`chance_dice` of the same cases.
        schedule: the fine-tuning schedule in words, for the note (e.g. ``"15 epochs x 20 iterations"``).
    """
    flags = learnt(evaluation, chance)
    rows = [[name, m["dice"], m["hd95"], chance[name], "yes" if flags[name] else NOT_LEARNT]
            for name, m in evaluation.per_label.items()]
    rows += [[f"region: {name}", m["dice"], m["hd95"], "", ""] for name, m in evaluation.per_region.items()]
    rows.append(["mean (labels)", evaluation.mean_dice,
                 float(np.mean([m["hd95"] for m in evaluation.per_label.values()])), "", ""])
    table = markdown_table(HEADER, rows)
    missed = [name for name, ok in flags.items() if not ok]
    if missed:
        table += (f"\n\nNot learnt by this schedule ({schedule}): {', '.join(missed)}. Their Dice is no higher than "
                  f"marking the label everywhere (chance Dice), so their Dice and HD95 say nothing about the method; "
                  f"the mean includes them. Train longer (--epochs, --iters) to learn them.")
    if evaluation.missing:
        table += f"\n\n{evaluation.missing_note()}"
    return table
