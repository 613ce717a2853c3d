"""The command line of ``nnunet-tpp tpp-probe``; the probe is :mod:`nnunet_tpp.pretext.probe`. Importing this module
imports neither torch nor the package's models, so that ``--help`` answers at once."""
from __future__ import annotations

import argparse
import json

from nnunet_tpp.pretext.probe_settings import ProbeConfig


def add_probe_parser(sub) -> None:
    """Registers ``nnunet-tpp tpp-probe``."""
    p = sub.add_parser("tpp-probe", help="linear probe across cases of the encoder features before / after the TPP "
                                         "pretext stages (DINO, masked), with seeds")
    d = ProbeConfig()
    p.add_argument("--data", required=True, help="folder of NAME.nii.gz + NAME_labels.nii.gz (the demo layout), "
                                                 "e.g. ../shared/data/mri3d/chaos_t2")
    p.add_argument("--out", default=d.out, help="work folder (upstream backbone, stage states, probe.json)")
    p.add_argument("--size", default=d.size, choices=["S", "B", "L", "H"])
    p.add_argument("--method", default=d.method)
    p.add_argument("--backbone", help="a pre-trained STU-Net checkpoint (default: pre-train one on phantoms)")
    p.add_argument("--upstream-steps", dest="upstream_steps", type=int, default=d.upstream_steps)
    p.add_argument("--spacing", type=float, nargs=3, default=d.spacing, help="resampling spacing z y x (mm)")
    p.add_argument("--view", type=int, nargs=3, default=d.view, help="view z y x in voxels (multiples of 4 16 16)")
    p.add_argument("--per-class", dest="per_class", type=int, default=d.per_class, help="views per label and case")
    p.add_argument("--test-share", dest="test_share", type=float, default=d.test_share)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--iterations", type=int, default=d.iterations, help="pretext iterations per epoch")
    p.add_argument("--batch", type=int, default=d.batch, help="pretext batch size")
    p.add_argument("--max-cases", dest="max_cases", type=int, help="use the first N cases only")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=probe_main)


def probe_main(args: argparse.Namespace) -> int:
    """Runs the probe from parsed arguments and prints the table."""
    from nnunet_tpp.pretext.probe import format_table, run_probe
    fields = {k: getattr(args, k) for k in ProbeConfig.__dataclass_fields__ if hasattr(args, k)}
    for key in ("spacing", "view"):
        fields[key] = tuple(fields[key])
    cfg = ProbeConfig(**fields)
    result = run_probe(cfg)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
