"""The 2-D evidence protocol: LiteMedSAM's pre-trained medical image encoder with every arm, per seed, through
``train2d``.

``downstream`` (``images/`` + ``masks/``) is split once into test subjects and a training pool
(:mod:`nnunet_tpp.evidence.split`); per seed ``K`` the pool gives ``labelled`` training and ``validation`` images
(whole subjects, a seeded order) and the TPP stage's ``pretext_images`` (a seeded draw from the pool: never a test
image). ``out`` holds ``data/seed_K/{train,val,test}/{images,masks}`` and ``data/seed_K/pretext/`` (links to the
user's files, which are never written; copies where links cannot be made), ``runs/ARM/seed_K/train2d/`` (the
``train2d`` run), ``runs/ARM/seed_K/result.json`` (its per-image Dice and HD95 in pixels at 256 x 256),
``protocol.json`` (the settings a rerun must share) and the report. A stopped run resumes: finished arms and seeds
are read back, an unfinished ``train2d`` run resumes after its last epoch, a finished TPP stage is reused.

"Untrained" is the first arm of :data:`~nnunet_tpp.evidence.settings2d.UNTRAINED_FROM_2D` that runs, scored at its
starting point (the pre-trained encoder with the method applied and a new decoder).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from nnunet_tpp.evidence.report import write_evidence
from nnunet_tpp.evidence.runs import atomic_json, run_missing
from nnunet_tpp.evidence.settings import EvidenceSettingsError
from nnunet_tpp.evidence.settings2d import (ARMS_2D, COMPARISONS_2D, SHARED_SETTINGS_2D, UNTRAINED_FROM_2D,
                                            Evidence2D)
from nnunet_tpp.evidence.split import Split, split_cases, subjects

PROTOCOL = "protocol.json"


def check_inputs(cfg: Evidence2D) -> tuple[Split, dict[str, tuple[Path, Path]]]:
    """Every check before anything is written: the settings, every image and mask of ``downstream`` (read, sizes
    matched), the split, and that ``out`` holds nothing of a run with other settings.

    Returns:
        ``(split, {image stem: (image file, mask file)})``. Raises :class:`EvidenceSettingsError`,
        :class:`~nnunet_tpp.vision2d.data.DataError` or :class:`~nnunet_tpp.evidence.split.SplitError`.
    """
    from nnunet_tpp.vision2d.data import image_mask_pairs, load_dataset
    cfg.check()
    folder = Path(cfg.downstream)
    pairs = {image.stem: (image, mask) for image, mask in image_mask_pairs(folder)}
    if len(pairs) < 5:
        raise EvidenceSettingsError(f"--downstream {folder}: {len(pairs)} image(s); the protocol needs test images "
                                    f"and a training pool of labelled and validation images (at least 5)")
    load_dataset(folder, "seg", 256, in_chans=3, augment=False, layout="image_mask")  # reads every file
    names = sorted(pairs)
    n_subjects = len(subjects(names, cfg.group))
    split = split_cases(names, cfg.group, cfg.test if cfg.test is not None else max(1, round(n_subjects / 5)))
    if cfg.labelled + cfg.validation > len(split.pool):
        raise EvidenceSettingsError(f"--labelled {cfg.labelled} + validation {cfg.validation} images: the training "
                                    f"pool has {len(split.pool)}; give fewer")
    record = Path(cfg.out) / PROTOCOL
    if record.exists():
        theirs, ours = json.loads(record.read_text())["settings"], cfg.to_json()
        differ = [k for k in SHARED_SETTINGS_2D if theirs.get(k) != ours.get(k)]
        if differ:
            listing = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in differ)
            raise EvidenceSettingsError(f"{cfg.out} holds a run with other settings ({listing}); use a new --out, or "
                                        f"the same settings to resume it (seeds and arms may be added)")
    return split, pairs


def seed_images(split: Split, cfg: Evidence2D, seed: int) -> dict[str, list[str]]:
    """A seed's ``train`` (labelled), ``val``, ``test`` and ``pretext`` image stems."""
    train = split.labelled(cfg.labelled, seed)
    val = split.validation(cfg.labelled, seed, cfg.validation)
    pool = sorted(split.pool)
    count = len(pool) if cfg.pretext_images is None else min(cfg.pretext_images, len(pool))
    draw = np.random.default_rng([2026, seed]).permutation(len(pool))[:count]
    return {"train": train, "val": val, "test": list(split.test), "pretext": sorted(pool[i] for i in draw)}


