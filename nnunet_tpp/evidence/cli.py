"""``nnunet-tpp evidence``: the argument parser and its entry (nothing heavy is imported to build the parser)."""
from __future__ import annotations

import argparse
from pathlib import Path

ARM_NAMES = ("scratch", "head_only", "full", "conv_adapter", "conv_adapter_tpp_dino", "conv_adapter_tpp_mae")
ARM_NAMES_2D = ("head_only", "lora", "adapter", "adapter_tpp", "full")
ONLY_3D = ("upstream", "iters", "upstream_epochs", "voxels")
ONLY_2D = ("validation", "pretext_images")


def add_evidence_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``evidence`` sub-command to ``sub`` (an ``add_subparsers`` result) and returns its parser."""
    p = sub.add_parser(
        "evidence", help="does TPP make PEFT better? a seeded 3-D or 2-D protocol on real data -> evidence.json",
        description="3-D (--protocol 3d): upstream supervised pre-training of STU-Net on --upstream, then per seed "
                    "every arm (scratch, head_only, full, conv_adapter, conv_adapter_tpp_dino, conv_adapter_tpp_mae) "
                    "on --labelled cases of --downstream, scored with nnU-Net's sliding-window prediction on fixed "
                    "held-out test subjects. 2-D (--protocol 2d): LiteMedSAM's pre-trained encoder with head_only, "
                    "lora, adapter, adapter_tpp (SimMIM) and full on --labelled images of an images/ + masks/ folder. "
                    "Both: Dice and HD95, mean and spread over seeds, paired differences with 95 %% bootstrap "
                    "intervals; evidence.json, evidence.md and evidence.png in --out; a stopped run resumes from its "
                    "finished arms and seeds.")
    p.add_argument("--protocol", choices=("3d", "2d"), default="3d",
                   help="3d: NIfTI folders through nnU-Net (default); 2d: an images/ + masks/ folder, LiteMedSAM")
    p.add_argument("--upstream", help="3d: folder of NAME.nii.gz + NAME_labels.nii.gz with labels.json (pre-training)")
    p.add_argument("--downstream", help="the target task, split into test subjects and a pool (3d: the same layout "
                                        "as --upstream; 2d: images/ + masks/)")
    p.add_argument("--out", help="output folder (default: ./evidence)")
    p.add_argument("--config", help="YAML settings (default: built in; see configs/evidence/3d.yaml, 2d.yaml)")
    p.add_argument("--group", help="regex whose first group names a case's subject, e.g. '(la_\\d+)' (default: "
                                   "one subject per case); a subject's volumes stay on one side of the split")
    p.add_argument("--test", type=int, help="test subjects (default: a fifth of the downstream subjects)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    p.add_argument("--labelled", type=int, help="labelled training cases per seed (default 3d: 4, 2d: 12)")
    p.add_argument("--validation", type=int, help="2d: validation images per seed (default 8)")
    p.add_argument("--arms", help=f"comma-separated arms (default: all; 3d: {', '.join(ARM_NAMES)}; 2d: "
                                  f"{', '.join(ARM_NAMES_2D)})")
    p.add_argument("--epochs", type=int, help="epochs of every arm (default 3d: 10, 2d: 4)")
    p.add_argument("--iters", type=int, help="iterations per epoch (default 25)")
    p.add_argument("--upstream-epochs", dest="upstream_epochs", type=int, help="upstream epochs (default 16)")
    p.add_argument("--pretext-epochs", dest="pretext_epochs", type=int, help="TPP stage epochs (default 3d: 4, 2d: 1)")
    p.add_argument("--pretext-images", dest="pretext_images", type=int,
                   help="2d: pool images the TPP stage sees per seed (default 64)")
    p.add_argument("--voxels", type=int, help="voxel budget of the median case (sets the target spacing)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--full", action="store_true",
                   help="the longer schedule for a GPU (3d: on nnU-Net's own plan, configs/evidence/3d_full.yaml; "
                        "2d: configs/evidence/2d_full.yaml)")
    p.set_defaults(func=evidence_main)
    return p


def evidence_main(args) -> int:
    """Runs the chosen protocol with the parsed arguments; returns the exit code (2 for a flag of the other
    protocol)."""
    wrong = ONLY_2D if args.protocol == "3d" else ONLY_3D
    given_wrong = [f"--{name.replace('_', '-')}" for name in wrong if getattr(args, name) is not None]
    if given_wrong:
        print(f"nnunet-tpp evidence: {', '.join(given_wrong)} do(es) not apply to --protocol {args.protocol}")
        return 2
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    common = dict(downstream=args.downstream, out=args.out, group=args.group, test=args.test, seeds=args.seeds,
                  labelled=args.labelled, epochs=args.epochs, pretext_epochs=args.pretext_epochs, device=args.device,
                  arms=arms)
    if args.protocol == "2d":
        from nnunet_tpp.evidence.protocol2d import run_evidence_2d
        from nnunet_tpp.evidence.settings2d import FULL_SCHEDULE_2D, Evidence2D
        given = {**common, "validation": args.validation, "pretext_images": args.pretext_images}
        cls, full, run = Evidence2D, FULL_SCHEDULE_2D, run_evidence_2d
    else:
        from nnunet_tpp.evidence.protocol3d import run_evidence_3d
        from nnunet_tpp.evidence.settings import FULL_SCHEDULE, Evidence3D
        given = {**common, "upstream": args.upstream, "iterations_per_epoch": args.iters,
                 "upstream_epochs": args.upstream_epochs, "voxels": args.voxels}
        cls, full, run = Evidence3D, FULL_SCHEDULE, run_evidence_3d
    values = {k: (Path(v) if k in ("upstream", "downstream", "out") else v) for k, v in given.items() if v is not None}
    if args.full:  # the longer schedule, under what the command line sets
        values = {**full, **values}
    cfg = cls.from_yaml(Path(args.config), **values) if args.config else cls(**values)
    run(cfg)
    return 0
