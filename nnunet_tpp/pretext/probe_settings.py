"""Settings of ``nnunet-tpp tpp-probe`` (:class:`ProbeConfig`) and its command line; the probe itself is
:mod:`nnunet_tpp.pretext.probe`. Importing this module imports neither torch nor the package's models, so that the
command line answers ``--help`` at once."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field


@dataclass
class ProbeConfig:
    """Settings of :func:`run_probe` (see the module docstring)."""

    data: str = ""
    out: str = "tpp_probe"
    size: str = "S"
    method: str = "conv_adapter"
    backbone: str | None = None
    upstream_steps: int = 200
    upstream_patch: int = 32
    upstream_cases: int = 4
    spacing: tuple[float, float, float] = (7.7, 2.5, 2.5)
    view: tuple[int, int, int] = (16, 48, 48)
    per_class: int = 6
    test_share: float = 0.4
    seeds: int = 3
    epochs: int = 6
    iterations: int = 10
    batch: int = 2
    max_cases: int | None = None
    feature_stages: tuple[int, ...] = (-2, -1)
    seed: int = 0
    threads: int | None = None
    dims: list[int] | None = field(default=None)  # (tests) custom STU-Net widths instead of ``size``


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
