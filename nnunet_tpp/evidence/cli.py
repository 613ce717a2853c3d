"""``nnunet-tpp evidence``: the argument parser and its entry (nothing heavy is imported to build the parser)."""
from __future__ import annotations

import argparse
from pathlib import Path

ARM_NAMES = ("scratch", "head_only", "full", "conv_adapter", "conv_adapter_tpp_dino", "conv_adapter_tpp_mae")


def add_evidence_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``evidence`` sub-command to ``sub`` (an ``add_subparsers`` result) and returns its parser."""
    p = sub.add_parser(
        "evidence", help="does TPP make PEFT better? a seeded 3-D protocol on real data -> evidence.json",
        description="Upstream supervised pre-training of STU-Net on --upstream, then per seed every arm "
                    "(scratch, head_only, full, conv_adapter, conv_adapter_tpp_dino, conv_adapter_tpp_mae) on "
                    "--labelled cases of --downstream, scored with nnU-Net's sliding-window prediction on fixed "
                    "held-out test subjects: Dice and HD95, mean and spread over seeds, paired differences with 95 %% "
                    "bootstrap intervals. Writes evidence.json, evidence.md and evidence.png in --out; a stopped run "
                    "resumes from its finished arms and seeds.")
    p.add_argument("--upstream", help="folder of NAME.nii.gz + NAME_labels.nii.gz with labels.json (pre-training)")
    p.add_argument("--downstream", help="the same layout: the target task (split into test subjects and a pool)")
    p.add_argument("--out", help="output folder (default: ./evidence)")
    p.add_argument("--config", help="YAML settings (default: built in; see configs/evidence/3d.yaml)")
    p.add_argument("--group", help="regex whose first group names a case's subject, e.g. '(la_\\d+)' (default: "
                                   "one subject per case); a subject's volumes stay on one side of the split")
    p.add_argument("--test", type=int, help="test subjects (default: a fifth of the downstream subjects)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    p.add_argument("--labelled", type=int, help="labelled training cases per seed (default 4)")
    p.add_argument("--arms", help=f"comma-separated arms (default: all of {', '.join(ARM_NAMES)})")
    p.add_argument("--epochs", type=int, help="epochs of every arm (default 10)")
    p.add_argument("--iters", type=int, help="iterations per epoch (default 25)")
    p.add_argument("--upstream-epochs", dest="upstream_epochs", type=int, help="upstream epochs (default 16)")
    p.add_argument("--pretext-epochs", dest="pretext_epochs", type=int, help="TPP stage epochs (default 4)")
    p.add_argument("--voxels", type=int, help="voxel budget of the median case (sets the target spacing)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--full", action="store_true",
                   help="the longer schedule for a GPU on nnU-Net's own plan (configs/evidence/3d_full.yaml)")
    p.set_defaults(func=evidence_main)
    return p


def evidence_main(args) -> int:
    """Runs the 3-D protocol with the parsed arguments; returns the exit code."""
    from nnunet_tpp.evidence.protocol3d import run_evidence_3d
    from nnunet_tpp.evidence.settings import FULL_SCHEDULE, Evidence3D
    given = dict(upstream=args.upstream, downstream=args.downstream, out=args.out, group=args.group, test=args.test,
                 seeds=args.seeds, labelled=args.labelled, epochs=args.epochs, iterations_per_epoch=args.iters,
                 upstream_epochs=args.upstream_epochs, pretext_epochs=args.pretext_epochs, voxels=args.voxels,
                 device=args.device,
                 arms=[a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None)
    values = {k: (Path(v) if k in ("upstream", "downstream", "out") else v) for k, v in given.items() if v is not None}
    if args.full:  # the longer schedule, under what the command line sets
        values = {**FULL_SCHEDULE, **values}
    cfg = Evidence3D.from_yaml(Path(args.config), **values) if args.config else Evidence3D(**values)
    run_evidence_3d(cfg)
    return 0
