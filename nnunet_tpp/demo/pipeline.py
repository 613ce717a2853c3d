"""``nnunet-tpp demo``: the whole 3-D workflow on a small dataset with the stock nnU-Net commands.

raw dataset -> ``nnUNetv2_plan_and_preprocess`` -> (upstream pre-training of a backbone, when no checkpoint
is given) -> ``nnUNetv2_train -tr ConvAdapterTrainer_S -pretrained_weights ...`` -> ``nnUNetv2_predict`` ->
evaluation -> a table that marks the labels the schedule did not learn (:mod:`nnunet_tpp.demo.report`).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_tpp.data.nnunet_raw import Case, DatasetError, cases_from_folder, check_cases, check_destination, \
    checked_labels, dataset_folder_name, labels_of_folder, write_raw_dataset
from nnunet_tpp.data.phantom import LABELS, write_phantom_case
from nnunet_tpp.demo.report import chance_dice, learnt, result_table
from nnunet_tpp.evaluation import evaluate_folder, markdown_table
from nnunet_tpp.nnunet_commands import NNUNetFolders, run_nnunet
from nnunet_tpp.settings_file import settings_from_yaml
from nnunet_tpp.trainers.restore import write_initial_checkpoint

UNTRAINED = "checkpoint_untrained.pth"  # the fine-tuning run's starting point, beside its checkpoint_final.pth


@dataclass
class DemoConfig:
    """Settings of the demo (``configs/3d/demo.yaml`` holds the defaults as a recipe).

    Attributes:
        work_dir: everything is written below it (nnUNet_raw/preprocessed/results, predictions, logs).
        data: folder of ``NAME.nii.gz`` + ``NAME_labels.nii.gz`` pairs; None: the built-in phantom.
        labels: label names of ``data`` (``{"background": 0, ...}``); None: read ``labels.json`` there.
        dataset_id: nnU-Net id of the target dataset (the upstream one uses ``dataset_id + 1``).
        trainer: the PEFT trainer to fine-tune with.
        pretrained: a published STU-Net checkpoint; None: pre-train one upstream on other phantoms first.
        num_cases, num_test_cases: phantom cases to train on and to predict.
        epochs, iterations_per_epoch, val_iterations_per_epoch: fine-tuning schedule.
        upstream_epochs: schedule of the upstream pre-training (same iterations per epoch).
        device: cpu or cuda.
        seed: ``NNUNET_TPP_SEED`` of the fine-tuning run: its starting point is rebuilt from it, to show what the
            untrained network predicts.
    """

    work_dir: Path = Path("nnunet_tpp_work")
    data: Path | None = None
    labels: dict | None = None
    dataset_id: int = 501
    trainer: str = "ConvAdapterTrainer_S"
    pretrained: Path | None = None
    num_cases: int = 8
    num_test_cases: int = 2
    epochs: int = 15
    iterations_per_epoch: int = 20
    val_iterations_per_epoch: int = 2
    upstream_epochs: int = 10
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "DemoConfig":
        """Reads a YAML recipe, then applies non-None ``overrides``."""
        return settings_from_yaml(cls, path, "demo", {k: v for k, v in overrides.items() if v is not None},
                                  ("work_dir", "data", "pretrained"))


def _phantom_cases(folder: Path, seeds: list[int], prefix: str) -> list[Case]:
    cases = []
    for seed in seeds:
        image, label = write_phantom_case(folder, f"{prefix}{seed:03d}", seed)
        cases.append(Case(f"{prefix}{seed:03d}", image, label))
    return cases


def _read_labels(cfg: DemoConfig) -> dict[str, int]:
    if cfg.labels:
        return checked_labels(cfg.labels, "--labels")
    if not (Path(cfg.data) / "labels.json").exists():
        raise DatasetError(f"{cfg.data}: give the label names with --labels or a labels.json there "
                           f"(e.g. {{\"background\": 0, \"liver\": 1}})")
    return labels_of_folder(Path(cfg.data))


@dataclass
class CheckedDemo:
    """What :func:`check_demo` found: the label set, the cases of ``--data`` (None: the phantom) and the STU-Net
    size of the trainer."""

    labels: dict[str, int]
    cases: list[Case] | None
    size: str


def check_demo(cfg: DemoConfig) -> CheckedDemo:
    """Every check of the demo's settings and inputs, before anything is written or started: numbers, device,
    trainer name, the ``--pretrained`` checkpoint (kind and STU-Net size, read memory-mapped, no network built),
    the ``--data`` cases and labels, and the dataset ids in the work folder.

    Returns:
        A :class:`CheckedDemo`. Raises ``ValueError`` (``DatasetError``, ``CheckpointError``) naming the problem
        and the fix.
    """
    for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "upstream_epochs", "num_cases",
                 "num_test_cases"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"demo setting {name} must be an integer >= 1, got {value!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"demo setting seed must be an integer >= 0, got {cfg.seed!r}")
    last = 998 if cfg.pretrained is None else 999  # the upstream dataset takes the next id
    if not isinstance(cfg.dataset_id, int) or not 1 <= cfg.dataset_id <= last:
        raise ValueError(f"--dataset-id must be within 1..{last}"
                         + (" (the upstream pre-training uses the next id)" if last == 998 else "")
                         + f", got {cfg.dataset_id!r}")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch sees no CUDA device; use --device cpu")
    from nnunet_tpp.trainers.zoo import TRAINERS
    if cfg.trainer not in TRAINERS:
        from nnunet_tpp._startup import close_trainer_names
        near = close_trainer_names(cfg.trainer, TRAINERS)
        raise ValueError(f"--trainer {cfg.trainer!r} is not an nnunet_tpp trainer"
                         + (f"; did you mean {', '.join(near)}?" if near else "")
                         + " (`nnunet-tpp trainers` lists them)")
    backbone = TRAINERS[cfg.trainer].backbone
    if not backbone.is_stunet:
        raise ValueError(f"--trainer {cfg.trainer}: the demo adapts STU-Net; pick an STU-Net trainer (suffix _S, _B, "
                         f"_L or _H). The _nnUNet trainers are shown in the README section 'Fine-tuning your nnU-Net "
                         f"model with adapters'")
    size = backbone.key
    if Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise ValueError(f"--work-dir {cfg.work_dir} is a file; give a folder")
    if cfg.pretrained is not None:
        _check_pretrained(Path(cfg.pretrained), cfg.trainer, size, TRAINERS)
    cases, labels = None, dict(LABELS)
    if cfg.data is not None:
        cases = cases_from_folder(Path(cfg.data))  # first: an empty folder says it has no images
        labels = _read_labels(cfg)
        problems = check_cases(cases, labels)
        if problems:
            listing = "\n".join(f"  {case}: {why}" for case, why in problems.items())
            raise DatasetError(f"{len(problems)} case(s) of {cfg.data} cannot be used; nothing was written:\n"
                               f"{listing}")
    folders = NNUNetFolders(Path(cfg.work_dir).resolve())
    others = (folders.preprocessed, folders.results)
    check_destination(folders.raw, cfg.dataset_id, "Demo", overwrite=True, other_roots=others)
    if cfg.pretrained is None:
        check_destination(folders.raw, cfg.dataset_id + 1, "Upstream", overwrite=True, other_roots=others)
    return CheckedDemo(labels, cases, size)


def _check_pretrained(path: Path, trainer: str, size: str, trainers: dict) -> None:
    """Refuses a ``--pretrained`` file that is not an STU-Net checkpoint of the trainer's size."""
    from nnunet_tpp.models import file_kinds
    from nnunet_tpp.models.stunet_checkpoint import CheckpointError, describe_stunet, extract_state_dict, \
        read_checkpoint
    try:
        checkpoint = read_checkpoint(path, mmap=True)  # names only: tensors stay on disk
        state, _ = extract_state_dict(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained: {e}") from None
    found = describe_stunet(state)
    if not found.startswith("STU-Net-"):
        kind = file_kinds.classify(checkpoint, str(path))
        raise CheckpointError(f"--pretrained: {file_kinds.wrong_kind_message(kind, file_kinds.STUNET)}")
    if found != f"STU-Net-{size}":
        other = f"{trainers[trainer].family}_{found[-1]}"
        hint = f"--trainer {other}" if other in trainers else f"a trainer for STU-Net-{found[-1]}"
        raise CheckpointError(f"--pretrained {str(path)!r} is {found}, but the demo's trainer {trainer} builds "
                              f"STU-Net-{size}: pass {hint}, or the STU-Net-{size} checkpoint")


def _trainable_line(results: Path) -> str:
    for log in sorted(results.rglob("training_log_*.txt"), key=lambda p: p.stat().st_mtime, reverse=True):
        match = re.search(r"trainable parameters: \d+ of \d+ \(([\d.]+)%\)", log.read_text())
        if match:
            return match.group(1)
    return "?"


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Runs the demo end to end and prints the result table.

    Every setting and input is checked first (:func:`check_demo`); a refused demo writes nothing.

    Returns:
        ``{"dice": {label: value}, "mean_dice", "untrained_dice", "chance_dice": {label: value},
        "learnt": {label: bool},
        "evaluation", "trainable_percent", "wall_time_s": {step: s}, "work_dir"}`` (chance Dice and learnt:
        :mod:`nnunet_tpp.demo.report`).
    """
    start = time.time()
    checked = check_demo(cfg)
    folders = NNUNetFolders(Path(cfg.work_dir).resolve())
    folders.make()
    log = folders.root / "logs" / "demo.log"
    times: dict[str, float] = {}
    source = folders.root / "source"

    echo(f"[1/6] preparing data in {folders.root}")
    if cfg.data is None:
        labels = dict(LABELS)
        train = _phantom_cases(source, list(range(cfg.num_cases)), "phantom")
        test = _phantom_cases(source, [100 + i for i in range(cfg.num_test_cases)], "test")
    else:
        labels, cases = checked.labels, checked.cases
        test = cases[-1:] if len(cases) >= 6 else cases
        train = cases[:-1] if len(cases) >= 6 else cases
        if len(cases) < 6:
            echo("    fewer than 6 cases: training on all of them (fold 'all') and predicting them too")
    fold = "0" if len(train) >= 5 else "all"
    raw = write_raw_dataset(folders.raw, cfg.dataset_id, "Demo", train, labels, test=test, overwrite=True,
                            other_roots=(folders.preprocessed, folders.results))
    labels_ts = raw / "labelsTs"
    labels_ts.mkdir(exist_ok=True)
    for case in test:  # written as the raw labels are (.nii.gz, uint8), whatever the source file is
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(case.label)), sitk.sitkUInt8),
                        str(labels_ts / f"{case.name}.nii.gz"), useCompression=True)

    env = folders.env(NNUNET_TPP_EPOCHS=str(cfg.epochs), NNUNET_TPP_ITERS_PER_EPOCH=str(cfg.iterations_per_epoch),
                      NNUNET_TPP_VAL_ITERS_PER_EPOCH=str(cfg.val_iterations_per_epoch))
    echo("[2/6] planning and preprocessing (nnU-Net)")
    times["plan+preprocess"] = run_nnunet(
        ["nnUNetv2_plan_and_preprocess", "-d", cfg.dataset_id, "-c", "3d_fullres", "--verify_dataset_integrity",
         "-np", "1", "-npfp", "1"], env, log, echo)

    pretrained, size = cfg.pretrained, checked.size
    if pretrained is None:
        echo(f"[3/6] no checkpoint given: pre-training STU-Net-{size} upstream on other phantoms "
             f"(one 'organ' label), to adapt afterwards")
        pretrained, times["upstream pre-training"] = _upstream(cfg, folders, size, env, log, echo)
    else:
        echo(f"[3/6] using the pre-trained checkpoint {pretrained}")

    echo(f"[4/6] fine-tuning {cfg.trainer}: {cfg.epochs} epochs x {cfg.iterations_per_epoch} iterations")
    times["fine-tuning"] = run_nnunet(
        ["nnUNetv2_train", cfg.dataset_id, "3d_fullres", fold, "-tr", cfg.trainer, "-pretrained_weights",
         pretrained, "-device", cfg.device], dict(env, NNUNET_TPP_SEED=str(cfg.seed)), log, echo)

    echo("[5/6] predicting the test cases (nnU-Net sliding window) with the fine-tuned and the untrained network")
    model = folders.results / dataset_folder_name(cfg.dataset_id, "Demo") / f"{cfg.trainer}__nnUNetPlans__3d_fullres"
    (model / f"fold_{fold}" / UNTRAINED).unlink(missing_ok=True)  # from an earlier demo in this folder
    write_initial_checkpoint(model, fold, cfg.seed, Path(pretrained), UNTRAINED)
    predictions, untrained_predictions = folders.root / "predictions", folders.root / "predictions_untrained"
    for key, out, checkpoint in (("prediction", predictions, "checkpoint_final.pth"),
                                 ("prediction (untrained)", untrained_predictions, UNTRAINED)):
        if out.exists():
            shutil.rmtree(out)
        times[key] = run_nnunet(
            ["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", out, "-d", cfg.dataset_id, "-c", "3d_fullres",
             "-f", fold, "-tr", cfg.trainer, "-chk", checkpoint, "-device", cfg.device, "-npp", "1", "-nps", "1",
             "--disable_tta"], env, log, echo)

    echo("[6/6] evaluating")
    result = evaluate_folder(labels_ts, predictions, labels)
    untrained = evaluate_folder(labels_ts, untrained_predictions, labels)
    chance = chance_dice(labels_ts, labels)
    trainable = _trainable_line(folders.results / dataset_folder_name(cfg.dataset_id, "Demo"))
    total = time.time() - start
    echo("")
    echo(f"{cfg.trainer} on {'the phantom' if cfg.data is None else cfg.data} ({len(train)} training, "
         f"{len(test)} test cases; a smoke run, not a benchmark)")
    echo(result_table(result, untrained, chance, f"{cfg.epochs} epochs x {cfg.iterations_per_epoch} iterations"))
    echo("")
    echo(markdown_table(["trainable %", "wall time (s)"] + [f"{k} (s)" for k in times],
                        [[trainable, f"{total:.0f}"] + [f"{v:.0f}" for v in times.values()]]))
    summary = {"dice": result.dice, "mean_dice": result.mean_dice, "untrained_dice": untrained.dice,
               "chance_dice": chance, "learnt": learnt(result, untrained, chance), "evaluation": result.to_json(),
               "trainable_percent": trainable,
               "wall_time_s": {"total": total, **times}, "work_dir": str(folders.root)}
    (folders.root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _upstream(cfg: DemoConfig, folders: NNUNetFolders, size: str, env: dict, log: Path, echo):
    """Trains STU-Net from scratch on a different phantom task; returns its checkpoint (nnU-Net v2 format)."""
    upstream_id = cfg.dataset_id + 1
    source = folders.root / "source_upstream"
    cases = _phantom_cases(source, [500 + i for i in range(max(cfg.num_cases, 5))], "up")
    merged = []
    for case in cases:  # the upstream task: every organ is one label
        label = sitk.ReadImage(str(case.label))
        organ = sitk.Cast(label > 0, sitk.sitkUInt8)
        path = source / f"{case.name}_organ.nii.gz"
        sitk.WriteImage(organ, str(path), useCompression=True)
        merged.append(Case(case.name, case.image, path))
    write_raw_dataset(folders.raw, upstream_id, "Upstream", merged, {"background": 0, "organ": 1}, overwrite=True,
                      other_roots=(folders.preprocessed, folders.results))
    elapsed = run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", upstream_id, "-c", "3d_fullres", "-np", "1",
                          "-npfp", "1"], env, log, echo)
    up_env = dict(env, NNUNET_TPP_EPOCHS=str(cfg.upstream_epochs), NNUNET_TPP_SKIP_VALIDATION="1")
    elapsed += run_nnunet(["nnUNetv2_train", upstream_id, "3d_fullres", "all", "-tr", f"STUNetTrainer_{size}",
                           "-device", cfg.device], up_env, log, echo)
    ckpt = next((folders.results / dataset_folder_name(upstream_id, "Upstream")).rglob("checkpoint_final.pth"))
    return ckpt, elapsed
