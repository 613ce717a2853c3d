"""``nnunet-tpp bench2d SUITE.yaml``: run a 2D benchmark suite (configs/2d/), a slice of it, or list its runs, or
write the report of whatever is finished."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_bench2d_parser(sub) -> None:
    """Adds the ``bench2d`` sub-command to an argparse sub-parser collection."""
    p = sub.add_parser("bench2d", help="a 2-D benchmark suite: datasets x methods x TPP x seeds -> results table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="a suite YAML (configs/2d/); relative paths in it are taken from its folder")
    p.add_argument("--out", help="the suite folder (replaces the YAML's `out`)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the runs and which are finished; run nothing")
    p.add_argument("--report", action="store_true",
                   help="write results.{csv,md,png} of every finished run (of every shard and machine); run nothing")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (replaces defaults.device)")
    p.add_argument("--devices", help="a device per concurrent run, comma-separated (cuda:0,cuda:1,...; a device "
                                     "listed twice takes two runs), or `all` for every visible CUDA device")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default: one per --devices entry, else 1); above 1 on one device the "
                        "time and throughput numbers are not comparable")
    p.add_argument("--shard", help="I/N: run only the I-th of N deterministic slices of the suite (job arrays: "
                                   "one shard per task, one shared --out)")
    p.add_argument("--stale-after", dest="stale_after", type=float, default=None,
                   help="seconds without heartbeat after which another host's run lock is stale (default 600)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=bench2d_main)


def bench2d_main(args) -> int:
    """Runs (or, with ``--dry-run``, lists; with ``--report``, reports) a suite; exit code 1 when a run failed.
    Every flag is checked before anything is written or started."""
    from nnunet_tpp.vision2d.bench2d import describe_runs, load_suite
    from nnunet_tpp.vision2d.bench2d_parallel import ParallelError, jobs_for, parse_devices, parse_shard
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.devices is not None and args.device is not None:
        raise ParallelError("give --device (one device for every run) or --devices (one per concurrent run), "
                            "not both")
    if args.stale_after is not None and args.stale_after <= 0:
        raise ParallelError("--stale-after must be > 0 seconds")
    if args.dry_run and args.report:
        raise ParallelError("give --dry-run or --report, not both")
    suite = load_suite(Path(args.config), out=args.out, device=args.device)
    if args.dry_run:
        print("\n".join(describe_runs(suite, shard)))
        return 0
    if args.report:
        from nnunet_tpp.vision2d.bench2d_run import report_suite
        report_suite(suite, log=lambda line: print(line, flush=True))
        return 0
    from nnunet_tpp.vision2d.bench2d_run import run_suite
    devices = parse_devices(args.devices) if args.devices is not None else None
    jobs = jobs_for(args.jobs, devices)
    result = run_suite(suite, log=lambda line: print(line, flush=True), jobs=jobs, progress=args.progress,
                       devices=devices, shard=shard, stale_after=args.stale_after)
    if result["failed"]:
        print(f"nnunet-tpp bench2d: {len(result['failed'])} run(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0
