"""The demo's result table, honest about what a short schedule learnt.

A label's Dice means something only above what a network that learnt nothing about that label reaches. Two floors
are shown and a label counts as learnt only above both:

* the **untrained Dice**: the same network before fine-tuning (the run's seeded starting point, predicted with
  ``nnUNetv2_predict``; :func:`nnunet_tpp.trainers.restore.write_initial_checkpoint`);
* the **chance Dice**: the Dice of predicting the label on every voxel of the test case, ``2 f / (1 + f)`` for a
  label that fills the fraction ``f`` of the image (mean over test cases). A prediction made without looking at the
  image, marking any share of voxels, reaches at most that in expectation.

A label not above both is marked as not learnt by the schedule: its Dice and HD95 say nothing about the method.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tpp.evaluation import Evaluation, markdown_table, split_labels

HEADER = ["label / region", "Dice", "HD95 (mm)", "untrained Dice", "chance Dice", "learnt"]
NOT_LEARNT = "no (not above the untrained network or chance)"


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


def learnt(evaluation: Evaluation, untrained: Evaluation, chance: dict[str, float]) -> dict[str, bool]:
    """Whether each label's mean Dice lies above both the untrained network's and its chance Dice."""
    return {name: bool(d > untrained.dice[name] and d > chance[name]) for name, d in evaluation.dice.items()}


def result_table(evaluation: Evaluation, untrained: Evaluation, chance: dict[str, float], schedule: str) -> str:
    """The demo's table: Dice, HD95, the untrained network's Dice, chance Dice and whether each label was learnt,
    the regions, the mean, and a note naming the labels the schedule did not learn (no note when it learnt all).

    Args:
        evaluation: the test cases' evaluation.
        untrained: the same cases predicted by the network before fine-tuning.
        chance: :func:`chance_dice` of the same cases.
        schedule: the fine-tuning schedule in words, for the note (e.g. ``"15 epochs x 20 iterations"``).
    """
    flags = learnt(evaluation, untrained, chance)
    rows = [[name, m["dice"], m["hd95"], untrained.dice[name], chance[name], "yes" if flags[name] else NOT_LEARNT]
            for name, m in evaluation.per_label.items()]
    rows += [[f"region: {name}", m["dice"], m["hd95"], untrained.per_region[name]["dice"], "", ""]
             for name, m in evaluation.per_region.items()]
    rows.append(["mean (labels)", evaluation.mean_dice,
                 float(np.mean([m["hd95"] for m in evaluation.per_label.values()])), untrained.mean_dice, "", ""])
    table = markdown_table(HEADER, rows)
    missed = [name for name, ok in flags.items() if not ok]
    if missed:
        table += (f"\n\nNot learnt by this schedule ({schedule}): {', '.join(missed)}. Their Dice is no higher than "
                  f"the untrained network's or than marking the label everywhere (chance Dice), so their Dice and "
                  f"HD95 say nothing about the method; the mean includes them. Train longer (--epochs, --iters) to "
                  f"learn them.")
    if evaluation.missing:
        table += f"\n\n{evaluation.missing_note()}"
    return table
