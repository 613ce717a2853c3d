"""Statistics of the evidence protocol: each arm over seeds, and paired differences between arms with a
bootstrap interval.

A paired difference is taken per (seed, test case): both arms scored on the same case after training on the same
seed's labelled cases. Its 95 % interval comes from a two-way bootstrap that resamples test cases and seeds with
replacement (both vary in a replication of the experiment), the mean difference over the resampled grid each time,
and the 2.5 / 97.5 percentiles of those means.
"""
from __future__ import annotations

import numpy as np

BOOTSTRAP_ROUNDS = 10000


def arm_summary(per_case: list[dict]) -> dict:
    """One arm's numbers.

    Args:
        per_case: ``{"seed", "case", "dice": {label: value}, "hd95": {label: value}}`` records.
    Returns:
        ``{"dice": {label: mean}, "dice_mean", "dice_std" (over the seeds' mean Dice; 0 with one seed),
        "hd95_mean", "seeds", "per_case"}``.
    """
    labels = list(per_case[0]["dice"]) if per_case else []
    seeds = sorted({r["seed"] for r in per_case})
    dice = {label: float(np.mean([r["dice"][label] for r in per_case])) for label in labels}
    seed_means = [float(np.mean([np.mean(list(r["dice"].values())) for r in per_case if r["seed"] == s]))
                  for s in seeds]
    return {"dice": dice, "dice_mean": float(np.mean(seed_means)) if seed_means else float("nan"),
            "dice_std": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
            "hd95_mean": float(np.mean([np.mean(list(r["hd95"].values())) for r in per_case])) if per_case
            else float("nan"),
            "seeds": seeds, "per_case": per_case}


def case_dice(record: dict) -> float:
    """The mean Dice over labels of one per-case record."""
    return float(np.mean(list(record["dice"].values())))


def paired_difference(a: list[dict], b: list[dict], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """Arm ``a`` minus arm ``b`` in mean Dice per (seed, case), over the pairs both arms have.

    Returns:
        ``{"mean_difference", "ci95": [lo, hi], "n"}`` (``n`` pairs); with no pair ``n`` is 0 and the rest None.
    """
    first = {(r["seed"], r["case"]): case_dice(r) for r in a}
    second = {(r["seed"], r["case"]): case_dice(r) for r in b}
    keys = sorted(set(first) & set(second))
    if not keys:
        return {"mean_difference": None, "ci95": [None, None], "n": 0}
    seeds = sorted({s for s, _ in keys})
    cases = sorted({c for _, c in keys})
    grid = np.full((len(seeds), len(cases)), np.nan)
    for s, c in keys:
        grid[seeds.index(s), cases.index(c)] = first[(s, c)] - second[(s, c)]
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    for i in range(rounds):
        pick = grid[np.ix_(rng.integers(len(seeds), size=len(seeds)), rng.integers(len(cases), size=len(cases)))]
        means[i] = np.nanmean(pick) if np.isfinite(pick).any() else np.nan
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    return {"mean_difference": float(np.nanmean(grid)), "ci95": [float(lo), float(hi)], "n": len(keys)}


def learnt(arm: list[dict], untrained: list[dict]) -> bool:
    """Whether an arm learnt: its paired difference to the untrained network's prediction (same seeds and cases)
    has a 95 % interval above zero."""
    diff = paired_difference(arm, untrained)
    return diff["n"] > 0 and diff["ci95"][0] is not None and diff["ci95"][0] > 0
