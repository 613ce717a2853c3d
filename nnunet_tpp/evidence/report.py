"""The evidence protocol's report: ``evidence.json``, ``evidence.md`` and ``evidence.png`` (per-case Dice by arm).

An arm *learnt* when its paired difference to the untrained network (the same seeds and test cases) has a 95 %
interval above zero (:func:`nnunet_tpp.evidence.stats.learnt`) and its mean Dice lies above the mean chance Dice
(marking each label everywhere). A comparison that involves an arm that did not
learn is kept in the JSON but marked ``"read": false``, and the run warns: such an arm's Dice is noise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nnunet_tpp.evaluation import markdown_table
from nnunet_tpp.evidence.runs import atomic_write, read_results
from nnunet_tpp.evidence.settings import COMPARISONS
from nnunet_tpp.evidence.stats import arm_summary, case_dice, learnt, paired_difference

EVIDENCE_JSON, EVIDENCE_MD, EVIDENCE_PLOT = "evidence.json", "evidence.md", "evidence.png"


def summarise(results: dict[str, list[dict]], untrained_arm: str, chance: dict[str, float],
              comparisons: list[tuple[str, str]] = COMPARISONS) -> dict:
    """The arms' summaries, the untrained network's, which arms learnt (module docstring; also above the mean
    chance Dice, :func:`nnunet_tpp.demo.report.chance_dice`), and the paired ``comparisons`` (arm, against).

    Returns:
        ``{"arms": {ARM: arm_summary + "learnt"}, "untrained": arm_summary, "paired": {"A - B": {...,
        "read"}}}``.
    """
    untrained = [r for run in results.get(untrained_arm, []) for r in run.get("untrained_per_case", [])]
    arms = {}
    for arm, runs in results.items():
        per_case = [r for run in runs for r in run["per_case"]]
        if per_case:
            summary = arm_summary(per_case)
            above_chance = summary["dice_mean"] > float(np.mean(list(chance.values()))) if chance else True
            arms[arm] = {**summary, "learnt": (learnt(per_case, untrained) and above_chance) if untrained else None}
    paired = {}
    for a, b in comparisons:
        if a in arms and b in arms:
            diff = paired_difference(arms[a]["per_case"], arms[b]["per_case"])
            paired[f"{a} - {b}"] = {**diff, "read": bool(arms[a]["learnt"] and arms[b]["learnt"])}
    return {"arms": arms, "untrained": arm_summary(untrained) if untrained else None, "paired": paired}


def write_evidence(out: Path, settings: dict, arms: list[str], seeds: list[int], chance: dict[str, float],
                   split: dict, steps: dict[str, float], seconds: float, untrained_arm: str,
                   comparisons: list[tuple[str, str]] = COMPARISONS, extra: dict | None = None, hd95_unit: str = "mm",
                   echo=print) -> dict:
    """Summarises the finished arms (``out/runs/ARM/seed_K/result.json``) and writes the three report files into
    ``out`` (atomically).

    Args:
        settings: the protocol's settings (JSON types). ``split``: the test cases, the pool and each seed's labelled
            cases. ``steps``: seconds of the protocol's shared steps (planning, upstream...), over resumed
            invocations too; each arm's training and prediction seconds are added from its results.
        seconds: the wall time of this invocation. ``extra``: further entries (the 3-D plan).
        hd95_unit: ``mm`` (3-D) or ``px`` (2-D).
    Returns:
        ``{"arms", "paired", "untrained", "chance_dice", "minutes", "wall_minutes_this_run", "settings", "split",
        "seconds", "hd95_unit", **extra}`` (``minutes``: the sum of ``seconds``).
    """
    out = Path(out)
    results = read_results(out, arms, seeds)
    summary = summarise(results, untrained_arm, chance, comparisons)
    steps = dict(steps)
    for arm, runs in results.items():
        steps[arm] = sum(sum(run.get("seconds", {}).values()) for run in runs)
    evidence = {**summary, "chance_dice": chance, "minutes": sum(steps.values()) / 60,
                "wall_minutes_this_run": seconds / 60, "settings": settings, **(extra or {}), "split": split,
                "seconds": steps, "hd95_unit": hd95_unit}
    atomic_write(out / EVIDENCE_JSON, json.dumps(evidence, indent=2))
    table = markdown_report(evidence)
    atomic_write(out / EVIDENCE_MD, table + "\n")
    plot_per_case(evidence, out / EVIDENCE_PLOT)
    echo("")
    echo(table)
    for arm, s in summary["arms"].items():
        if s["learnt"] is False:
            echo(f"WARNING: {arm} did not learn (its Dice is not above the untrained network's with 95 % confidence, "
                 f"or not above chance); no comparison is read from it. Train longer.")
    echo(f"\nwritten: {out / EVIDENCE_JSON}, {out / EVIDENCE_MD}, {out / EVIDENCE_PLOT}")
    return evidence


def markdown_report(evidence: dict) -> str:
    """The arms' table (Dice per label, mean ± std over seeds, HD95, learnt) and the paired differences."""
    arms = evidence["arms"]
    labels = list(next(iter(arms.values()))["dice"]) if arms else []
    rows = [[arm, *[s["dice"][n] for n in labels], f"{s['dice_mean']:.3f} ± {s['dice_std']:.3f}", s["hd95_mean"],
             len(s["seeds"]), {True: "yes", False: "no", None: "?"}[s["learnt"]]] for arm, s in arms.items()]
    if evidence.get("untrained"):
        u = evidence["untrained"]
        rows.append(["(untrained)", *[u["dice"][n] for n in labels], f"{u['dice_mean']:.3f}", u["hd95_mean"],
                     len(u["seeds"]), ""])
    rows.append(["(chance)", *[evidence["chance_dice"][n] for n in labels], "", "", "", ""])
    table = markdown_table(["arm", *[f"Dice {n}" for n in labels], "mean Dice ± std (seeds)",
                            f"HD95 ({evidence.get('hd95_unit', 'mm')})", "seeds",
                            "learnt"], rows)
    paired = [[name, d["mean_difference"], f"[{_f(d['ci95'][0])}, {_f(d['ci95'][1])}]", d["n"],
               "yes" if d["read"] else "no (an arm did not learn)"] for name, d in evidence["paired"].items()]
    if paired:
        table += "\n\n" + markdown_table(["paired difference (mean Dice)", "mean", "95 % bootstrap interval",
                                          "pairs (seed x case)", "read"], paired)
    return table


def _f(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def plot_per_case(evidence: dict, path: Path) -> None:
    """Per-case mean Dice by arm (one dot per seed and test case, colour by seed; the bar is the arm's mean),
    with the untrained network beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(arm, s["per_case"]) for arm, s in evidence["arms"].items()]
    if evidence.get("untrained"):
        columns.append(("(untrained)", evidence["untrained"]["per_case"]))
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2, 4))
    rng = np.random.default_rng(0)
    for i, (_, records) in enumerate(columns):
        values = np.array([case_dice(r) for r in records])
        seeds = np.array([r["seed"] for r in records])
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(values)), values, c=seeds, cmap="tab10", vmin=0, vmax=9, s=12,
                   alpha=0.8)
        ax.hlines(values.mean() if len(values) else np.nan, i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(columns)), [name for name, _ in columns], rotation=30, ha="right")
    ax.set_ylabel("mean Dice per test case")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("per-case Dice by arm (colour: seed; bar: mean)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
