"""The 3-D evidence protocol: upstream supervised pre-training, then every arm per seed, through nnU-Net.

``out`` holds ``nnunet/`` (nnU-Net's raw and preprocessed data, the upstream run), ``runs/ARM/`` (each arm's own
``nnUNet_results``: two TPP arms share a trainer name), ``runs/ARM/seed_K/result.json`` (one finished arm and
seed: its per-case Dice and HD95), ``protocol.json`` (the settings a rerun must share to reuse anything),
``evidence.json``, ``evidence.md`` and ``evidence.png``. A stopped run resumes: finished arms and seeds are read
back, the upstream checkpoint and the preprocessed data are reused, an unfinished arm restarts (``--c`` where
nnU-Net saved a checkpoint or a TPP stage its state).

Fold ``K`` of the downstream dataset is seed ``K``: ``splits_final.json`` gives it the seed's labelled cases. The
TPP arms' pretext stage draws from the whole training pool (images only; ``pretext_cases``), never a test case.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import yaml

from nnunet_tpp.data.nnunet_raw import Case, DatasetError, cases_from_folder, check_cases, dataset_folder_name, \
    labels_of_folder, write_raw_dataset
from nnunet_tpp.demo.report import chance_dice
from nnunet_tpp.evidence.plan3d import plan_and_preprocess
from nnunet_tpp.evidence.report import write_evidence
from nnunet_tpp.evidence.runs import atomic_json, run_missing
from nnunet_tpp.evidence.settings import ARMS_3D, UNTRAINED_FROM, Evidence3D, EvidenceSettingsError
from nnunet_tpp.evidence.split import Split, split_cases, subjects
from nnunet_tpp.nnunet_commands import NNUNetFolders, run_nnunet

UNTRAINED = "checkpoint_untrained.pth"
#: settings a rerun must share with the run in ``out`` to reuse its files (seeds and arms may be added)
SHARED_SETTINGS = ("upstream", "downstream", "group", "test", "labelled", "size", "epochs", "iterations_per_epoch",
                   "upstream_epochs", "pretext_epochs", "pretext_iterations_per_epoch", "voxels", "batch_size",
                   "upstream_id", "downstream_id")


@dataclass
class Inputs:
    """The checked inputs: the cases and labels of both folders and the downstream split."""

    upstream: list[Case]
    upstream_labels: dict[str, int]
    downstream: list[Case]
    labels: dict[str, int]
    split: Split


def check_inputs(cfg: Evidence3D) -> Inputs:
    """Every check before anything is written: the settings, both folders' cases and labels (every file read),
    the split, and that ``out`` holds nothing of a run with other settings.

    Returns:
        :class:`Inputs`. Raises :class:`EvidenceSettingsError` or :class:`DatasetError` saying what to fix.
    """
    cfg.check()
    found = {}
    for name in ("upstream", "downstream"):
        folder = Path(getattr(cfg, name))
        try:
            cases, labels = cases_from_folder(folder), labels_of_folder(folder)
        except DatasetError as e:
            raise DatasetError(f"--{name}: {e}") from None
        problems = check_cases(cases, labels)
        if problems:
            listing = "\n".join(f"  {case}: {why}" for case, why in problems.items())
            raise DatasetError(f"--{name}: {len(problems)} case(s) of {folder} cannot be used; nothing was "
                               f"written:\n{listing}")
        found[name] = (cases, labels)
    names = [c.name for c in found["downstream"][0]]
    files = {c.name: re.sub(r"\.nii(\.gz)?$", "", Path(c.image).name) for c in found["downstream"][0]}
    n_subjects = len(subjects(names, cfg.group, files))  # the regex reads the file names the user sees
    split = split_cases(names, cfg.group, cfg.test if cfg.test is not None else max(1, round(n_subjects / 5)), files)
    split.labelled(cfg.labelled, 0)  # raises when the pool is too small
    record = Path(cfg.out) / "protocol.json"
    if record.exists():
        theirs = json.loads(record.read_text())["settings"]
        ours = cfg.to_json()
        differ = [k for k in SHARED_SETTINGS if theirs.get(k) != ours.get(k)]
        if differ:
            listing = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in differ)
            raise EvidenceSettingsError(f"{cfg.out} holds a run with other settings ({listing}); use a new --out, or "
                                        f"the same settings to resume it (seeds and arms may be added)")
    return Inputs(*found["upstream"], *found["downstream"], split)


def run_evidence_3d(cfg: Evidence3D, echo=print) -> dict:
    """Runs the protocol (module docstring) and writes its report.

    Returns:
        The content of ``evidence.json`` (:func:`nnunet_tpp.evidence.report.write_evidence`).
    """
    start = time.time()
    inputs = check_inputs(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = NNUNetFolders(out / "nnunet")
    folders.make()
    log = out / "logs" / "evidence.log"
    seeds = list(range(cfg.seeds))
    split = inputs.split
    echo(f"evidence (3-D): upstream {cfg.upstream} ({len(inputs.upstream)} cases) -> downstream {cfg.downstream}: "
         f"{len(split.test)} test case(s), a training pool of {len(split.pool)}, {cfg.labelled} labelled per seed; "
         f"seeds {seeds}; arms {', '.join(cfg.arms)}")
    echo(f"    schedule: STU-Net-{cfg.size}, {cfg.epochs} x {cfg.iterations_per_epoch} iterations per arm, upstream "
         f"{cfg.upstream_epochs} x {cfg.iterations_per_epoch}, TPP stage {cfg.pretext_epochs} x "
         f"{cfg.pretext_iterations_per_epoch}; device {cfg.device}; logs in {log}")
    env = folders.env(NNUNET_TPP_ITERS_PER_EPOCH=str(cfg.iterations_per_epoch), NNUNET_TPP_VAL_ITERS_PER_EPOCH="1",
                      NNUNET_TPP_SKIP_VALIDATION="1")
    state = _load_state(out, cfg)
    plans = _prepare(cfg, inputs, folders, env, log, state, echo)
    _write_state(out, cfg, state)
    echo(f"    plan: spacing {plans['downstream']['spacing']}, patch {plans['downstream']['patch_size']}, batch "
         f"{plans['downstream']['batch_size']}")
    _write_splits(folders, cfg, split, seeds)
    upstream = _upstream(cfg, folders, env, log, state, echo)
    _write_state(out, cfg, state)
    downstream_raw = folders.raw / dataset_folder_name(cfg.downstream_id, "Downstream")
    labels_ts = downstream_raw / "labelsTs"
    untrained_arm = next(a for a in UNTRAINED_FROM if a in cfg.arms)
    run_missing(out, seeds, cfg.arms,
                lambda arm, seed, _: _run_arm(cfg, arm, seed, upstream, split, folders, env, log, downstream_raw,
                                              inputs.labels, echo, with_untrained=arm == untrained_arm),
                lambda arm, seed: f"training on {', '.join(split.labelled(cfg.labelled, seed))}", echo)
    steps = {"plan+preprocess": sum(p.get("seconds", 0.0) for p in plans.values()),
             **_load_state(out, cfg).get("seconds", {})}
    return write_evidence(out, cfg.to_json(), cfg.arms, seeds, chance_dice(labels_ts, inputs.labels),
                          split.record(cfg.labelled, seeds), steps, time.time() - start, untrained_arm,
                          extra={"plan": plans}, echo=echo)


def _load_state(out: Path, cfg: Evidence3D) -> dict:
    record = out / "protocol.json"
    return json.loads(record.read_text()) if record.exists() else {"settings": cfg.to_json()}


def _write_state(out: Path, cfg: Evidence3D, state: dict) -> None:
    atomic_json(out / "protocol.json", {**state, "settings": {**state.get("settings", {}), **cfg.to_json()}})


def _prepare(cfg: Evidence3D, inputs: Inputs, folders: NNUNetFolders, env: dict, log: Path, state: dict,
             echo) -> dict:
    """Writes both raw datasets and plans and preprocesses them, once (recorded in ``state['plans']``)."""
    if state.get("plans"):
        echo("[prepare] raw and preprocessed datasets: reused")
        return state["plans"]
    echo("[prepare] writing the raw datasets and planning them with nnU-Net")
    others = (folders.preprocessed, folders.results)
    write_raw_dataset(folders.raw, cfg.upstream_id, "Upstream", inputs.upstream, inputs.upstream_labels,
                      channel_name="MRI", overwrite=True, other_roots=others)
    by_name = {c.name: c for c in inputs.downstream}
    test = [by_name[n] for n in inputs.split.test]
    raw = write_raw_dataset(folders.raw, cfg.downstream_id, "Downstream", [by_name[n] for n in inputs.split.pool],
                            inputs.labels, channel_name="MRI", test=[Case(c.name, c.image) for c in test],
                            overwrite=True, other_roots=others)
    labels_ts = raw / "labelsTs"
    labels_ts.mkdir(exist_ok=True)
    for case in test:
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(case.label)), sitk.sitkUInt8),
                        str(labels_ts / f"{case.name}.nii.gz"), useCompression=True)
    plans = {}
    for key, did, cases in (("upstream", cfg.upstream_id, inputs.upstream), ("downstream", cfg.downstream_id,
                                                                            inputs.downstream)):
        plans[key] = plan_and_preprocess(did, [c.image for c in cases], cfg.voxels, cfg.batch_size, env, log, echo)
    state["plans"] = plans
    return plans


def _write_splits(folders: NNUNetFolders, cfg: Evidence3D, split: Split, seeds: list[int]) -> None:
    """Fold K = seed K: its labelled cases train; one other pool case fills nnU-Net's (skipped) validation."""
    folder = folders.preprocessed / dataset_folder_name(cfg.downstream_id, "Downstream")
    splits = [{"train": split.labelled(cfg.labelled, s), "val": split.validation(cfg.labelled, s)}
              for s in range(max(seeds) + 1)]
    atomic_json(folder / "splits_final.json", splits)


