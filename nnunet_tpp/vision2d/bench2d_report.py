"""The results of a ``bench2d`` suite: ``results.csv`` (one row per finished run), ``results.md`` (per dataset
the papers' columns as mean ± std over seeds, plus peak memory, throughput and their ratio to full
fine-tuning, and the machine), ``results.png`` (the main metric per method with std error bars).

Units: ``results.csv`` holds ACC/AUC/F1/Dice and ``trainable_ratio`` as fractions (0-1), as every
``metrics.json`` does (older percent files are converted on reading: :func:`~nnunet_tpp.vision2d.metrics.read_metrics`);
the printed ``results.md`` table and the plot show percent and say so. The files are rebuilt from every
finished run folder each time, so any process (another shard, ``--report``) can write them; writes are atomic.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import statistics
from pathlib import Path

from nnunet_tpp.vision2d.metrics import FRACTIONS, read_metrics

COLUMNS = ("dataset", "task", "method", "peft_method", "tpp", "label_fraction", "seed", "acc", "auc", "f1", "dice",
           "hd95", "trainable_ratio", "peak_memory_mb", "memory_kind", "images_per_s", "seconds", "best_epoch",
           "train_images", "test_images", "device", "run_dir")
METRICS = {"cls": (("acc", "ACC"), ("auc", "AUC"), ("f1", "F1")), "seg": (("dice", "Dice"), ("hd95", "HD95"))}
REFERENCE = "full"


def collect_rows(suite) -> list[dict]:
    """One dict per finished run of the suite (metrics.json plus the run's wall time)."""
    rows = []
    for run in suite.runs:
        try:
            metrics = read_metrics(run.out / "metrics.json")
        except (OSError, ValueError):
            continue
        try:
            seconds = json.loads((run.out / "bench_run.json").read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            seconds = float("nan")
        row = {k: metrics.get(k, "") for k in COLUMNS}
        row.update(dataset=run.dataset, task=run.values["task"], method=run.method,
                   peft_method=run.values.get("method", run.method), tpp=run.tpp, label_fraction=run.label_fraction,
                   seed=run.seed, seconds=seconds, run_dir=str(run.out))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v != "" and v is not None and not math.isnan(float(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _fmt(mean: float, std: float, digits: int = 2, scale: float = 1.0) -> str:
    if math.isnan(mean):
        return "—"
    mean, std = mean * scale, std * scale
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")


def _shown(key: str) -> float:
    """The factor a value of ``key`` is printed with: 100 for fractions (shown in percent), else 1."""
    return 100.0 if key in FRACTIONS else 1.0


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Per dataset, one entry per (method, tpp, label fraction) in suite order with mean/std of every number."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["tpp"], row["label_fraction"]), []).append(row)
    result: dict[str, list[dict]] = {}
    for (dataset, method, tpp, frac), members in groups.items():
        entry = {"dataset": dataset, "method": method, "tpp": tpp, "label_fraction": frac,
                 "task": members[0]["task"], "peft_method": members[0]["peft_method"], "n": len(members),
                 "seeds": sorted(m["seed"] for m in members)}
        for key in ("acc", "auc", "f1", "dice", "hd95", "trainable_ratio", "peak_memory_mb", "images_per_s",
                    "seconds"):
            entry[key] = _mean_std([m[key] for m in members])
        result.setdefault(dataset, []).append(entry)
    return result


def _reference(entries: list[dict], entry: dict) -> dict | None:
    for other in entries:
        if other["peft_method"] == REFERENCE and other["tpp"] == "none" \
                and other["label_fraction"] == entry["label_fraction"]:
            return other
    return None


def _ratio(value: float, reference: float) -> str:
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return "—"
    return f"{value / reference:.2f}×"


def markdown(suite, rows: list[dict], failed: list[str], machine: str) -> str:
    """The ``results.md`` text."""
    lines = [f"# {suite.name}", "", f"Suite `{suite.source}`: {len(rows)} of {len(suite.runs)} runs finished.",
             f"Machine: {machine}.", ""]
    kinds = sorted({str(r["memory_kind"]) for r in rows if r["memory_kind"]})
    if kinds:
        lines += [f"Peak memory: {', '.join(kinds)} of each run's own process; images/s: training images per "
                  f"second of training-loop time; time: wall time of the whole run (incl. TPP, evaluation).", ""]
    fractions = {r["label_fraction"] for r in rows}
    for dataset, entries in group_rows(rows).items():
        task = entries[0]["task"]
        names = [f"{label} (%)" if key in FRACTIONS else f"{label} (px)" for key, label in METRICS[task]]
        has_full = any(e["peft_method"] == REFERENCE and e["tpp"] == "none" for e in entries)
        head = ["Method", "TPP"] + (["Labels"] if len(fractions) > 1 else []) + ["n"] + names + \
               ["Ratio (%)", "Peak memory (MB)", "Images/s", "Time (s)"] + \
               (["Memory vs full", "Speed vs full"] if has_full else [])
        lines += [f"## {dataset} ({'classification' if task == 'cls' else 'segmentation'})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in entries:
            cells = [e["method"], e["tpp"]] + ([f"{e['label_fraction']:g}"] if len(fractions) > 1 else []) + \
                    [str(e["n"])] + [_fmt(*e[key], scale=_shown(key)) for key, _ in METRICS[task]] + \
                    [_fmt(*e["trainable_ratio"], scale=100.0), _fmt(*e["peak_memory_mb"], digits=0),
                     _fmt(*e["images_per_s"], digits=1), _fmt(*e["seconds"], digits=0)]
            if has_full:
                ref = _reference(entries, e)
                cells += [_ratio(e["peak_memory_mb"][0], ref["peak_memory_mb"][0]) if ref else "—",
                          _ratio(e["images_per_s"][0], ref["images_per_s"][0]) if ref else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Mean ± sample standard deviation over the seeds (n runs); metrics in percent here (fractions in "
                 "results.csv and metrics.json) on the test split at the epoch with the best validation score; "
                 "HD95 in pixels at the evaluated resolution.")
    for note in suite.notes:
        lines.append(f"- {note}")
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failed]
    missing = [r for r in suite.runs if not r.finished]
    if missing and not failed:
        lines += ["", f"{len(missing)} runs not finished yet."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of the main metric (ACC or Dice) per method/TPP, one panel per dataset, std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grouped = group_rows(rows)
    fig, axes = plt.subplots(1, max(len(grouped), 1), figsize=(max(4.0, 1.2 + 0.7 * max(
        (len(v) for v in grouped.values()), default=1)) * max(len(grouped), 1), 4.2), squeeze=False)
    colours = {"none": "#4c72b0", "mae": "#dd8452", "dino": "#55a868"}
    fractions = {r["label_fraction"] for r in rows}
    for ax, (dataset, entries) in zip(axes[0], grouped.items()):
        key = "acc" if entries[0]["task"] == "cls" else "dice"
        labels = [e["method"] + ("" if e["tpp"] == "none" else f"+{e['tpp']}") +
                  (f"\n{e['label_fraction']:g}" if len(fractions) > 1 else "") for e in entries]
        means = [100.0 * e[key][0] for e in entries]
        errors = [0.0 if math.isnan(e[key][1]) else 100.0 * e[key][1] for e in entries]
        ax.bar(range(len(entries)), means, yerr=errors, capsize=4,
               color=[colours.get(e["tpp"], "grey") for e in entries])
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ACC (%)" if key == "acc" else "Dice (%)")
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
        ax.set_title(dataset)
    if not grouped:
        axes[0][0].text(0.5, 0.5, "no finished runs", ha="center")
    fig.tight_layout()
    tmp = path.with_suffix(f".tmp-{_writer()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _writer() -> str:
    """host-pid: temporary names that processes on several machines sharing the folder cannot collide on."""
    return f"{socket.gethostname()}-{os.getpid()}"


def machine(device: str) -> str:
    """The machine description of :func:`nnunet_tpp.measuring.machine_description` for the suite's device."""
    import torch

    from nnunet_tpp.measuring import machine_description
    kind = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    return machine_description(kind)


def write_results(suite, failed: list[str] = ()) -> dict[str, Path]:
    """Writes ``results.csv``, ``results.md`` and ``results.png`` into the suite folder (atomically)."""
    rows = collect_rows(suite)
    suite.out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": suite.out / "results.csv", "md": suite.out / "results.md", "png": suite.out / "results.png"}
    tmp = paths["csv"].with_suffix(f".tmp-{_writer()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, paths["csv"])
    tmp = paths["md"].with_suffix(f".tmp-{_writer()}")
    tmp.write_text(markdown(suite, rows, list(failed), machine(suite.device)))
    os.replace(tmp, paths["md"])
    plot(rows, paths["png"])
    return paths
