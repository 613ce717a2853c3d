"""``nnunet-tpp bench2d SUITE.yaml``: run a 2D benchmark suite (configs/2d/), or list its runs."""
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
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (replaces defaults.device)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time; above 1 the time and throughput numbers are not comparable")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=bench2d_main)


def bench2d_main(args) -> int:
    """Runs (or, with ``--dry-run``, lists) a suite; exit code 1 when a run failed."""
    from nnunet_tpp.vision2d.bench2d import describe_runs, load_suite, run_suite
    suite = load_suite(Path(args.config), out=args.out, device=args.device)
    if args.dry_run:
        print("\n".join(describe_runs(suite)))
        return 0
    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    result = run_suite(suite, log=lambda line: print(line, flush=True), jobs=args.jobs, progress=args.progress)
    if result["failed"]:
        print(f"nnunet-tpp bench2d: {len(result['failed'])} run(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0
