"""``bench2d`` over many processes and machines: shards that are disjoint and cover the suite, run locks (two
real processes on one suite never run the same run), the merged report equal to a single-process one, the
suite fingerprint, device checks, and reports of old percent metrics files."""
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nnunet_tpp.cli import main
from nnunet_tpp.vision2d.bench2d import load_suite
from nnunet_tpp.vision2d.bench2d_run import run_suite
from nnunet_tpp.vision2d.bench2d_lock import LOCK_NAME, RunLock
from nnunet_tpp.vision2d.bench2d_parallel import (ParallelError, in_shard, jobs_for, parse_devices, parse_shard,
                                                  record_suite)
from nnunet_tpp.vision2d.bench2d_report import write_results
from tests.conftest import REPO, balanced_pneumonia_subset

TINY = {"arch": "vit_tiny", "img_size": 28, "patch_size": 4, "epochs": 1, "batch_size": 64, "device": "cpu",
        "arch_options": {"depth": 2, "embed_dim": 48, "num_heads": 3}}
TIMING = ("peak_memory_mb", "images_per_s", "seconds", "run_dir", "device")  # differ between any two runs


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return balanced_pneumonia_subset(tmp_path_factory.mktemp("data") / "small.npz",
                                     {"train": 96, "val": 32, "test": 32})


def write_suite(folder: Path, data: Path, methods: list, name: str = "tiny", **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "out": str(folder / "out"), "defaults": TINY,
            "datasets": {"p": {"task": "cls", "data": str(data)}}, "methods": methods, "seeds": [0], **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def folder_hash(folder: Path) -> str:
    if not folder.exists():
        return "absent"
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        digest.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def test_shards_are_disjoint_deterministic_and_cover_the_suite(small_npz, tmp_path):
    path = write_suite(tmp_path, small_npz, ["linear_probe", "bitfit", "vpt", "ssf", "adapter"], seeds=[0, 1, 2],
                       label_fractions=[0.5, 1.0])
    runs = load_suite(path).runs
    assert len(runs) == 30
    for n in (1, 2, 3, 4, 7, 30, 31):
        slices = [{r.out for r in runs if in_shard(r.index, (i, n))} for i in range(1, n + 1)]
        assert set().union(*slices) == {r.out for r in runs}
        assert sum(len(s) for s in slices) == len(runs)  # disjoint
        assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced
    again = load_suite(path).runs  # another process reads the same suite: the same slices
    assert [(r.index, r.out) for r in again] == [(r.index, r.out) for r in runs]
    assert parse_shard("2/8") == (2, 8) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/2", "3/2", "1/0", "a/b", "2", "1/2/3", "-1/2"):
        with pytest.raises(ParallelError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("flags,message", [(["--shard", "3/2"], "I must be in 1..N"),
                                           (["--shard", "1-2"], "--shard takes I/N"),
                                           (["--devices", "cuda:3"], "cuda:3"),
                                           (["--devices", "all"], "--devices all"),
                                           (["--devices", "tpu:0"], "tpu:0"),
                                           (["--devices", "cpu,cpu", "--jobs", "3"], "its own device"),
                                           (["--device", "cpu", "--devices", "cpu"], "not both"),
                                           (["--device", "cuda:3"], "cuda:3")])
def test_bad_flags_stop_before_anything_is_written(small_npz, tmp_path, capsys, flags, message):
    import torch
    if torch.cuda.is_available() and "cuda:3" in flags and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    if torch.cuda.is_available() and flags == ["--devices", "all"]:
        pytest.skip("this machine has CUDA devices")
    path = write_suite(tmp_path, small_npz, ["linear_probe"])
    assert main(["bench2d", str(path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_devices_and_jobs():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert jobs_for(None, ["cpu", "cpu"]) == 2 and jobs_for(None, None) == 1 and jobs_for(1, ["cpu", "cpu"]) == 1
    with pytest.raises(ParallelError, match="--jobs must be"):
        jobs_for(0, None)


def test_a_folder_of_another_suite_is_refused_and_a_grown_suite_is_not(small_npz, tmp_path, capsys):
    first = write_suite(tmp_path, small_npz, ["linear_probe", "bitfit"], name="first")
    suite = load_suite(first)
    record_suite(suite, None)
    recorded = json.loads((suite.out / "suite.json").read_text())
    assert recorded["name"] == "first" and len(recorded["runs"]) == 2
    other = write_suite(tmp_path, small_npz, ["linear_probe"], name="second")
    before = folder_hash(suite.out)
    assert main(["bench2d", str(other)]) == 2
    assert "was written by suite 'first'" in capsys.readouterr().err and folder_hash(suite.out) == before
    assert main(["bench2d", str(other), "--report"]) == 2
    # a started run of the same suite whose settings changed: refused, naming the run
    run = suite.runs[0]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(run.config().to_dict()))
    changed = write_suite(tmp_path, small_npz, ["linear_probe", "bitfit"], name="first", defaults={**TINY, "epochs": 2})
    before = folder_hash(suite.out)
    assert main(["bench2d", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "started run(s) were made with other settings" in err and "linear_probe" in err
    assert folder_hash(suite.out) == before
    # more seeds and methods: the same suite, grown
    grown = load_suite(write_suite(tmp_path, small_npz, ["linear_probe", "bitfit", "vpt"], name="first",
                                   seeds=[0, 1]))
    from nnunet_tpp.vision2d.bench2d_parallel import check_suite_folder
    assert check_suite_folder(grown)["name"] == "first"


def test_run_locks_keep_out_live_holders_and_take_over_dead_ones(tmp_path):
    folder = tmp_path / "run"
    mine = RunLock(folder)
    assert mine.acquire() and (folder / LOCK_NAME).exists()
    assert not RunLock(folder).acquire()  # held (by this live process)
    mine.release()
    assert not (folder / LOCK_NAME).exists()
    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_NAME).write_text(json.dumps({"host": here, "pid": dead.pid, "started": 0}))
    taker = RunLock(folder)
    assert taker.acquire() and json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()  # stale: dead
    taker.release()
    (folder / LOCK_NAME).write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0}))
    assert not RunLock(folder).acquire()  # another host, fresh heartbeat: respected
    old = time.time() - 3600
    os.utime(folder / LOCK_NAME, (old, old))
    late = RunLock(folder, stale_after=600)
    assert late.acquire()  # no heartbeat for an hour: stale
    os.utime(folder / LOCK_NAME, (old, old))
    late.touch()  # the heartbeat keeps a long run's lock fresh: no longer an hour old, so not stale
    assert (folder / LOCK_NAME).stat().st_mtime > old and not late.is_stale(late.holder())
    (folder / LOCK_NAME).write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0}))
    late.release()  # a lock taken over by someone else is not removed
    assert (folder / LOCK_NAME).exists()