def _upstream(cfg: Evidence3D, folders: NNUNetFolders, env: dict, log: Path, state: dict, echo) -> Path:
    """Trains STU-Net from scratch on the upstream folder (all cases, fold ``all``), once."""
    model = folders.results / dataset_folder_name(cfg.upstream_id, "Upstream") / \
        f"STUNetTrainer_{cfg.size}__nnUNetPlans__3d_fullres" / "fold_all"
    checkpoint = model / "checkpoint_final.pth"
    if checkpoint.exists():
        echo(f"[upstream] pre-trained STU-Net-{cfg.size}: reused ({checkpoint})")
        return checkpoint
    echo(f"[upstream] pre-training STU-Net-{cfg.size} from scratch on {cfg.upstream} "
         f"({cfg.upstream_epochs} x {cfg.iterations_per_epoch} iterations)")
    args = ["nnUNetv2_train", cfg.upstream_id, "3d_fullres", "all", "-tr", f"STUNetTrainer_{cfg.size}", "-device",
            cfg.device]
    if (model / "checkpoint_latest.pth").exists():
        args.append("--c")
    state.setdefault("seconds", {})["upstream"] = run_nnunet(
        args, dict(env, NNUNET_TPP_EPOCHS=str(cfg.upstream_epochs), NNUNET_TPP_SEED="0"), log, echo)
    return checkpoint