def run_evidence_2d(cfg: Evidence2D, echo=print) -> dict:
    """Runs the protocol (module docstring) and writes its report.

    Returns:
        The content of ``evidence.json`` (:func:`nnunet_tpp.evidence.report.write_evidence`).
    """
    from nnunet_tpp.vision2d.data import load_dataset
    start = time.time()
    split, pairs = check_inputs(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / PROTOCOL, {"settings": cfg.to_json()})
    seeds = list(range(cfg.seeds))
    echo(f"evidence (2-D, LiteMedSAM): {cfg.downstream}: {len(split.test)} test image(s), a training pool of "
         f"{len(split.pool)}, per seed {cfg.labelled} labelled + {cfg.validation} validation; seeds {seeds}; arms "
         f"{', '.join(cfg.arms)}")
    echo(f"    schedule: {cfg.epochs} epochs of batch {cfg.batch_size} per arm at 256 x 256; TPP (SimMIM) on "
         f"{cfg.pretext_images or 'all'} pool images, {cfg.pretext_epochs} epoch(s) of batch {cfg.pretext_batch_size};"
         f" device {cfg.device}")
    folders = {seed: _seed_folder(out / "data" / f"seed_{seed}", seed_images(split, cfg, seed), pairs)
               for seed in seeds}
    untrained_arm = next(a for a in UNTRAINED_FROM_2D if a in cfg.arms)
    run_missing(out, seeds, cfg.arms,
                lambda arm, seed, arm_dir: _run_arm(cfg, arm, seed, folders[seed], arm_dir, echo,
                                                    with_untrained=arm == untrained_arm),
                lambda arm, seed: ARMS_2D[arm][0] + (" after TPP (SimMIM)" if ARMS_2D[arm][1] != "none" else ""),
                echo)
    test = load_dataset(folders[0], "seg", 256, in_chans=3, augment=False)  # every seed's test images
    chance = chance_dice_2d(test.test.targets, test.class_names)
    return write_evidence(out, cfg.to_json(), cfg.arms, seeds, chance, split.record(cfg.labelled, seeds), {},
                          time.time() - start, untrained_arm, COMPARISONS_2D, hd95_unit="px", echo=echo)


def chance_dice_2d(masks, class_names: list[str]) -> dict[str, float]:
    """The chance Dice of each foreground class (marking the class everywhere): ``2 f / (1 + f)`` per image with
    ``f`` its fraction of the pixels, averaged over images."""
    masks = np.asarray(masks)
    return {name: float(np.mean([2 * f / (1 + f) for f in (masks == c).reshape(len(masks), -1).mean(1)]))
            for c, name in enumerate(class_names) if c}


def train2d_config(cfg: Evidence2D, arm: str, seed: int, data: Path, run_dir: Path):
    """The ``train2d`` settings of one arm and seed (LiteMedSAM, the arm's method and pretext)."""
    from nnunet_tpp.vision2d.config import Train2dConfig
    method, pretext = ARMS_2D[arm]
    return Train2dConfig(task="seg", data=data, out=run_dir, arch="litemedsam", method=method, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, seed=seed, device=cfg.device, tpp=pretext,
                         tpp_data=data / "pretext" if pretext != "none" else None, tpp_epochs=cfg.pretext_epochs,
                         tpp_options={"batch_size": cfg.pretext_batch_size} if pretext != "none" else {})


def _run_arm(cfg: Evidence2D, arm: str, seed: int, data: Path, arm_dir: Path, echo, with_untrained: bool) -> dict:
    """Trains (or reads back) one arm on one seed and returns ``{"arm", "seed", "labelled", "per_case",
    "untrained_per_case", "seconds"}``."""
    from nnunet_tpp.vision2d.metrics import read_metrics
    from nnunet_tpp.vision2d.train import evaluate_untrained, run_train2d
    train_cfg = train2d_config(cfg, arm, seed, data, arm_dir / "train2d")
    log = (lambda line: echo(f"    {line}"))
    started = time.time()
    metrics_file = train_cfg.out / "metrics.json"
    metrics = read_metrics(metrics_file) if metrics_file.exists() else run_train2d(train_cfg, log=log, progress=False)
    seconds = {"train": time.time() - started}
    record = {"arm": arm, "seed": seed, "labelled": sorted(p.stem for p in (data / "train" / "images").iterdir()),
              "per_case": _per_case(metrics["per_image"], seed), "seconds": seconds}
    echo(f"    {arm}, seed {seed}: mean Dice {metrics['dice']:.3f} on {len(record['per_case'])} test images")
    if with_untrained:
        started = time.time()
        start_cfg = replace(train_cfg, tpp="none", tpp_data=None, tpp_options={})
        untrained = evaluate_untrained(start_cfg, log=lambda _: None)
        seconds["untrained"] = time.time() - started
        record["untrained_per_case"] = _per_case(untrained["per_image"], seed)
        echo(f"    {arm}, seed {seed} (untrained): mean Dice {untrained['dice']:.3f}")
    return record


def _per_case(per_image: list[dict], seed: int) -> list[dict]:
    return [{"seed": seed, "case": r["image"], "dice": r["dice"], "hd95": r["hd95"]} for r in per_image]


def _seed_folder(root: Path, images: dict[str, list[str]], pairs: dict[str, tuple[Path, Path]]) -> Path:
    """Writes (once) a seed's ``train/val/test/{images,masks}`` and ``pretext/`` as links to the user's files."""
    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    for part in ("train", "val", "test"):
        for stem in images[part]:
            image, mask = pairs[stem]
            _link(image, root / part / "images" / image.name)
            _link(mask, root / part / "masks" / mask.name)
    for stem in images["pretext"]:
        _link(pairs[stem][0], root / "pretext" / pairs[stem][0].name)
    done.write_text(json.dumps(images, indent=1))
    return root


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # a file system without links
        shutil.copyfile(source, target)
