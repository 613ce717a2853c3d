"""The ``nnunet-tpp`` command: ``demo``, ``bench``, ``gpu-check``, ``evaluate``, ``convert``, ``pretrain``,
``experiment``, ``evidence``, ``trainers``, ``methods``, ``check``, ``adopt-plans``, ``restore`` (3-D), ``train2d``,
``bench2d`` and ``bench-ssa`` (2-D)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DEMO_RECIPE = "demo.yaml"


def _demo(args) -> int:
    from nnunet_tpp.demo.pipeline import DemoConfig, run_demo
    recipe = Path(args.config) if args.config else None
    overrides = dict(work_dir=args.work_dir, data=args.data, trainer=args.trainer, pretrained=args.pretrained,
                     epochs=args.epochs, iterations_per_epoch=args.iters, device=args.device,
                     upstream_epochs=args.upstream_epochs,
                     dataset_id=args.dataset_id)
    if args.labels:
        import json
        overrides["labels"] = json.loads(args.labels)
    cfg = DemoConfig.from_yaml(recipe, **overrides) if recipe else DemoConfig(
        **{k: (Path(v) if k in ("work_dir", "data", "pretrained") else v) for k, v in overrides.items()
           if v is not None})
    run_demo(cfg)
    return 0


def _methods(args) -> int:
    from nnunet_tpp import peft
    for name in peft.methods():
        entry = peft.get_method(name)
        print(f"{name:14s} {'/'.join(entry.models):12s} {'mergeable' if entry.mergeable else 'not mergeable':14s} "
              f"{entry.description}")
    return 0


def _trainers(args) -> int:
    from nnunet_tpp.trainers.zoo import TRAINERS
    for name in sorted(TRAINERS):
        print(name)
    return 0


def _check(args) -> int:
    """Checks that nnU-Net finds our trainers the way nnUNetv2_train does."""
    from nnunet_tpp._startup import VARIABLE, trainer_dir
    folders = [p for p in os.environ.get(VARIABLE, "").split(os.pathsep) if p]
    if trainer_dir() not in folders:
        print(f"{VARIABLE} does not list {trainer_dir()}: the start-up hook did not run. Reinstall with "
              f"pip, or run:  export {VARIABLE}={trainer_dir()}", file=sys.stderr)
        return 1
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_trainer_class_by_name("ConvAdapterTrainer")
    print(f"ok: nnU-Net finds {cls.__name__} ({cls.__module__}) via {VARIABLE}={trainer_dir()}")
    return 0


def _dataset_labels(dataset: str) -> dict:
    """The label map of an nnU-Net dataset (id or name), from nnUNet_raw or nnUNet_preprocessed, as written in
    its dataset.json (region-based entries keep their lists)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not dataset.startswith("Dataset") and not dataset.isdigit():
        raise ValueError(f"-d {dataset!r}: give an nnU-Net dataset id (e.g. 501) or name (Dataset501_X)")
    name = maybe_convert_to_dataset_name(dataset if dataset.startswith("Dataset") else int(dataset))
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        path = Path(os.environ.get(root, "")) / name / "dataset.json"
        if os.environ.get(root) and path.exists():
            import json
            return dict(json.loads(path.read_text())["labels"])
    raise FileNotFoundError(f"no dataset.json for {name} under $nnUNet_raw or $nnUNet_preprocessed")


