"""The command line of ``nnunet-tpp bench-ssa``; the measurement is :mod:`nnunet_tpp.vision2d.ssa_bench`.
Importing this module imports neither torch nor the package's models, so that ``--help`` answers at once."""
from __future__ import annotations

import sys


def add_ssa_bench_parser(sub) -> None:
    """Adds the ``bench-ssa`` sub-command to an argparse sub-parser collection."""
    import argparse
    p = sub.add_parser("bench-ssa", help="memory and speed of the ESSA SSA step, full vs PEFT methods",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="vit_base", help="vit_tiny | vit_small | vit_base | vit_large")
    p.add_argument("--img-size", dest="img_size", type=int, default=224)
    p.add_argument("--patch-size", dest="patch_size", type=int, default=16)
    p.add_argument("--in-chans", dest="in_chans", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to measure (default: full apla lora ssf; full is always measured)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out-dim", dest="out_dim", type=int, default=None,
                   help="DINO head prototypes (default: ESSA's 65536)")
    p.add_argument("--n-local", dest="n_local", type=int, default=None, help="local views (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per measuring process")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the result as JSON")
    p.set_defaults(func=ssa_bench_main)


def ssa_bench_main(args) -> int:
    """Runs :func:`run_ssa_bench` from parsed arguments and prints the table; 2 with a message on bad input."""
    from nnunet_tpp.vision2d.ssa_bench import DEFAULT_METHODS, format_ssa_report, run_ssa_bench
    options = {k: getattr(args, k) for k in ("out_dim", "n_local") if getattr(args, k) is not None}
    try:
        result = run_ssa_bench(args.arch, args.img_size, args.patch_size, args.in_chans, None,
                               args.methods or DEFAULT_METHODS, args.batch, args.steps, args.warmup, args.device,
                               options, args.threads, args.json_out, log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:  # SSAError, PeftError, unknown arch
        print(f"nnunet-tpp bench-ssa: error: {exc}", file=sys.stderr)
        return 2
    print(format_ssa_report(result))
    return 0