def _rows(folder: Path) -> list[dict]:
    rows = list(csv.DictReader(open(folder / "results.csv")))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _table(folder: Path) -> list[list[str]]:
    """results.md's table rows without the time, memory and speed columns (and the machine line)."""
    out = []
    for line in (folder / "results.md").read_text().replace(str(folder.parent), "<suite>").splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            out.append(line.split(" | ")[:7])
        elif not line.startswith(("Machine:", "Peak memory:", "|")):
            out.append([line])
    return out


# Runs ``nnunet-tpp`` with a rendezvous after each process' first lock attempt (the lock of run 1 in both processes
# of the test below): a process that has tried the lock waits, holding it if it got it, until every process has
# tried. So the two processes always contend for run 1 while one of them holds its lock; without it the second
# process could start after the first had finished run 1 and test nothing.
RENDEZVOUS = """
import os, sys, time
from pathlib import Path
from nnunet_tpp.vision2d import bench2d_lock
folder, parties = Path(sys.argv[1]), int(sys.argv[2])
acquire, first = bench2d_lock.RunLock.acquire, [True]
def acquire_then_meet(self):
    got = acquire(self)
    if first[0]:
        first[0] = False
        (folder / f"{os.getpid()}.{'got' if got else 'busy'}").write_text(str(self.folder))
        deadline = time.monotonic() + 600
        while len(list(folder.iterdir())) < parties:
            if time.monotonic() > deadline:
                sys.exit("rendezvous: the other process never tried the lock")
            time.sleep(0.05)
    return got
bench2d_lock.RunLock.acquire = acquire_then_meet
from nnunet_tpp.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_two_processes_on_one_suite_never_run_the_same_run_and_the_merged_report_matches(small_npz, tmp_path,
                                                                                          monkeypatch):
    """One process runs the whole suite, a second only shard 1/2 (the run the first starts with), both at once,
    into one folder, meeting after their attempts at run 1's lock (``RENDEZVOUS``): exactly one of them gets it and
    runs run 1, the other finds it held and skips it; the first runs run 2 as well. Then ``--report`` merges, and
    equals a single-process run of the same suite (one torch thread in every run, so the numbers are bitwise
    reproducible)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    methods = ["linear_probe", {"name": "adapter8", "method": "adapter", "method_options": {"bottleneck": 8}}]
    single = write_suite(tmp_path / "single", small_npz, methods)
    assert run_suite(load_suite(single), log=lambda _: None, progress=False)["failed"] == []
    shared = write_suite(tmp_path / "shared", small_npz, methods)
    meeting = tmp_path / "rendezvous"
    meeting.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", RENDEZVOUS, str(meeting), "2", "bench2d", str(shared), "--no-progress"]
    procs = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=tmp_path) for extra in ([], ["--shard", "1/2"])]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    suite = load_suite(shared)
    attempts = {p.suffix: p.read_text() for p in meeting.iterdir()}
    assert attempts == {".got": str(suite.runs[0].out), ".busy": str(suite.runs[0].out)}  # both tried run 1's lock
    winner = [i for i, p in enumerate(procs) if (meeting / f"{p.pid}.got").exists()]
    assert len(winner) == 1, outputs
    loser = 1 - winner[0]
    done = [{line.split(":")[0] for line in out.splitlines() if "... done in" in line} for out in outputs]
    busy = [{line.split(":")[0] for line in out.splitlines() if "... running in another process" in line}
            for out in outputs]
    assert "run 1/2" in done[winner[0]] and busy[loser] == {"run 1/2"}, outputs  # held, so skipped: not run twice
    assert not done[0] & done[1] and done[0] | done[1] == {"run 1/2", "run 2/2"}, outputs
    assert done[1] <= {"run 1/2"} and "run 2/2" in done[0]  # shard 1/2: run 1 only; the whole suite: run 2 too
    for run in suite.runs:
        log = (run.out / "train.log").read_text()
        assert log.count("$ ") == 1 and not (run.out / LOCK_NAME).exists()
    assert main(["bench2d", str(shared), "--report"]) == 0
    assert _rows(tmp_path / "shared" / "out") == _rows(tmp_path / "single" / "out")
    assert _table(tmp_path / "shared" / "out") == _table(tmp_path / "single" / "out")