def _fold_cases(dataset: str | None, fold: str) -> list[str] | None:
    """The validation cases of one fold from the dataset's ``splits_final.json`` (None for fold ``all``)."""
    import json
    if fold == "all":
        return None
    if not dataset:
        raise ValueError("--fold needs -d DATASET (its splits_final.json in $nnUNet_preprocessed names the cases)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    name = maybe_convert_to_dataset_name(dataset if dataset.startswith("Dataset") else int(dataset))
    path = Path(os.environ.get("nnUNet_preprocessed", "")) / name / "splits_final.json"
    if not os.environ.get("nnUNet_preprocessed") or not path.is_file():
        raise FileNotFoundError(f"--fold {fold}: no splits_final.json for {name} under $nnUNet_preprocessed "
                                f"(nnU-Net writes it when it trains a fold)")
    splits = json.loads(path.read_text())
    if not fold.isdigit() or int(fold) >= len(splits):
        raise ValueError(f"--fold {fold!r}: {path} has folds 0..{len(splits) - 1} (or use --fold all)")
    return list(splits[int(fold)]["val"])


def _evaluate(args) -> int:
    import json
    from nnunet_tpp.evaluation import check_output_file, evaluate_folder, write_json
    if args.labels:
        try:
            labels = {str(k): int(v) for k, v in json.loads(args.labels).items()}
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"--labels {args.labels!r} is not a JSON map of names to integers, e.g. "
                             """'{"background": 0, "liver": 1}'""") from None
    elif args.dataset:
        labels = _dataset_labels(args.dataset)
    else:
        raise ValueError("give the label set with -d DATASET or --labels JSON")
    cases = _fold_cases(args.dataset, args.fold) if args.fold is not None else None
    out = check_output_file(Path(args.json)) if args.json else None  # before the work, not after
    result = evaluate_folder(Path(args.reference), Path(args.prediction), labels, allow_missing=args.allow_missing,
                             cases=cases)
    print(result.markdown())
    print(f"({len(result.per_case)} cases; Dice as a fraction, HD95 in mm; per-case values with --json)")
    if out is not None:
        write_json(result, out)
    return 0


def _convert(args) -> int:
    from nnunet_tpp.data.converters import convert
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("set nnUNet_raw or pass --raw DIR: the converted dataset is written there")
    others = [os.environ.get(v) for v in ("nnUNet_preprocessed", "nnUNet_results")]  # their ids count too
    folder = convert(args.kind, Path(args.source), Path(raw), args.dataset_id, args.name, args.overwrite,
                     args.skip_invalid, other_roots=[p for p in others if p])
    import json
    info = json.loads((folder / "dataset.json").read_text())
    print(f"wrote {folder}: {info['numTraining']} training cases, labels {info['labels']}")
    skipped = folder / "skipped_cases.json"
    if skipped.exists():
        print(f"skipped {len(json.loads(skipped.read_text()))} invalid case(s), listed in {skipped}")
    return 0


def _pretrain(args) -> int:
    from nnunet_tpp.trainers.pretrain import pretrain
    out = pretrain(args.dataset, args.trainer, args.pretrained_weights, args.output, args.fold, args.configuration,
                   args.plans, args.device)
    print(f"wrote {out}; fine-tune from it with  NNUNET_TPP_TARGET_PARAMETERS={out} nnUNetv2_train ... "
          f"-tr <a trainer of the same method and size> -pretrained_weights {args.pretrained_weights}")
    return 0


def _experiment(args) -> int:
    from nnunet_tpp.experiment import Experiment, commands, evaluation_note, run_experiment
    exp = Experiment.from_yaml(Path(args.recipe))
    if args.run:
        run_experiment(exp, args.source, args.pretrained)
        return 0
    for cmd in commands(exp, args.source, args.pretrained):
        print(" ".join(cmd))
    print(f"# {evaluation_note(exp)}")
    return 0


def _adopt_plans(args) -> int:
    from nnunet_tpp.adopt_nnssl import adopt, is_nnssl_file, read_nnssl_checkpoint
    nnssl = is_nnssl_file(args.source)
    plans = adopt(args.source, args.dataset, args.plans_name, tuple(args.configurations), args.np,
                  not args.no_preprocess, args.spacing_mode, args.spacing, args.patch)
    name = plans.stem
    trainer, weights = "ConvAdapterTrainer_nnUNet", "<the model's fold_X/checkpoint_final.pth>"
    if nnssl:
        weights = os.path.abspath(args.source)
        if read_nnssl_checkpoint(args.source).architecture.startswith("Primus"):
            trainer = "FullFinetuneTrainer_Primus"
    print(f"plans {name} ready for {plans.parent.name}; train with\n  nnUNetv2_train {plans.parent.name} "
          f"{args.configurations[0]} 0 -p {name} -tr {trainer} -pretrained_weights {weights}")
    return 0


