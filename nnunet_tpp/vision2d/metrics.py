"""Test metrics of the 2D branch, as the papers report them.

Classification: accuracy, AUC (binary: of the positive class' probability; more classes: macro one-vs-rest)
and macro F1, from scikit-learn. Segmentation: Dice and HD95 of the foreground per image, averaged over
images (more than one foreground class: averaged over classes first), in pixels of the evaluated
resolution, with the empty-mask convention of :mod:`nnunet_tpp.evaluation` (both empty: Dice 1, HD95 0;
one empty: Dice 0, HD95 = image diagonal).
"""
from __future__ import annotations

import numpy as np

from nnunet_tpp.evaluation import dice_hd95


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ACC, AUC and macro F1 in percent.

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
    return {"acc": 100.0 * float((predicted == labels).mean()), "auc": 100.0 * float(auc), "f1": 100.0 * float(f1)}


def segmentation_metrics(masks: list[np.ndarray], predictions: list[np.ndarray], num_classes: int
                         ) -> dict[str, float]:
    """Mean foreground Dice (percent) and HD95 (pixels) over images.

    Args:
        masks, predictions: per image (H, W) integer label maps.
        num_classes: including background (class 0).
    Returns:
        ``{"dice", "hd95"}``.
    """
    if not masks:
        raise ValueError("no images to evaluate")
    dices, hds = [], []
    for ref, pred in zip(masks, predictions):
        per_class = [dice_hd95(ref == c, pred == c, (1.0, 1.0)) for c in range(1, num_classes)]
        dices.append(np.mean([d for d, _ in per_class]))
        hds.append(np.mean([h for _, h in per_class]))
    return {"dice": 100.0 * float(np.mean(dices)), "hd95": float(np.mean(hds))}
