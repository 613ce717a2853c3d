"""One supervised 2D run (``nnunet-tpp train2d``): a backbone (timm's ViT, or LiteMedSAM's image encoder) + task head +
a PEFT method, AdamW with warm-up and cosine decay, model selection on the validation split, metrics on the test
split. From Python: ``run_train2d(Train2dConfig(task=..., data=..., out=..., arch="litemedsam", method="lora"))``.

Everything is checked before the first write into the run folder (:mod:`nnunet_tpp.vision2d.checks`: settings,
data, checkpoints, the method on the built backbones, a folder of other settings); a refused run leaves the
folder as it was.

Files in the run folder:
    metrics.json    test metrics (ACC/AUC/F1 or Dice as fractions, HD95 in pixels: its "units" entry; segmentation
                    also per test image, "per_image"),
                    trainable_ratio (a fraction), peak_memory_mb, images_per_s (written last: a run folder with
                    metrics.json is finished and never trained over)
    adapter.pth     the adapter-only weights of the best epoch (``nnunet_tpp.peft.load`` reads it)
    config.yaml     the settings of the run
    history.json, progress.png   loss and validation metrics (fractions) per epoch
    checkpoint.pth  while training: written atomically after every epoch, so a killed run resumes after its last
                    finished epoch; data order, augmentations and dropout are drawn from (seed, epoch), so on
                    the CPU the resumed run ends with the same weights as an uninterrupted one, bit for bit
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.vision2d.checks import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RunExistsError,  # noqa: F401
                                        check_backbones, check_settings, resolve_device)
from nnunet_tpp.vision2d.config import LITEMEDSAM, Train2dConfig
from nnunet_tpp.vision2d.metrics import (classification_metrics, peak_memory_mb, percent,  # noqa: F401 (re-exported)
                                         segmentation_metrics, segmentation_per_image, units_for)
from nnunet_tpp.vision2d.model import (build_backbone, build_model, build_other_backbones,  # noqa: F401 (re-exported)
                                       build_task_model, checkpoint_in_chans)


def start_target_parameters(model: nn.Module, cfg: Train2dConfig, train_set, device: torch.device,
                            log: Callable[[str], None]) -> str | None:
    """Runs the TPP pretext stage (``cfg.tpp``) or reads ``cfg.target_parameters``, and copies the result
    into the model's target parameters.

    Returns:
        The target-parameter file used, or None.
    """
    from nnunet_tpp.pretext.stage import check_file_identity, copy_target_parameters, read_target_parameters
    path = cfg.target_parameters
    if cfg.tpp != "none":
        from nnunet_tpp.vision2d.tpp import run_tpp_2d
        path = run_tpp_2d(model, train_set, cfg, cfg.out / "tpp", device, log)
    if path is None:
        return None
    payload = read_target_parameters(str(path))
    check_file_identity(payload, model, str(path), "target parameters")
    copy_target_parameters(model, peft.current_names(model, payload["target_parameters"]), str(path))
    log(f"fine-tuning starts from the target parameters in {path}")
    return str(path)


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "cls":
        return nn.functional.cross_entropy
    from monai.losses import DiceCELoss
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    return lambda logits, target: dice_ce(logits, target[:, None])


@torch.no_grad()
def predict(model: nn.Module, dataset, task: str, device: torch.device, batch_size: int, amp: bool
            ) -> tuple[list, list]:
    """Runs ``model`` over a dataset in order.

    Returns:
        classification: ``(labels (N,), probabilities (N, K))``; segmentation: ``(masks, predicted maps)``,
        lists of (H, W) arrays.
    """
    from nnunet_tpp.vision2d.data import make_loader
    model.eval()
    targets, outputs = [], []
    for images, target in make_loader(dataset, batch_size, shuffle=False, seed=0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(images.to(device, non_blocking=True)).float()
        if task == "cls":
            outputs.append(torch.softmax(logits, 1).cpu().numpy())
            targets.append(target.numpy())
        else:
            outputs.extend(logits.argmax(1).cpu().numpy())
            targets.extend(target.numpy())
    if task == "cls":
        return np.concatenate(targets), np.concatenate(outputs)
    return targets, outputs


def evaluate(model: nn.Module, dataset, task: str, num_classes: int, device: torch.device, batch_size: int,
             amp: bool = True) -> dict[str, float]:
    """Classification ``{"acc", "auc", "f1"}`` or segmentation ``{"dice", "hd95"}`` of ``model`` on ``dataset``."""
    targets, outputs = predict(model, dataset, task, device, batch_size, amp)
    if task == "cls":
        return classification_metrics(targets, outputs)
    return segmentation_metrics(targets, outputs, num_classes)


def score_test_split(model: nn.Module, splits, task: str, device: torch.device, batch_size: int, amp: bool = True
                 ) -> dict:
    """:func:`evaluate` on the test split; for segmentation also ``"per_image"``: ``[{"image", "dice": {class:
    value}, "hd95": {class: value}}]`` (``image``: the file stem where the data names its test images, else the
    position in the split)."""
    targets, outputs = predict(model, splits.test, task, device, batch_size, amp)
    if task == "cls":
        return classification_metrics(targets, outputs)
    records = segmentation_per_image(targets, outputs, splits.class_names)
    names = splits.test_names or [str(i) for i in range(len(records))]
    return {**segmentation_metrics(targets, outputs, splits.num_classes),
            "per_image": [{"image": name, **r} for name, r in zip(names, records)]}


def selection_score(task: str, metrics: dict[str, float]) -> float:
    """The validation number the best epoch is chosen by: accuracy, or Dice."""
    return metrics["acc"] if task == "cls" else metrics["dice"]


@dataclass
class _State:
    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best_weights: dict | None = None
    history: list | None = None
    train_images: int = 0
    train_seconds: float = 0.0


def _learning_rates(cfg: Train2dConfig, steps_per_epoch: int) -> list[float]:
    from nnunet_tpp.pretext.dino import cosine_schedule
    total = cfg.epochs * steps_per_epoch
    return cosine_schedule(cfg.learning_rate, 0.0, total, int(round(cfg.warmup_epochs * steps_per_epoch)))


def _save_checkpoint(path: Path, cfg: Train2dConfig, model: nn.Module, optimizer, state: _State) -> None:
    peft.atomic_torch_save({"config": cfg.to_dict(), "weights": peft.state_dict(model),
                            "optimizer": optimizer.state_dict(), "epoch": state.epoch,
                            "best_score": state.best_score, "best_epoch": state.best_epoch,
                            "best_weights": state.best_weights, "history": state.history,
                            "train_images": state.train_images, "train_seconds": state.train_seconds}, path)


def _resume(saved: dict | None, path: Path, model: nn.Module, optimizer, log) -> _State:
    """The training state of an unfinished run (its checkpoint, already checked against the settings by
    :func:`~nnunet_tpp.vision2d.checks.check_run_folder`), or a fresh one."""
    if saved is None:
        return _State(history=[])
    peft.load_state_dict(model, saved["weights"])
    optimizer.load_state_dict(saved["optimizer"])
    log(f"resuming after epoch {saved['epoch']} from {path}")
    return _State(saved["epoch"], saved["best_score"], saved["best_epoch"], saved["best_weights"],
                  saved["history"], saved["train_images"], saved["train_seconds"])


def plot_history(history: list[dict], metric: str, path: Path) -> None:
    """A PNG with the training loss and the validation ``metric`` per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(epochs, [h["loss"] for h in history], "b-o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    other = ax.twinx()
    other.plot(epochs, [h["val"][metric] for h in history], "g-s", label=f"val {metric}")
    other.set_ylabel(f"val {metric}")
    fig.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_suffix(f".tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(data: dict | list, path: Path) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _data_and_backbones(cfg: Train2dConfig, log: Callable[[str], None]):
    """The run's data and backbones, built in the order (and from the seed) every run uses, so the model built
    next is the run's starting point. Returns ``(splits, backbone, other backbones)``."""
    from nnunet_tpp.vision2d.data import load_dataset
    torch.manual_seed(cfg.seed)
    in_chans = cfg.in_chans or (3 if cfg.arch == LITEMEDSAM else checkpoint_in_chans(cfg.backbone, cfg.backbone_format)
                                if cfg.backbone else None)
    splits = load_dataset(cfg.data, cfg.task, cfg.img_size, in_chans=in_chans, seed=cfg.seed,
                          label_fraction=cfg.label_fraction)
    log(splits.describe())
    backbone = build_backbone(cfg, splits.in_chans, log)
    others = build_other_backbones(cfg, splits.in_chans, log)
    check_backbones(cfg, [backbone, *others], splits.num_classes)
    return splits, backbone, others


def evaluate_untrained(cfg: Train2dConfig, log: Callable[[str], None] = print) -> dict:
    """The test metrics (:func:`score_test_split`) of the model a run of ``cfg`` starts from (without SSA or TPP):
    the pre-trained backbone with the method applied and a new head, before any training step. Writes nothing."""
    if cfg.ssa != "none":
        raise ValueError("evaluate_untrained does not run SSA; give a config without ssa")
    device = resolve_device(cfg.device)
    splits, backbone, others = _data_and_backbones(cfg, log)
    model = build_model(cfg, backbone, splits.num_classes, log, others=others).to(device)
    return score_test_split(model, splits, cfg.task, device, cfg.batch_size, cfg.amp)


def run_train2d(cfg: Train2dConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Trains, selects the best epoch on the validation split, evaluates it on the test split.

    Args:
        cfg: the run's settings.
        log: where progress lines go.
        progress: show a progress bar per epoch.
    Returns:
        The content of ``metrics.json``. Raises :class:`RunExistsError` when ``cfg.out`` holds a finished run.
    """
    from tqdm import tqdm

    from nnunet_tpp.vision2d.data import make_loader
    device, saved = check_settings(cfg)  # nothing is written before every check has passed
    out = cfg.out
    splits, backbone, others = _data_and_backbones(cfg, log)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # stray allocations on the default device land on this run's GPU
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    stages = {}
    if cfg.ssa != "none":
        from nnunet_tpp.vision2d.ssa import run_ssa
        stages["ssa"] = run_ssa(backbone, splits.train_plain, cfg, out / "ssa", device, log)
    model = build_model(cfg, backbone, splits.num_classes, log, others=others)
    if cfg.ssa != "none" and not stages["ssa"].get("merged", True):
        from nnunet_tpp.vision2d.ssa import carry_ssa_parameters
        carry_ssa_parameters(model, out / "ssa", log)
    summary = peft.trainable_summary(model)
    log(f"{cfg.method}: {summary}")
    model.to(device)
    stages["target_parameters"] = start_target_parameters(model, cfg, splits.train_plain, device, log)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    state = _resume(saved, out / CHECKPOINT_FILE, model, optimizer, log)
    steps_per_epoch = len(make_loader(splits.train, cfg.batch_size, shuffle=False, seed=cfg.seed))
    lrs = _learning_rates(cfg, steps_per_epoch)
    runner = torch.compile(model) if cfg.compile else model
    loss_fn = _loss_fn(cfg.task)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metric = "acc" if cfg.task == "cls" else "dice"
    for epoch in range(state.epoch, cfg.epochs):
        # the data order, the augmentations (also in loader workers) and dropout depend on (seed, epoch) only,
        # so a run resumed after epoch k trains exactly as an uninterrupted one
        torch.manual_seed(cfg.seed * 1000 + epoch)
        train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                   num_workers=cfg.num_workers)
        model.train()
        losses, started = [], time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i, (images, target) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lrs[epoch * steps_per_epoch + i]
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(runner(images).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            state.train_images += images.shape[0]
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state.train_seconds += time.perf_counter() - started
        val = evaluate(model, splits.val, cfg.task, splits.num_classes, device, cfg.batch_size, cfg.amp)
        score = selection_score(cfg.task, val)
        best = score > state.best_score
        if best:
            state.best_score, state.best_epoch, state.best_weights = score, epoch + 1, peft.state_dict(model)
        state.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": val})
        state.epoch = epoch + 1
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f} val {metric} {percent(val[metric]):.2f}%"
            f"{' (best)' if best else ''} lr {lrs[min(state.epoch * steps_per_epoch, len(lrs)) - 1]:.2e} "
            f"{state.train_images / max(state.train_seconds, 1e-9):.1f} img/s")
        _save_checkpoint(out / CHECKPOINT_FILE, cfg, model, optimizer, state)
        plot_history(state.history, metric, out / "progress.png")
    peft.load_state_dict(model, state.best_weights)
    test = score_test_split(model, splits, cfg.task, device, cfg.batch_size, cfg.amp)
    memory, memory_kind = peak_memory_mb(device)
    peft.save(model, out / "adapter.pth", extra={"train2d": cfg.to_dict(), "best_epoch": state.best_epoch})
    metrics = {**test, "trainable_ratio": summary.trainable / max(summary.total, 1),
               "trainable_params": summary.trainable,
               "total_params": summary.total, "peak_memory_mb": memory, "memory_kind": memory_kind,
               "images_per_s": state.train_images / max(state.train_seconds, 1e-9),
               "best_epoch": state.best_epoch, "val": state.history[state.best_epoch - 1]["val"],
               "method": cfg.method, "task": cfg.task, "arch": cfg.arch, "img_size": cfg.img_size,
               "backbone": getattr(backbone, "checkpoint", None) or (str(cfg.backbone) if cfg.backbone else None),
               "seed": cfg.seed, "label_fraction": cfg.label_fraction, "device": str(device),
               "test_images": len(splits.test), "train_images": len(splits.train), "tpp": cfg.tpp,
               "ssa": cfg.ssa, **stages}
    metrics["units"] = units_for(metrics)
    _write_json({"units": units_for(test), "epochs": state.history}, out / "history.json")
    _write_json(metrics, out / METRICS_FILE)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    shown = ", ".join(f"{k} {percent(metrics[k]):.2f}%" for k in ("acc", "auc", "f1")) if cfg.task == "cls" else \
        f"dice {percent(metrics['dice']):.2f}%, hd95 {metrics['hd95']:.2f} px"
    log(f"test: {shown}; trainable {summary.percent:.2f}%; {metrics['images_per_s']:.1f} img/s; "
        f"peak memory {memory:.0f} MB ({memory_kind}); results in {out}")
    return metrics
