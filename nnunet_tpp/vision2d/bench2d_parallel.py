"""``bench2d`` beyond one process: a device per concurrent run (``--devices``), deterministic slices of a suite
(``--shard I/N``) for job arrays, and the suite fingerprint that keeps one output folder to one suite.

* Devices: ``--devices cuda:0,cuda:1`` (or ``all``: every CUDA device this process sees, e.g. the ones a batch
  system allotted through ``CUDA_VISIBLE_DEVICES``) is a pool; each concurrent run takes a device from it and
  gives it back when it ends, so ``--jobs`` runs (default: one per listed device) never share one. List a device
  twice to run two runs on it.
* Shards: run ``i`` (1-based, in suite order) belongs to shard ``(i - 1) % N + 1``: the N shards are disjoint
  and together cover the suite, for any N, on any machine that reads the same suite.
* Fingerprint: ``<out>/suite.json`` records the suite's name and, per run folder, a hash of the run's settings
  (:meth:`~nnunet_tpp.vision2d.config.Train2dConfig.identity`: without device, folder, workers). A folder recorded
  for a suite of another name, or whose started runs (a ``config.yaml`` or ``metrics.json`` in their folder) were
  made with other settings than the suite plans now, is refused before anything runs. Adding runs (seeds,
  methods, datasets) to a suite keeps its folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import socket
from pathlib import Path

from nnunet_tpp.vision2d.config import identity_of

SUITE_FILE = "suite.json"
SUITE_FORMAT = "nnunet_tpp.bench2d/1"


class ParallelError(ValueError):
    """A bad ``--devices`` / ``--shard`` / ``--jobs`` value, or an output folder of another suite."""


def parse_devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` / ``"cpu"`` / ``"all"`` -> the device names, each checked to exist here.

    Raises:
        ParallelError: an empty list, an unknown name, or a device this machine does not have.
    """
    import torch

    from nnunet_tpp.vision2d.checks import resolve_device
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if names == ["all"]:
        if not torch.cuda.is_available():
            raise ParallelError("--devices all: this torch sees no CUDA device (a CPU build or no GPU); give "
                                "--devices cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if not names or "all" in names or "auto" in names:
        raise ParallelError(f"--devices takes a comma-separated list such as cuda:0,cuda:1 (or all), got {text!r}")
    for name in names:
        try:
            resolve_device(name)
        except RuntimeError as e:
            raise ParallelError(f"--devices: {e}") from None
    return names


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; raises :class:`ParallelError` unless it is I/N with 1 <= I <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ParallelError(f"--shard takes I/N (the I-th of N slices, 1-based), e.g. 1/4; got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ParallelError(f"--shard {text}: I must be in 1..N and N >= 1 (e.g. 1/{max(count, 1)} to "
                            f"{max(count, 1)}/{max(count, 1)})")
    return index, count


def in_shard(run_index: int, shard: tuple[int, int] | None) -> bool:
    """Whether run ``run_index`` (1-based, suite order) belongs to ``shard`` (None: every run does)."""
    if shard is None:
        return True
    index, count = shard
    return (run_index - 1) % count == index - 1


def jobs_for(jobs: int | None, devices: list[str] | None) -> int:
    """The number of concurrent runs: ``jobs``, or one per device. Raises :class:`ParallelError` when the
    devices cannot give every concurrent run its own."""
    if jobs is None:
        return len(devices) if devices else 1
    if jobs < 1:
        raise ParallelError("--jobs must be >= 1")
    if devices and jobs > len(devices):
        raise ParallelError(f"--jobs {jobs} with {len(devices)} device(s): each concurrent run gets its own device; "
                            f"list more devices (a device listed twice takes two runs) or lower --jobs")
    return jobs


class DevicePool:
    """Hands out devices to concurrent runs: :meth:`take` blocks until one is free; :meth:`give` returns it."""

    def __init__(self, devices: list[str]):
        self._free: queue.Queue[str] = queue.Queue()
        for device in devices:
            self._free.put(device)

    def take(self) -> str:
        """A free device (waits for one)."""
        return self._free.get()

    def give(self, device: str) -> None:
        """Returns ``device`` to the pool."""
        self._free.put(device)


def run_fingerprint(values: dict) -> str:
    """A hash of a run's settings without the runtime fields (16 hex digits)."""
    text = json.dumps(identity_of(values), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _started(folder: Path) -> bool:
    return (folder / "config.yaml").exists() or (folder / "metrics.json").exists()


def _planned(suite) -> dict[str, str]:
    return {str(run.out.relative_to(suite.out)): run_fingerprint(run.values) for run in suite.runs}


def check_suite_folder(suite) -> dict | None:
    """Checks that ``suite.out`` is new or was written by this suite (module docstring); writes nothing.

    Returns:
        The recorded ``suite.json`` content, or None when the folder has none.
    Raises:
        ParallelError: the folder belongs to another suite, naming the runs and what to do.
    """
    path = suite.out / SUITE_FILE
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParallelError(f"{path} is unreadable ({e}); delete it if {suite.out} holds only this suite") from None
    if not isinstance(recorded, dict) or recorded.get("format") != SUITE_FORMAT:
        raise ParallelError(f"{path} is not a bench2d suite record; choose another --out")
    if recorded.get("name") != suite.name:
        raise ParallelError(f"{suite.out} was written by suite {recorded.get('name')!r} (from "
                            f"{recorded.get('source')}), not {suite.name!r} ({suite.source}); give this suite "
                            f"another `out` / --out")
    planned, runs = _planned(suite), recorded.get("runs", {})
    changed = [rel for rel, fp in planned.items() if rel in runs and runs[rel] != fp and _started(suite.out / rel)]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ParallelError(f"{suite.out}: {len(changed)} started run(s) were made with other settings than suite "
                            f"{suite.name!r} plans now ({shown}); give the changed suite another `out` / --out, or "
                            f"delete those run folders to run them again")
    return recorded


def record_suite(suite, recorded: dict | None) -> None:
    """Writes ``suite.json`` (the recorded runs plus the planned ones), atomically."""
    runs = dict((recorded or {}).get("runs", {}))
    runs.update(_planned(suite))
    content = {"format": SUITE_FORMAT, "name": suite.name, "source": str(suite.source), "runs": runs}
    suite.out.mkdir(parents=True, exist_ok=True)
    path = suite.out / SUITE_FILE
    tmp = path.with_name(f"{SUITE_FILE}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True))
    os.replace(tmp, path)