def _recipe(out: Path, arm: str, pretext: str | None, cfg: Evidence3D, split: Split) -> Path | None:
    if pretext is None:
        return None
    path = out / "runs" / arm / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"pretext": pretext, "pretext_epochs": cfg.pretext_epochs,
                                    "pretext_iterations_per_epoch": cfg.pretext_iterations_per_epoch,
                                    "pretext_cases": list(split.pool)}, sort_keys=False))
    return path


def _run_arm(cfg: Evidence3D, arm: str, seed: int, upstream: Path, split: Split, folders: NNUNetFolders, env: dict,
             log: Path, downstream_raw: Path, labels: dict, echo, with_untrained: bool) -> dict:
    """Trains one arm on one seed's fold, predicts the test cases (and, ``with_untrained``, the run's starting
    point), and returns ``{"arm", "seed", "labelled", "per_case", "untrained_per_case", "seconds"}``."""
    from nnunet_tpp.evaluation import evaluate_folder
    from nnunet_tpp.trainers.restore import write_initial_checkpoint

    family, pretext, pretrained = ARMS_3D[arm]
    trainer = f"{family}_{cfg.size}"
    out = Path(cfg.out).resolve()
    results = out / "runs" / arm / "nnUNet_results"
    arm_env = dict(env, nnUNet_results=str(results), NNUNET_TPP_EPOCHS=str(cfg.epochs), NNUNET_TPP_SEED=str(seed))
    recipe = _recipe(out, arm, pretext, cfg, split)
    if recipe is not None:
        arm_env["NNUNET_TPP_RECIPE"] = str(recipe)
    model = results / dataset_folder_name(cfg.downstream_id, "Downstream") / f"{trainer}__nnUNetPlans__3d_fullres"
    fold_dir = model / f"fold_{seed}"
    seconds = {}
    if not (fold_dir / "checkpoint_final.pth").exists():
        args = ["nnUNetv2_train", cfg.downstream_id, "3d_fullres", seed, "-tr", trainer, "-device", cfg.device]
        resumable = ["checkpoint_latest.pth"] + (["tpp_state.pth", "tpp_target_parameters.pth"] if pretext else [])
        if any((fold_dir / name).exists() for name in resumable):
            args.append("--c")
        elif pretrained:
            args += ["-pretrained_weights", upstream]
        seconds["training"] = run_nnunet(args, arm_env, log, echo)
    run_dir = out / "runs" / arm / f"seed_{seed}"
    labels_ts = downstream_raw / "labelsTs"
    record = {"arm": arm, "seed": seed, "trainer": trainer, "labelled": split.labelled(cfg.labelled, seed)}
    checkpoints = [("per_case", "checkpoint_final.pth", run_dir / "predictions")]
    if with_untrained:
        (fold_dir / UNTRAINED).unlink(missing_ok=True)
        write_initial_checkpoint(model, str(seed), seed, upstream if pretrained else None, UNTRAINED)
        checkpoints.append(("untrained_per_case", UNTRAINED, run_dir / "predictions_untrained"))
    for key, checkpoint, predictions in checkpoints:
        if predictions.exists():
            shutil.rmtree(predictions)
        seconds[f"prediction ({checkpoint})"] = run_nnunet(
            ["nnUNetv2_predict", "-i", downstream_raw / "imagesTs", "-o", predictions, "-d", cfg.downstream_id,
             "-c", "3d_fullres", "-f", seed, "-tr", trainer, "-chk", checkpoint, "-device", cfg.device, "-npp", "1",
             "-nps", "1", "--disable_tta"], arm_env, log, echo)
        evaluation = evaluate_folder(labels_ts, predictions, labels)
        record[key] = [{"seed": seed, "case": c["case"], "dice": {n: m["dice"] for n, m in c["labels"].items()},
                        "hd95": {n: m["hd95"] for n, m in c["labels"].items()}} for c in evaluation.per_case]
        echo(f"    {arm}, seed {seed}{' (untrained)' if checkpoint == UNTRAINED else ''}: mean Dice "
             f"{evaluation.mean_dice:.3f} on {len(evaluation.per_case)} test case(s)")
    record["seconds"] = seconds
    return record
