"""Evaluation of predicted segmentations against references with nnU-Net's own metric code (Dice per label,
per case and mean), plus a check that each prediction has its reference's geometry."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO


@dataclass
class Evaluation:
    """Dice per foreground label (mean over cases) and per case."""

    dice: dict[str, float]
    per_case: list[dict] = field(default_factory=list)

    @property
    def mean_dice(self) -> float:
        return float(np.nanmean(list(self.dice.values()))) if self.dice else float("nan")


def geometry_mismatches(reference: Path, prediction: Path) -> list[str]:
    """Differences in size, spacing, origin or direction between two images (empty when they match)."""
    ref, pred = sitk.ReadImage(str(reference)), sitk.ReadImage(str(prediction))
    problems = []
    if ref.GetSize() != pred.GetSize():
        problems.append(f"size {pred.GetSize()} != {ref.GetSize()}")
    for what, a, b, tol in (("spacing", pred.GetSpacing(), ref.GetSpacing(), 1e-4),
                            ("origin", pred.GetOrigin(), ref.GetOrigin(), 1e-3),
                            ("direction", pred.GetDirection(), ref.GetDirection(), 1e-5)):
        if not np.allclose(a, b, atol=tol):
            problems.append(f"{what} {tuple(np.round(a, 4))} != {tuple(np.round(b, 4))}")
    return problems


def evaluate_folder(reference_dir: Path, prediction_dir: Path, labels: dict[str, int],
                    file_ending: str = ".nii.gz") -> Evaluation:
    """Dice of every prediction in ``prediction_dir`` against the same-named file in ``reference_dir``.

    Args:
        labels: ``{"background": 0, "liver": 1, ...}`` (background is not scored).
    Returns:
        An :class:`Evaluation`. Raises ``ValueError`` when a prediction's geometry differs from its reference.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    predictions = sorted(p for p in prediction_dir.iterdir() if p.name.endswith(file_ending))
    if not predictions:
        raise ValueError(f"no predictions ({file_ending}) in {prediction_dir}")
    for pred in predictions:
        problems = geometry_mismatches(reference_dir / pred.name, pred)
        if problems:
            raise ValueError(f"{pred} does not have its reference's geometry: {'; '.join(problems)}")
    foreground = {name: value for name, value in labels.items() if value != 0}
    result = compute_metrics_on_folder(str(reference_dir), str(prediction_dir), None, SimpleITKIO(), file_ending,
                                       list(foreground.values()), num_processes=1)
    dice = {name: float(result["mean"][value]["Dice"]) for name, value in foreground.items()}
    per_case = [{"case": Path(c["prediction_file"]).name,
                 **{name: float(c["metrics"][value]["Dice"]) for name, value in foreground.items()}}
                for c in result["metric_per_case"]]
    return Evaluation(dice, per_case)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 4 decimals."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
