"""Evaluation of predicted segmentations against references: Dice and HD95 (mm, spacing-aware, MONAI) per
label and per region, per case and mean, plus a check that each prediction has its reference's geometry.

Nothing is dropped or ignored silently: every reference case needs a prediction and every prediction a
reference, every label value in either file must be one the dataset has, and each pair must share its
geometry. All of this is checked for every case before any metric is computed; the error lists every
problem by case. With ``allow_missing`` a reference case without a prediction is scored as the worst result
(Dice 0, HD95 = the image diagonal, on every label and region) and listed as missing.

Empty masks: when reference and prediction are both empty for a label or region, Dice is 1 and HD95 is 0;
when exactly one of them is empty, Dice is 0 and HD95 is the length of the image diagonal in mm (the
largest distance possible in that image), so that a missed or hallucinated structure is penalised and
the mean stays finite.

Units: Dice is a fraction in [0, 1], HD95 is in mm (``UNITS``, written into every JSON).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Units of the metrics in every JSON this project writes.
UNITS = {"dice": "fraction", "hd95": "mm"}

#: Region definitions of the challenges, selected by the dataset's label names.
REGION_PRESETS = {
    "LiTS": ({"liver", "tumor"}, {"liver (liver+tumor)": ["liver", "tumor"], "tumor": ["tumor"]}),
    "KiTS": ({"kidney", "tumor"}, {"kidney+masses": ["kidney", "tumor", "cyst"], "masses": ["tumor", "cyst"],
                                   "tumor": ["tumor"]}),
}
_LISTED = 20  # case names listed per problem before "... (N more)"


class EvaluationError(ValueError):
    """Predictions and references that cannot be scored as given; the message lists every problem and its fix."""


@dataclass
class Evaluation:
    """Mean Dice/HD95 per label and per region, the same per case, and the cases that had no prediction."""

    per_label: dict[str, dict[str, float]]
    per_region: dict[str, dict[str, float]] = field(default_factory=dict)
    per_case: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def from_cases(cls, per_case: list[dict]) -> "Evaluation":
        """Means over cases of the per-case metrics (``{"labels": {name: {"dice", "hd95"}}, "regions": ...}``);
        cases marked ``"missing": True`` count (with the values they carry) and are listed in ``missing``."""
        def mean(kind: str) -> dict[str, dict[str, float]]:
            names = per_case[0][kind] if per_case else {}
            return {n: {m: float(np.mean([c[kind][n][m] for c in per_case])) for m in ("dice", "hd95")}
                    for n in names}
        missing = [c["case"] for c in per_case if c.get("missing")]
        return cls(mean("labels"), mean("regions"), per_case, missing)

    @property
    def dice(self) -> dict[str, float]:
        """Mean Dice per label."""
        return {name: m["dice"] for name, m in self.per_label.items()}

    @property
    def mean_dice(self) -> float:
        """The mean over labels of the mean Dice (NaN without labels)."""
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")

    def to_json(self) -> dict:
        """Everything as plain JSON types: ``units``, ``per_label``, ``per_region``, ``per_case``,
        ``num_cases`` and ``missing_cases`` (scored as the worst result; empty unless allowed)."""
        return {"units": dict(UNITS), "per_label": self.per_label, "per_region": self.per_region,
                "per_case": self.per_case, "num_cases": len(self.per_case), "missing_cases": list(self.missing)}

    def missing_note(self) -> str:
        """One line naming the cases scored as missing (empty string when there are none)."""
        if not self.missing:
            return ""
        return (f"{len(self.missing)} of {len(self.per_case)} case(s) had no prediction and are scored as Dice 0 / "
                f"HD95 = image diagonal (--allow-missing): {_names(self.missing)}")

    def markdown(self) -> str:
        """Tables of the means per label and per region (with the missing-case note below, if any)."""
        rows = [[name, m["dice"], m["hd95"]] for name, m in self.per_label.items()]
        rows += [[f"region: {name}", m["dice"], m["hd95"]] for name, m in self.per_region.items()]
        rows.append(["mean (labels)", self.mean_dice,
                     float(np.mean([m["hd95"] for m in self.per_label.values()]))])
        table = markdown_table(["label / region", "Dice", "HD95 (mm)"], rows)
        return table + (f"\n\n{self.missing_note()}" if self.missing else "")


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
        return dice, _diagonal(reference.shape, spacing)
    import torch
    from monai.metrics import compute_hausdorff_distance
    hd = compute_hausdorff_distance(torch.from_numpy(prediction[None, None]), torch.from_numpy(reference[None, None]),
                                    include_background=True, percentile=95, spacing=list(spacing))
    return dice, float(hd.item())


def _diagonal(shape, spacing) -> float:
    return float(np.linalg.norm(np.array(shape) * np.array(spacing)))


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


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def _files(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())
            if p.name.endswith(file_ending) and not p.name.startswith(".") and p.is_file()}


def _read(path: Path, unreadable: list[str]) -> sitk.Image | None:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        unreadable.append(f"{path}: {str(e).strip().splitlines()[-1] if str(e).strip() else 'unreadable'}")
        return None


def _unknown_values(image: sitk.Image, known: set) -> list:
    values = np.unique(sitk.GetArrayViewFromImage(image))
    return [int(v) if float(v).is_integer() else float(v) for v in values if float(v) not in known]


def split_labels(labels: dict) -> tuple[dict[str, int], set[float], int | None]:
    """Splits a dataset.json label map into what is scored and what is only allowed.

    Returns:
        ``(scored, known, ignore)``: the integer labels other than background and ``ignore`` (scored), every
        value a file may hold (integers, members of region-based labels, background, ignore), and the ignore
        label's value (voxels nnU-Net does not train on; not counted in any metric) or None.
    """
    scored, known, ignore = {}, set(), None
    for name, value in labels.items():
        members = value if isinstance(value, (list, tuple)) else [value]
        known |= {float(v) for v in members}
        if isinstance(value, (list, tuple)):
            continue  # a region of a region-based dataset: its members are labels in the files
        if name == "ignore":
            ignore = int(value)
        elif int(value) != 0:
            scored[name] = int(value)
    return scored, known, ignore


def check_folders(reference_dir: Path, prediction_dir: Path, labels: dict[str, int], file_ending: str = ".nii.gz",
                  allow_missing: bool = False, known_values: Iterable[int] = (),
                  cases: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Checks everything :func:`evaluate_folder` needs, for every case, before any metric is computed.

    Args:
        reference_dir, prediction_dir, labels, file_ending, allow_missing, cases: as for :func:`evaluate_folder`.
        known_values: label values the files may hold besides ``labels``' values (e.g. the members of
            region-based labels, or an ignore label), which are not scored.
    Returns:
        ``(present, missing)``: the file names with both files, and those whose prediction is missing (only
        non-empty with ``allow_missing``). Raises :class:`EvaluationError` listing every problem otherwise.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    for what, folder in (("reference", reference_dir), ("prediction", prediction_dir)):
        if not folder.is_dir():
            raise EvaluationError(f"the {what} folder {folder} does not exist or is not a folder")
    scored, known, _ = split_labels(labels)
    if not scored:
        raise EvaluationError(f"the label set {labels} has no foreground label to score; give the dataset's "
                              f"labels with -d DATASET or --labels JSON")
    refs, preds = _files(reference_dir, file_ending), _files(prediction_dir, file_ending)
    if cases is not None:
        wanted = [c if c.endswith(file_ending) else c + file_ending for c in cases]
        no_ref = [c for c in wanted if c not in refs]
        if no_ref:
            raise EvaluationError(f"{len(no_ref)} requested case(s) have no reference in {reference_dir}: "
                                  f"{_names(no_ref)}")
        refs = {c: refs[c] for c in wanted}
        preds = {c: p for c, p in preds.items() if c in refs}
    if not refs:
        raise EvaluationError(f"no reference label maps (*{file_ending}) in {reference_dir}")
    problems = []
    extra = sorted(set(preds) - set(refs))
    if extra:
        problems.append(f"{len(extra)} prediction(s) have no reference in {reference_dir}: {_names(extra)}. "
                        f"Every prediction needs a same-named reference: add the references, or move these files "
                        f"out of {prediction_dir}")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        problems.append(f"{len(missing)} of {len(refs)} reference case(s) have no prediction in {prediction_dir}: "
                        f"{_names(missing)}. Predict them (nnUNetv2_predict), or pass --allow-missing to score each "
                        f"as Dice 0 / HD95 = image diagonal")
    known |= {float(v) for v in known_values}
    unreadable, geometry, values = [], [], []
    for name in sorted(refs):
        ref = _read(refs[name], unreadable)
        pred = _read(preds[name], unreadable) if name in preds else None
        for path, image in ((refs[name], ref), (preds.get(name), pred)):
            if image is not None and image.GetNumberOfComponentsPerPixel() == 1:
                unknown = _unknown_values(image, known)
                if unknown:
                    values.append(f"{path}: {unknown}")
            elif image is not None:
                unreadable.append(f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; a "
                                  f"label map has one")
        if ref is not None and pred is not None:
            mismatch = _geometry_problems(ref, pred)
            if mismatch:
                geometry.append(f"{name}: {'; '.join(mismatch)}")
    if unreadable:
        problems.append(f"{len(unreadable)} file(s) cannot be read as label maps:\n    " + "\n    ".join(unreadable))
    if geometry:
        problems.append(f"{len(geometry)} prediction(s) do not have their reference's geometry (size, spacing, "
                        f"origin, direction); resample them onto the reference grid:\n    " + "\n    ".join(geometry))
    if values:
        problems.append(f"{len(values)} file(s) hold label values the dataset does not have (its labels: "
                        f"{labels}); fix the files, or give the complete label set with -d DATASET or --labels "
                        f"JSON:\n    " + "\n    ".join(values))
    if problems:
        raise EvaluationError(f"nothing was evaluated: {len(problems)} problem(s)\n  - " + "\n  - ".join(problems))
    return sorted(set(refs) & set(preds)), missing


def evaluate_folder(reference_dir: Path, prediction_dir: Path, labels: dict[str, int],
                    file_ending: str = ".nii.gz", allow_missing: bool = False, known_values: Iterable[int] = (),
                    cases: Iterable[str] | None = None) -> Evaluation:
    """Dice and HD95 of every reference case against the same-named prediction.

    Args:
        reference_dir, prediction_dir: folders of label maps named alike (``CASE.nii.gz``).
        labels: ``{"background": 0, "liver": 1, ...}`` (dataset.json's map: background, an ``ignore`` label
            and region-based entries are not scored; voxels of the ignore label are left out of every metric).
        file_ending: the files considered in both folders.
        allow_missing: score a reference case without a prediction as Dice 0 / HD95 = image diagonal on every
            label and region (listed in ``Evaluation.missing``) instead of refusing.
        known_values: further label values the files may hold without being scored (see :func:`check_folders`).
        cases: evaluate only these cases (names with or without ``file_ending``), e.g. one fold's validation
            cases against a folder of all references; predictions of other cases are then not considered.
    Returns:
        An :class:`Evaluation` over every reference case (or every case of ``cases``). Raises
        :class:`EvaluationError` (a ``ValueError``) before computing anything when a prediction or reference
        is missing, unreadable, on another grid, or holds an unknown label value.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    present, missing = check_folders(reference_dir, prediction_dir, labels, file_ending, allow_missing,
                                     known_values, cases)
    foreground, _, ignore = split_labels(labels)
    regions = regions_for(foreground)
    per_case = []
    for name in sorted(present + missing):
        ref_img = sitk.ReadImage(str(reference_dir / name))
        ref = sitk.GetArrayFromImage(ref_img)
        spacing = ref_img.GetSpacing()[::-1]
        case = {"case": name, "missing": name in missing, "labels": {}, "regions": {}}
        if name in missing:
            worst = {"dice": 0.0, "hd95": _diagonal(ref.shape, spacing)}
            case["labels"] = {label: dict(worst) for label in foreground}
            case["regions"] = {region: dict(worst) for region in regions}
            per_case.append(case)
            continue
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_dir / name)))
        if ignore is not None:  # as nnU-Net: voxels of the ignore label count neither way
            pred = np.where(ref == ignore, ignore, pred)
        for label, value in foreground.items():
            dice, hd = dice_hd95(ref == value, pred == value, spacing)
            case["labels"][label] = {"dice": dice, "hd95": hd}
        for region, values in regions.items():
            dice, hd = dice_hd95(np.isin(ref, values), np.isin(pred, values), spacing)
            case["regions"][region] = {"dice": dice, "hd95": hd}
        per_case.append(case)
    return Evaluation.from_cases(per_case)


def check_output_file(path: Path) -> Path:
    """Checks that a result file can be written at ``path`` (its folder exists, it is not a folder) and returns
    it; raises :class:`EvaluationError` naming the fix. Run it before the evaluation, not after."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"--json {path} is a folder; give a file name, e.g. {path / 'metrics.json'}")
    if not path.parent.is_dir():
        raise EvaluationError(f"--json {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise EvaluationError(f"--json {path}: the folder {path.parent} is not writable")
    return path


def write_json(evaluation: Evaluation, path: Path) -> None:
    """Writes :meth:`Evaluation.to_json` to ``path`` (through a temporary file, so it is whole or absent)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(evaluation.to_json(), indent=2))
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 4 decimals."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
