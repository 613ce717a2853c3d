"""The TPP pretext stage: DINO on the target dataset's own images, training only the PEFT method's target
parameters (and a projection head); the backbone stays frozen. Resumable, with progress output and a loss
plot; its result is a target-parameter file that fine-tuning starts from.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import (DINOConfig, DINOHead, DINOLoss, cosine_schedule, ema_update,
                                     teacher_temperature)

TARGET_FORMAT = "nnunet_tpp.tpp/1"


class TargetParameterError(ValueError):
    """A target-parameter file that does not fit the network (method, options or backbone)."""


@dataclass
class PretextSchedule:
    """Length and shape of the pretext stage.

    Attributes:
        epochs, iterations_per_epoch: schedule.
        batch_size: samples per iteration (each gives 2 global + k local views).
        feature_stages: encoder stages whose globally pooled outputs feed the DINO head (0 = full resolution,
            5 = bottleneck).
        grad_clip: gradient norm clipping of the student.
    """

    epochs: int = 50
    iterations_per_epoch: int = 100
    batch_size: int = 2
    feature_stages: tuple[int, ...] = (4, 5)
    grad_clip: float = 3.0


class EncoderEmbedding(nn.Module):
    """An STU-Net's encoder stages pooled into one vector per sample: per channel the spatial maximum and mean.

    Every STU-Net block ends in an instance norm, which removes each channel's spatial mean; an average alone
    would make all views look alike (and DINO collapse), the maximum keeps what the view contains.
    """

    def __init__(self, network: nn.Module, stages: tuple[int, ...]):
        super().__init__()
        self.network, self.stages = network, tuple(stages)

    @property
    def dim(self) -> int:
        return 2 * sum(self.network.conv_blocks_context[s][-1].conv2.out_channels for s in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.network.encode(x)
        features = [encoded[s] for s in self.stages]
        pooled = [torch.cat([f.amax(dim=tuple(range(2, f.dim()))), f.mean(dim=tuple(range(2, f.dim())))], 1)
                  for f in features]
        return torch.cat(pooled, 1)


class DINOStudent(nn.Module):
    """Embedding + DINO head: ``(N, C, *view)`` views -> ``(N, out_dim)`` logits."""

    def __init__(self, embedding: EncoderEmbedding, head: DINOHead):
        super().__init__()
        self.embedding, self.head = embedding, head

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(views))


def _teacher_of(student: nn.Module) -> nn.Module:
    """A copy of the student for the EMA teacher that shares (does not copy) every frozen tensor."""
    shared = {id(p): p for p in student.parameters() if not p.requires_grad}
    teacher = copy.deepcopy(student, memo=shared)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def save_target_parameters(network: nn.Module, path: str, extra: dict | None = None) -> None:
    """Writes the method's target parameters with the method, options and backbone they belong to."""
    payload = {"format": TARGET_FORMAT, **peft.identity(network),
               "target_parameters": {n: p.detach().cpu().clone() for n, p in peft.target_parameters(network).items()},
               **(extra or {})}
    peft.atomic_torch_save(payload, path)


