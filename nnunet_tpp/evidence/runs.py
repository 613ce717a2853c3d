"""Where the evidence protocols keep each arm's finished seeds (``out/runs/ARM/seed_K/result.json``), the loop that
runs what is missing, and the atomic writes of every protocol file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

RESULT = "result.json"


def result_path(out: Path, arm: str, seed: int) -> Path:
    """The record of one finished arm and seed."""
    return Path(out) / "runs" / arm / f"seed_{seed}" / RESULT


def run_missing(out: Path, seeds: list[int], arms: list[str], run_one: Callable[[str, int, Path], dict],
                describe: Callable[[str, int], str], echo=print) -> None:
    """Runs ``run_one(arm, seed, arm_dir)`` for every seed and arm without a record, seed by seed, and writes each
    record it returns; finished ones are announced and skipped (``describe(arm, seed)``: the progress line's
    text)."""
    total, done = len(seeds) * len(arms), 0
    for seed in seeds:
        for arm in arms:
            done += 1
            path = result_path(out, arm, seed)
            if path.exists():
                echo(f"[{done}/{total}] {arm}, seed {seed}: finished earlier ({path})")
                continue
            echo(f"[{done}/{total}] {arm}, seed {seed}: {describe(arm, seed)}")
            atomic_json(path, run_one(arm, seed, path.parent))


def read_results(out: Path, arms: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """``{arm: [the record of each finished seed]}``."""
    return {arm: [json.loads(p.read_text()) for p in (result_path(out, arm, s) for s in seeds) if p.exists()]
            for arm in arms}


def atomic_json(path: Path, data) -> None:
    """Writes ``data`` as JSON to ``path`` (its folder made) through a temporary file and a rename."""
    atomic_write(path, json.dumps(data, indent=2))


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` (its folder made) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
