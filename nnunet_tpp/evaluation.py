"""Evaluation of predicted segmentations against references: Dice and HD95 (mm, spacing-aware, MONAI) per
label and per region, per case and mean, plus a check that each prediction has its reference's geometry.

Empty masks: when reference and prediction are both empty for a label or region, Dice is 1 and HD95 is 0;
when exactly one of them is empty, Dice is 0 and HD95 is the length of the image diagonal in mm (the
largest distance possible in that image), so that a missed or hallucinated structure is penalised and
the mean stays finite.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Region definitions of the challenges, selected by the dataset's label names.
REGION_PRESETS = {
    "LiTS": ({"liver", "tumor"}, {"liver (liver+tumor)": ["liver", "tumor"], "tumor": ["tumor"]}),
    "KiTS": ({"kidney", "tumor"}, {"kidney+masses": ["kidney", "tumor", "cyst"], "masses": ["tumor", "cyst"],
                                   "tumor": ["tumor"]}),
}


@dataclass
class Evaluation:
    """Mean Dice/HD95 per label and per region, and the same per case."""

    per_label: dict[str, dict[str, float]]
    per_region: dict[str, dict[str, float]] = field(default_factory=dict)
    per_case: list[dict] = field(default_factory=list)

    @classmethod
    def from_cases(cls, per_case: list[dict]) -> "Evaluation":
        """Means over cases of the per-case metrics (``{"labels": {name: {"dice", "hd95"}}, "regions": ...}``)."""
        def mean(kind: str) -> dict[str, dict[str, float]]:
            names = per_case[0][kind] if per_case else {}
            return {n: {m: float(np.mean([c[kind][n][m] for c in per_case])) for m in ("dice", "hd95")}
                    for n in names}
        return cls(mean("labels"), mean("regions"), per_case)

    @property
    def dice(self) -> dict[str, float]:
        """Mean Dice per label."""
        return {name: m["dice"] for name, m in self.per_label.items()}

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")

    def to_json(self) -> dict:
        return {"per_label": self.per_label, "per_region": self.per_region, "per_case": self.per_case}

    def markdown(self) -> str:
        """Tables of the means per label and per region."""
        rows = [[name, m["dice"], m["hd95"]] for name, m in self.per_label.items()]
        rows += [[f"region: {name}", m["dice"], m["hd95"]] for name, m in self.per_region.items()]
        rows.append(["mean (labels)", self.mean_dice,
                     float(np.mean([m["hd95"] for m in self.per_label.values()]))])
        return markdown_table(["label / region", "Dice", "HD95 (mm)"], rows)


def regions_for(labels: dict[str, int]) -> dict[str, list[int]]:
    """The challenge regions that apply to a label set (LiTS or KiTS names), as lists of label values."""
    names = set(labels)
    for required, regions in REGION_PRESETS.values():
        if required <= names:
            return {region: [labels[n] for n in members if n in labels] for region, members in regions.items()}
    return {}


def dice_hd95(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """Dice and the 95th-percentile symmetric Hausdorff distance (mm) of two boolean masks (z, y, x).

    Args:
        spacing: voxel size in mm, in the arrays' axis order.
    Returns:
        ``(dice, hd95)`` following the module's empty-mask convention.
    """
    ref_sum, pred_sum = int(reference.sum()), int(prediction.sum())
    if ref_sum == 0 and pred_sum == 0:
        return 1.0, 0.0
    dice = 2.0 * float(np.logical_and(reference, prediction).sum()) / (ref_sum + pred_sum)
    if ref_sum == 0 or pred_sum == 0:
        return dice, float(np.linalg.norm(np.array(reference.shape) * np.array(spacing)))
    import torch
    from monai.metrics import compute_hausdorff_distance
    hd = compute_hausdorff_distance(torch.from_numpy(prediction[None, None]), torch.from_numpy(reference[None, None]),
                                    include_background=True, percentile=95, spacing=list(spacing))
    return dice, float(hd.item())


def geometry_mismatches(reference: Path, prediction: Path) -> list[str]:
    """Differences in size, spacing, origin or direction between two images (empty when they match)."""
    ref, pred = sitk.ReadImage(str(reference)), sitk.ReadImage(str(prediction))
    return _geometry_problems(ref, pred)


def _geometry_problems(ref: sitk.Image, pred: sitk.Image) -> list[str]:
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
    """Dice and HD95 of every prediction in ``prediction_dir`` against the same-named reference.

    Args:
        labels: ``{"background": 0, "liver": 1, ...}`` (background is not scored).
    Returns:
        An :class:`Evaluation`. Raises ``ValueError`` for a missing reference or a prediction whose geometry
        differs from its reference.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    predictions = sorted(p for p in prediction_dir.iterdir() if p.name.endswith(file_ending))
    if not predictions:
        raise ValueError(f"no predictions ({file_ending}) in {prediction_dir}")
    foreground = {name: value for name, value in labels.items() if value != 0}
    regions = regions_for(foreground)
    per_case = []
    for pred_path in predictions:
        ref_path = reference_dir / pred_path.name
        if not ref_path.exists():
            raise ValueError(f"no reference for {pred_path.name} in {reference_dir}")
        ref_img, pred_img = sitk.ReadImage(str(ref_path)), sitk.ReadImage(str(pred_path))
        problems = _geometry_problems(ref_img, pred_img)
        if problems:
            raise ValueError(f"{pred_path} does not have its reference's geometry: {'; '.join(problems)}")
        ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
        spacing = ref_img.GetSpacing()[::-1]
        case = {"case": pred_path.name, "labels": {}, "regions": {}}
        for name, value in foreground.items():
            dice, hd = dice_hd95(ref == value, pred == value, spacing)
            case["labels"][name] = {"dice": dice, "hd95": hd}
        for name, values in regions.items():
            dice, hd = dice_hd95(np.isin(ref, values), np.isin(pred, values), spacing)
            case["regions"][name] = {"dice": dice, "hd95": hd}
        per_case.append(case)
    return Evaluation.from_cases(per_case)


def write_json(evaluation: Evaluation, path: Path) -> None:
    """Writes :meth:`Evaluation.to_json` to ``path``."""
    Path(path).write_text(json.dumps(evaluation.to_json(), indent=2))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 4 decimals."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