def load_target_parameters(network: nn.Module, path: str) -> dict:
    """Copies the target parameters of a file written by :func:`save_target_parameters` into ``network``.

    Returns:
        The file's metadata. Raises :class:`TargetParameterError` when the file was made for another method,
        other options or another backbone.
    """
    if not os.path.isfile(path):
        raise TargetParameterError(f"target-parameter file not found: {path!r}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != TARGET_FORMAT:
        raise TargetParameterError(f"{path!r} is not a target-parameter file (written by TPP / nnunet-tpp pretrain)")
    ours = peft.identity(network)
    if any(payload[key] != value for key, value in ours.items()):
        raise TargetParameterError(
            f"{path!r} holds target parameters of {payload['method']} {payload['options']} on "
            f"{payload['architecture']}; this network is {ours['method']} {ours['options']} on "
            f"{ours['architecture']}")
    copy_target_parameters(network, payload["target_parameters"], path)
    return {k: v for k, v in payload.items() if k != "target_parameters"}


def copy_target_parameters(network: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copies ``{name: tensor}`` into the network's target parameters; the names and shapes must be exactly
    those of :func:`peft.target_parameters` (else :class:`TargetParameterError` naming ``source``)."""
    params = peft.target_parameters(network)
    if set(weights) != set(params):
        raise TargetParameterError(f"{source!r}: parameter names differ from this network's target parameters")
    bad = [f"{n}: {tuple(w.shape)} vs {tuple(params[n].shape)}" for n, w in weights.items()
           if w.shape != params[n].shape]
    if bad:
        raise TargetParameterError(f"{source!r}: target parameters of other shapes than this network's: {bad[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def run_dino_stage(network: nn.Module, sample: Callable[[int], tuple[list, list]], schedule: PretextSchedule,
                   cfg: DINOConfig, device: torch.device, state_file: str, log: Callable[[str], None] = print,
                   plot_file: str | None = None, embedding: nn.Module | None = None) -> list[float]:
    """Trains the network's target parameters with DINO; resumes from ``state_file`` when it exists.

    Args:
        network: a model with a PEFT method applied (only its target parameters will change).
        sample: ``sample(batch_size) -> (global_views, local_views)`` (see ``MultiCropSampler.sample``).
        schedule, cfg: stage length and DINO recipe.
        device: where to train.
        state_file: resumable state, rewritten atomically after every epoch.
        log: progress output.
        plot_file: optional PNG of the loss per epoch.
        embedding: views -> feature vectors, with a ``dim`` attribute (default: the STU-Net encoder's pooled
            stages, :class:`EncoderEmbedding`; the 2-D stage passes the ViT's class token).
    Returns:
        The mean loss of every epoch (including resumed ones).
    """
    net = peft.unwrap(network)
    trainable = set(peft.target_parameters(net))
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
    try:
        embedding = embedding if embedding is not None else EncoderEmbedding(net, schedule.feature_stages)
        student = DINOStudent(embedding, DINOHead(embedding.dim, cfg.out_dim, cfg.hidden_dim,
                                                  cfg.bottleneck_dim)).to(device)
        teacher = _teacher_of(student)
        loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
        total = schedule.epochs * schedule.iterations_per_epoch
        warmup = min(cfg.warmup_epochs, schedule.epochs // 2) * schedule.iterations_per_epoch
        lrs = cosine_schedule(cfg.lr(schedule.batch_size), cfg.min_lr, total, warmup)
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
        momenta = cosine_schedule(cfg.momentum_teacher, 1.0, total)
        start_epoch, losses = 0, []
        if os.path.isfile(state_file):
            state = torch.load(state_file, map_location=device, weights_only=True)
            student.load_state_dict(state["student"], strict=False)
            teacher.load_state_dict(state["teacher"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            loss_fn.center.copy_(state["center"])
            start_epoch, losses = state["epoch"], list(state["losses"])
            log(f"TPP pretext: resuming at epoch {start_epoch} from {state_file}")
        cuda = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        for epoch in range(start_epoch, schedule.epochs):
            started, epoch_losses = time.time(), []
            student.train()
            for it in range(schedule.iterations_per_epoch):
                step = epoch * schedule.iterations_per_epoch + it
                for group in optimizer.param_groups:
                    group["lr"], group["weight_decay"] = lrs[step], wds[step]
                globals_, locals_ = sample(schedule.batch_size)
                globals_ = [v.to(device, non_blocking=True) for v in globals_]
                locals_ = [v.to(device, non_blocking=True) for v in locals_]
                with torch.autocast(device.type, enabled=cuda):
                    with torch.no_grad():
                        teacher_out = teacher(torch.cat(globals_)).float().chunk(len(globals_))
                    student_out = list(student(torch.cat(globals_)).float().chunk(len(globals_)))
                    if locals_:
                        student_out += list(student(torch.cat(locals_)).float().chunk(len(locals_)))
                    loss = loss_fn(student_out, list(teacher_out), teacher_temperature(cfg, epoch))
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
                    optimizer.step()
                ema_update(student, teacher, momenta[step])
                epoch_losses.append(float(loss.detach()))
            losses.append(sum(epoch_losses) / len(epoch_losses))
            log(f"TPP pretext: epoch {epoch + 1}/{schedule.epochs} DINO loss {losses[-1]:.4f} "
                f"lr {lrs[step]:.2e} ({time.time() - started:.1f} s)")
            trained = {n for n, p in student.named_parameters() if p.requires_grad}
            peft.atomic_torch_save({
                "student": {k: v for k, v in student.state_dict().items() if k in trained},
                "teacher": {k: v for k, v in teacher.state_dict().items() if k in trained},
                "optimizer": optimizer.state_dict(), "center": loss_fn.center.detach().cpu(),
                "epoch": epoch + 1, "losses": losses}, state_file)
            if plot_file:
                plot_losses(losses, plot_file)
        return losses
    finally:  # back to the supervised method's freezing (target parameters + heads + what the method trains)
        peft.freeze(net)


def plot_losses(losses: list[float], path: str, objective: str = "DINO") -> None:
    """A PNG of the pretext loss per epoch, like nnU-Net's progress.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="b", marker="o", linewidth=2)
    ax.set_xlabel("pretext epoch")
    ax.set_ylabel(f"{objective} loss")
    ax.set_title(f"TPP pretext stage ({objective}, target parameters only)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