def test_a_live_lock_is_skipped_and_old_percent_files_are_reported_as_fractions(small_npz, tmp_path):
    suite = load_suite(write_suite(tmp_path, small_npz, ["linear_probe", "bitfit"]))
    first, second = suite.runs
    first.out.mkdir(parents=True)
    (first.out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                    "started": 0}))  # a live process of this host holds it
    old = {"acc": 75.0, "auc": 80.0, "f1": 70.0, "trainable_ratio": 0.5, "peak_memory_mb": 900.0,
           "images_per_s": 10.0, "task": "cls", "best_epoch": 1, "train_images": 96, "test_images": 32}
    second.out.mkdir(parents=True)
    (second.out / "metrics.json").write_text(json.dumps(old))  # a finished run of an older version (percent)
    lines = []
    result = run_suite(suite, log=lines.append, progress=False)
    assert (result["ran"], result["busy"], result["skipped"]) == (0, 1, 1)
    assert any("running in another process" in line for line in lines)
    assert not (first.out / "metrics.json").exists() and (first.out / LOCK_NAME).exists()
    rows = list(csv.DictReader(open(suite.out / "results.csv")))
    assert [(r["method"], float(r["acc"]), float(r["trainable_ratio"])) for r in rows] == [("bitfit", 0.75, 0.005)]
    md = (suite.out / "results.md").read_text()
    assert "| bitfit | none | 1 | 75.00 | 80.00 | 70.00 | 0.50 |" in md
    write_results(suite)  # the same files again from the same folders
    assert list(csv.DictReader(open(suite.out / "results.csv"))) == rows


def test_partial_auto_without_a_known_pre_training_stops_the_suite_before_it_starts(small_npz, tmp_path, capsys):
    path = write_suite(tmp_path, small_npz, ["linear_probe", "partial"])  # random init: no pre-training
    assert main(["bench2d", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run p partial" in err and "quarter=N" in err and not (tmp_path / "out").exists()
    explicit = write_suite(tmp_path, small_npz, [{"name": "partial3", "method": "partial",
                                                  "method_options": {"quarter": 3}}])
    assert len(load_suite(explicit).runs) == 1
    upstream = write_suite(tmp_path, small_npz, ["partial"], name="up",  # the upstream MAE is restorative
                           upstream={"data": str(small_npz), "epochs": 1})
    assert [r.method for r in load_suite(upstream).runs] == ["partial"]
