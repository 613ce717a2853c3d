"""Running a ``bench2d`` suite: every run in its own child process, on its own device from ``--devices``, only
the runs of ``--shard I/N``, each under its run folder's lock (:mod:`nnunet_tpp.vision2d.bench2d_lock`), so that
any number of processes and machines can share one suite folder; then the results of whatever is finished
(:mod:`nnunet_tpp.vision2d.bench2d_report`). :func:`report_suite` writes the results alone (``--report``).

Order: every argument and the suite folder are checked first (devices exist, the shard is I/N, the folder is
this suite's: :mod:`nnunet_tpp.vision2d.bench2d_parallel`); only then is anything written or started.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

from nnunet_tpp.vision2d.bench2d import Run, Suite
from nnunet_tpp.vision2d.bench2d_lock import STALE_AFTER, Heartbeat, RunLock
from nnunet_tpp.vision2d.bench2d_parallel import (DevicePool, ParallelError, check_suite_folder, in_shard, jobs_for,
                                                  parse_devices, record_suite)
from nnunet_tpp.vision2d.metrics import percent, read_metrics

# runs a command and exits with its code: the run's process then starts with a fresh peak RSS (a child exec'd
# straight from this process would inherit this process' peak as its ru_maxrss)
_RELAY = "import subprocess, sys; rc = subprocess.call(sys.argv[1:]); sys.exit(128 - rc if rc < 0 else rc)"
UPSTREAM_WAIT = 10.0  # seconds between looks at an upstream pre-training another process runs


def _run_child(run: Run, device: str | None) -> tuple[int, float]:
    """Runs one ``train2d`` in a fresh interpreter (on ``device`` when given); output to ``<run>/train.log``."""
    run.out.mkdir(parents=True, exist_ok=True)
    values = dict(run.values, **({"device": device} if device else {}))
    recipe = run.out / "bench_run.yaml"
    recipe.write_text(yaml.safe_dump(values, sort_keys=False))
    command = [sys.executable, "-m", "nnunet_tpp.cli", "train2d", "--config", str(recipe), "--no-progress"]
    started = time.perf_counter()
    with open(run.out / "train.log", "a") as stream:
        stream.write(f"$ {' '.join(command)}  # {socket.gethostname()} pid {os.getpid()}\n")
        stream.flush()
        rc = subprocess.call([sys.executable, "-c", _RELAY, *command], stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if rc == 0:
        (run.out / "bench_run.json").write_text(json.dumps({"seconds": seconds, "device": values.get("device"),
                                                            "units": {"seconds": "s"}}))
    return rc, seconds


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join("      " + line for line in path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def _main_metric(run: Run) -> str:
    try:
        metrics = read_metrics(run.out / "metrics.json")
    except (OSError, ValueError):
        return ""
    key = "acc" if metrics.get("task", run.values["task"]) == "cls" else "dice"
    return f" ({key} {percent(metrics.get(key, float('nan'))):.1f}%)"


def _check_unchanged(run: Run, log: Callable[[str], None]) -> None:
    """Warns when a finished run was made with other settings than the suite's now (runs older than the suite's
    ``suite.json`` fingerprint; the fingerprint itself refuses such folders)."""
    try:
        saved = yaml.safe_load((run.out / "config.yaml").read_text()) or {}
    except OSError:
        return
    backbone = run.values.get("backbone")
    if backbone is not None and not Path(backbone).exists():
        return
    from nnunet_tpp.vision2d.config import identity_of
    planned, saved = run.config().identity(), identity_of(saved)
    changed = sorted(k for k in planned if saved.get(k) != planned[k])
    if changed:
        log(f"    warning: this finished run was made with other settings ({', '.join(changed)}); delete its "
            f"folder to run it again")


def check_devices(suite: Suite, devices: list[str] | None) -> None:
    """Checks that every device the runs will use exists here (``--devices``, or each run's own ``device``)."""
    from nnunet_tpp.vision2d.checks import resolve_device
    names = set(devices or []) or {str(r.values.get("device", "auto")) for r in suite.runs}
    if suite.upstream is not None and not devices:
        names.add(str(suite.upstream.get("device", "auto")))
    for name in sorted(names):
        try:
            resolve_device(name)
        except RuntimeError as e:
            raise ParallelError(f"device of the suite: {e}") from None


def _upstream(suite: Suite, log, progress: bool, device: str | None, beat: Heartbeat, stale_after: float) -> Path:
    """The upstream MAE checkpoint: pre-trained here under a lock, or waited for while another process does it."""
    from nnunet_tpp.vision2d.upstream import pretrain_mae_upstream
    kwargs = dict(suite.upstream, **({"device": device} if device else {}))
    target = Path(kwargs["out_file"])
    lock = RunLock(target.parent, stale_after)
    while True:
        if lock.acquire():
            beat.add(lock)
            try:
                return pretrain_mae_upstream(**kwargs, log=log, progress=progress)
            finally:
                beat.discard(lock)
                lock.release()
        log(f"upstream MAE pre-training is running elsewhere ({lock.describe()}); waiting for {target}")
        while lock.holder() is not None and not lock.is_stale(lock.holder() or {}):
            time.sleep(UPSTREAM_WAIT)


def run_suite(suite: Suite, log: Callable[[str], None] = print, jobs: int | None = None, progress: bool = True,
              devices: list[str] | str | None = None, shard: tuple[int, int] | None = None,
              stale_after: float | None = None) -> dict:
    """Runs the unfinished runs of the suite (of ``shard``), each in a fresh child process, then writes the
    results of every finished run of the whole suite.

    Args:
        suite: from :func:`~nnunet_tpp.vision2d.bench2d.load_suite`.
        log: where progress lines go.
        jobs: runs at a time (default: one per device, else 1; above 1 the time and throughput numbers of
            runs that share a machine are not comparable).
        progress: progress bars in the upstream pre-training.
        devices: a device per concurrent run (names, or the text of ``--devices``); None: each run's own
            ``device`` setting.
        shard: ``(I, N)``: only the I-th of N slices (:func:`~nnunet_tpp.vision2d.bench2d_parallel.in_shard`).
        stale_after: seconds after which another host's lock without heartbeat counts as stale (default 600).
    Returns:
        ``{"failed": [...], "ran": n, "skipped": n, "busy": n, "results": {csv, md, png paths}}``; ``busy``:
        runs another process held the lock of.
    Raises:
        ParallelError / SuiteError: bad devices, jobs or shard, or a folder of another suite (nothing written).
    """
    from nnunet_tpp.vision2d.bench2d_report import write_results
    devices = parse_devices(devices) if isinstance(devices, str) else devices
    jobs = jobs_for(jobs, devices)
    check_devices(suite, devices)
    recorded = check_suite_folder(suite)
    stale_after = STALE_AFTER if stale_after is None else float(stale_after)
    mine = [run for run in suite.runs if in_shard(run.index, shard)]
    record_suite(suite, recorded)
    log(f"suite {suite.name}: {len(suite.runs)} runs in {suite.out}"
        + (f"; shard {shard[0]}/{shard[1]}: {len(mine)} of them" if shard else "")
        + (f"; devices {', '.join(devices)}" if devices else "") + f"; {jobs} at a time")
    for note in suite.notes:
        log(f"note: {note}")
    total, failed, counts = len(suite.runs), [], {"ran": 0, "skipped": 0, "busy": 0}
    pool = DevicePool(devices) if devices else None
    with Heartbeat(min(30.0, stale_after / 10)) as beat:
        if suite.upstream is not None:
            backbone = _upstream(suite, log, progress, devices[0] if devices else None, beat, stale_after)
            for run in suite.runs:
                run.values["backbone"] = str(backbone)

        def one(run: Run) -> None:
            """Skips, or locks and runs, one run (in this thread); records the outcome."""
            head = f"run {run.index}/{total}: {run.dataset} {run.label}" + \
                   (f" frac {run.label_fraction:g}" if run.label_fraction != 1 else "") + f" seed {run.seed}"
            if run.finished:
                counts["skipped"] += 1
                log(f"{head} ... finished before, skipped (resumable: finished runs are not repeated)")
                _check_unchanged(run, log)
                return
            lock = RunLock(run.out, stale_after)
            if not lock.acquire():
                counts["busy"] += 1
                log(f"{head} ... running in another process ({lock.describe()}), skipped")
                return
            beat.add(lock)
            device = pool.take() if pool else None
            try:
                if run.finished:  # finished by another process between the first look and the lock
                    counts["skipped"] += 1
                    log(f"{head} ... finished in another process, skipped")
                    return
                log(f"{head} ... started" + (f" on {device}" if device else "") if jobs > 1 or device else
                    f"{head} ...")
                rc, seconds = _run_child(run, device)
            finally:
                if pool:
                    pool.give(device)
                beat.discard(lock)
                lock.release()
            counts["ran"] += 1
            if rc == 0 and run.finished:
                log(f"{head} ... done in {seconds:.0f} s{_main_metric(run)}")
                return
            why = " (killed: out of memory?)" if rc in (137, 247) else ""
            failed.append(f"{run.dataset} {run.label} frac {run.label_fraction:g} seed {run.seed} (exit {rc}{why}; "
                          f"log {run.out / 'train.log'})")
            log(f"{head} ... FAILED with exit code {rc}{why} after {seconds:.0f} s; the end of "
                f"{run.out / 'train.log'}:\n{_log_tail(run.out / 'train.log')}")

        if jobs <= 1:
            for run in mine:
                one(run)
        else:
            with ThreadPoolExecutor(jobs) as executor:
                list(executor.map(one, mine))
    files = write_results(suite, failed)
    log(f"results: {files['csv']}, {files['md']}, {files['png']}")
    if failed:
        log(f"{len(failed)} of {len(mine)} runs failed:\n" + "\n".join(f"  {f}" for f in failed))
    return {"failed": failed, **counts, "results": files}


def report_suite(suite: Suite, log: Callable[[str], None] = print) -> dict:
    """Writes the results (csv, md, png) of every finished run of the suite, whichever process or machine ran
    it; runs nothing. Raises ParallelError for a folder of another suite, SuiteError for a missing one."""
    from nnunet_tpp.vision2d.bench2d import SuiteError
    from nnunet_tpp.vision2d.bench2d_report import write_results
    if not suite.out.is_dir():
        raise SuiteError(f"{suite.out} does not exist: nothing to report (run the suite first)")
    check_suite_folder(suite)
    files = write_results(suite, [])
    done = sum(run.finished for run in suite.runs)
    log(f"report of {done} of {len(suite.runs)} finished runs: {files['csv']}, {files['md']}, {files['png']}")
    return files