def _restore(args) -> int:
    from nnunet_tpp.trainers.restore import restore_checkpoint
    out = restore_checkpoint(Path(args.model_folder), args.fold, Path(args.backbone), args.checkpoint_name,
                             force=args.force)
    print(f"wrote {out}; nnUNetv2_predict can use this model folder now")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnunet-tpp``."""
    parser = argparse.ArgumentParser(prog="nnunet-tpp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the 3-D workflow end to end on a phantom (or --data) with nnU-Net")
    demo.add_argument("--config", help=f"YAML recipe (default: built-in settings; see configs/3d/{DEFAULT_DEMO_RECIPE})")
    demo.add_argument("--data", help="folder of NAME.nii.gz + NAME_labels.nii.gz pairs (default: phantom)")
    demo.add_argument("--labels", help='label names for --data as JSON, e.g. \'{"background":0,"liver":1}\'')
    demo.add_argument("--work-dir", dest="work_dir", help="output folder (default: ./nnunet_tpp_work)")
    demo.add_argument("--trainer", help="PEFT trainer (default: ConvAdapterTrainer_S)")
    demo.add_argument("--pretrained", help="published STU-Net checkpoint (default: pre-train one upstream)")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--iters", type=int, help="iterations per epoch")
    demo.add_argument("--upstream-epochs", dest="upstream_epochs", type=int,
                      help="epochs of the upstream pre-training (when no --pretrained is given)")
    demo.add_argument("--dataset-id", dest="dataset_id", type=int)
    demo.add_argument("--device", choices=["cpu", "cuda"])
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="step time / memory of PEFT vs full fine-tuning; merged vs unmerged")
    from nnunet_tpp.bench import add_bench_arguments, bench_main
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_main)

    gpu = sub.add_parser("gpu-check", help="the GPU path (autocast, Inductor, DDP, TPP) checked on a CUDA machine")
    from nnunet_tpp.gpu_check import add_gpu_check_arguments, gpu_check_main
    add_gpu_check_arguments(gpu)
    gpu.set_defaults(func=gpu_check_main)

    evaluate = sub.add_parser("evaluate", help="Dice and HD95 per label, region and case")
    evaluate.add_argument("reference", help="folder of reference label maps")
    evaluate.add_argument("prediction", help="folder of predictions (same file names)")
    evaluate.add_argument("-d", "--dataset", help="nnU-Net dataset id or name whose dataset.json names the labels")
    evaluate.add_argument("--labels", help='label names as JSON instead of -d, e.g. \'{"background":0,"liver":1}\'')
    evaluate.add_argument("--json", help="also write the results (per label, region and case) to this file")
    evaluate.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                          help="score a reference case without a prediction as Dice 0 / HD95 = image diagonal "
                               "(listed in the output) instead of refusing")
    evaluate.add_argument("--fold", help="evaluate only this fold's validation cases (from the dataset's "
                                         "splits_final.json; needs -d), e.g. against gt_segmentations")
    evaluate.set_defaults(func=_evaluate)

    conv = sub.add_parser("convert", help="LiTS / KiTS release folder -> nnU-Net raw dataset")
    conv.add_argument("kind", choices=["lits", "kits"])
    conv.add_argument("source", help="the release folder (read only)")
    conv.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, required=True)
    conv.add_argument("--name", help="dataset name (default LiTS / KiTS)")
    conv.add_argument("--raw", help="nnUNet_raw folder (default: $nnUNet_raw)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace the dataset of the same id and name that this command wrote before (a dataset "
                           "id taken by another name is always refused)")
    conv.add_argument("--skip-invalid", dest="skip_invalid", action="store_true",
                      help="convert the valid cases and list the others, instead of stopping")
    conv.set_defaults(func=_convert)

    pre = sub.add_parser("pretrain", help="the TPP pretext stage alone -> a target-parameter file")
    pre.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (preprocessed)")
    pre.add_argument("-tr", "--trainer", required=True, help="a TPP trainer, e.g. TPPConvAdapterTrainer_S")
    pre.add_argument("-pretrained_weights", "--pretrained-weights", dest="pretrained_weights", required=True,
                     help="the published STU-Net checkpoint")
    pre.add_argument("-o", "--output", required=True, help="target-parameter file to write")
    pre.add_argument("-f", "--fold", default="all", help="use this fold's training cases (default: all cases)")
    pre.add_argument("-c", "--configuration", default="3d_fullres")
    pre.add_argument("-p", "--plans", default="nnUNetPlans")
    pre.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    pre.set_defaults(func=_pretrain)

    exp = sub.add_parser("experiment", help="a 3-D comparison from a recipe (configs/3d/*_table10.yaml)")
    exp.add_argument("recipe")
    exp.add_argument("--source", required=True, help="the dataset's release folder (for nnunet-tpp convert)")
    exp.add_argument("--pretrained", required=True, help="the published STU-Net checkpoint")
    exp.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    exp.set_defaults(func=_experiment)

    sub.add_parser("methods", help="list the PEFT methods").set_defaults(func=_methods)
    sub.add_parser("trainers", help="list the nnU-Net trainer names").set_defaults(func=_trainers)
    sub.add_parser("check", help="check that nnU-Net finds the trainers").set_defaults(func=_check)

    adopt = sub.add_parser("adopt-plans", help="give dataset D the plans of a trained nnU-Net model or of an nnssl "
                                               "checkpoint, and preprocess it")
    adopt.add_argument("source", help="the model folder (…/Trainer__Plans__3d_fullres), one of its checkpoints, or an "
                                      "nnssl pre-training checkpoint")
    adopt.add_argument("-d", "--dataset", required=True, help="target dataset id or name (raw, in $nnUNet_raw)")
    adopt.add_argument("-p", "--plans-name", dest="plans_name", default=None,
                       help="name of the new plans (default: <source plans>_from_<source dataset>)")
    adopt.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    adopt.add_argument("-np", "--np", type=int, default=4, help="preprocessing processes (default 4)")
    adopt.add_argument("--no-preprocess", dest="no_preprocess", action="store_true",
                       help="write the plans only (run nnUNetv2_preprocess yourself)")
    adopt.add_argument("--patch", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                       help="nnssl: patch size (default: the checkpoint's recommended one; Primus: divisible by 8)")
    adopt.add_argument("--spacing-mode", dest="spacing_mode", default="like_pretrained",
                       choices=("like_pretrained", "default_nnunet", "fixed"),
                       help="nnssl: the pre-training spacing (default), nnU-Net's, or --spacing")
    adopt.add_argument("--spacing", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                       help="nnssl, --spacing-mode fixed: the spacing in mm (the plans' axis order)")
    adopt.set_defaults(func=_adopt_plans)

    restore = sub.add_parser("restore", help="rebuild checkpoint_final.pth from peft_weights.pth + the backbone")
    restore.add_argument("model_folder", help="nnU-Net model folder (…/Trainer__Plans__3d_fullres)")
    restore.add_argument("-f", "--fold", default="0")
    restore.add_argument("--backbone", required=True,
                         help="the pre-trained checkpoint the model was fine-tuned from (its fingerprint is checked)")
    restore.add_argument("--checkpoint-name", dest="checkpoint_name", default="checkpoint_final.pth")
    restore.add_argument("--force", action="store_true",
                         help="build the model on --backbone even if it is not the checkpoint the adapters were "
                              "trained on")
    restore.set_defaults(func=_restore)

    from nnunet_tpp.vision2d.cli import add_train2d_parser
    add_train2d_parser(sub)
    from nnunet_tpp.vision2d.bench2d_cli import add_bench2d_parser
    add_bench2d_parser(sub)
    from nnunet_tpp.vision2d.ssa_bench_cli import add_ssa_bench_parser
    add_ssa_bench_parser(sub)
    from nnunet_tpp.pretext.probe_cli import add_probe_parser
    add_probe_parser(sub)
    from nnunet_tpp.evidence.cli import add_evidence_parser
    add_evidence_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"nnunet-tpp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
