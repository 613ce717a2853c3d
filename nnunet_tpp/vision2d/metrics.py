"""Test metrics of the 2D branch, as the papers report them, and the unit convention of every JSON file the
2-D branch writes.

Classification: accuracy, AUC (binary: of the positive class' probability; more classes: macro one-vs-rest)
and macro F1, from scikit-learn. Segmentation: Dice and HD95 of the foreground per image, averaged over
images (more than one foreground class: averaged over classes first), in pixels of the evaluated
resolution, with the empty-mask convention of :mod:`nnunet_tpp.evaluation` (both empty: Dice 1, HD95 0;
one empty: Dice 0, HD95 = image diagonal).

Units: ACC, AUC, F1, Dice and ``trainable_ratio`` are **fractions** (0-1) in every JSON file (``metrics.json``,
``history.json``, the benchmarks' files), which name them in a ``"units"`` entry (:data:`UNITS`); HD95 is in
pixels here (2-D images carry no spacing; ``nnunet-tpp evaluate`` reports it in mm). Printed tables and log lines
show percent and say so. Files written before this convention (no ``"units"`` entry) held percent;
:func:`read_metrics` converts them. A run's peak memory is measured by :func:`peak_memory_mb`.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunet_tpp.evaluation import dice_hd95

if TYPE_CHECKING:
    import torch

FRACTIONS = ("acc", "auc", "f1", "dice", "trainable_ratio")
UNITS = {"acc": "fraction", "auc": "fraction", "f1": "fraction", "dice": "fraction", "hd95": "pixel",
         "trainable_ratio": "fraction", "peak_memory_mb": "MiB", "images_per_s": "images/s"}


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ACC, AUC and macro F1 as fractions (0-1).

    Args:
        labels: (N,) integer classes.
        probabilities: (N, K) softmax outputs.
    Returns:
        ``{"acc", "auc", "f1"}``; AUC is NaN when the labels hold a single class.
    """
    from sklearn.metrics import f1_score, roc_auc_score
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(1)
    num_classes = probabilities.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")
    elif num_classes == 2:
        auc = roc_auc_score(labels, probabilities[:, 1])
    else:
        probs = probabilities[:, present] / probabilities[:, present].sum(1, keepdims=True)
        auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=present)
    f1 = f1_score(labels, predicted, average="macro", labels=np.arange(num_classes), zero_division=0)
    return {"acc": float((predicted == labels).mean()), "auc": float(auc), "f1": float(f1)}


def segmentation_per_image(masks: list[np.ndarray], predictions: list[np.ndarray], class_names: list[str]
                           ) -> list[dict]:
    """Dice (a fraction) and HD95 (pixels) of every foreground class, per image.

    Args:
        masks, predictions: per image (H, W) integer label maps.
        class_names: names in label order, background first.
    Returns:
        ``[{"dice": {name: value}, "hd95": {name: value}}]``, one per image, in order.
    """
    records = []
    for ref, pred in zip(masks, predictions):
        scores = {name: dice_hd95(ref == c, pred == c, (1.0, 1.0)) for c, name in enumerate(class_names) if c}
        records.append({"dice": {n: float(d) for n, (d, _) in scores.items()},
                        "hd95": {n: float(h) for n, (_, h) in scores.items()}})
    return records


def segmentation_metrics(masks: list[np.ndarray], predictions: list[np.ndarray], num_classes: int
                         ) -> dict[str, float]:
    """Mean foreground Dice (a fraction, 0-1) and HD95 (pixels) over images (classes averaged per image first).

    Args:
        masks, predictions: per image (H, W) integer label maps.
        num_classes: including background (class 0).
    Returns:
        ``{"dice", "hd95"}``.
    """
    if not masks:
        raise ValueError("no images to evaluate")
    records = segmentation_per_image(masks, predictions, [str(c) for c in range(num_classes)])
    return {"dice": float(np.mean([np.mean(list(r["dice"].values())) for r in records])),
            "hd95": float(np.mean([np.mean(list(r["hd95"].values())) for r in records]))}


def units_for(keys) -> dict[str, str]:
    """The ``"units"`` entry for a JSON object with these keys (only the keys :data:`UNITS` names)."""
    return {k: UNITS[k] for k in UNITS if k in set(keys)}


def as_fractions(values: dict) -> dict:
    """A copy of a metrics dict written before the unit convention (percent) with :data:`FRACTIONS` divided by
    100, nested ``val`` dicts too, and the ``"units"`` entry added."""
    out = {}
    for key, value in values.items():
        if key in FRACTIONS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value / 100.0
        elif key == "val" and isinstance(value, dict):
            out[key] = as_fractions(value)
        else:
            out[key] = value
    out["units"] = units_for(out)
    return out


def read_metrics(path: str | Path) -> dict:
    """Reads a ``metrics.json`` of ``train2d`` in fractions whichever convention wrote it: a file with a
    ``"units"`` entry is returned as it is; an older one (no ``"units"``: percent) is converted
    (:func:`as_fractions`). Raises OSError / ValueError for an unreadable file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a metrics object")
    if "units" in data:
        bad = {k: v for k, v in data["units"].items() if k in FRACTIONS and v != "fraction"}
        if bad:
            raise ValueError(f"{path}: unexpected units {bad} (expected fractions)")
        return data
    return as_fractions(data)


def percent(value: float) -> float:
    """A fraction as percent, for printed tables and logs."""
    return 100.0 * float(value)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far and what it measures: CUDA allocated memory, or this process' peak RSS on CPU.

    Returns:
        ``(MiB, a description of the measure)``, e.g. ``(812.0, "process peak RSS")``.
    """
    import torch  # only measuring needs it; reading and writing metrics does not
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
