"""The TPP pretext stage: DINO on the target dataset's own images, training only the PEFT method's target
parameters (and a projection head); the backbone stays frozen. Resumable, with progress output, collapse
diagnostics and a plot; its result is a target-parameter file that fine-tuning starts from.

As the official DINO (facebookresearch/dino ``main_dino.py``, ``utils.py``): AdamW with biases and 1-D parameters
exempt from weight decay, the last layer frozen in the first epoch, the EMA teacher in eval mode, the head run once
over the features of every view, the teacher's parameters as the result. Ours: an absolute learning rate (DINO's
``lr * batch / 256`` moves nothing at nnU-Net's batch sizes), a low constant teacher temperature (with only the
target parameters training, DINO's 0.04 drifted to uniform targets on the CT), and the head's input standardised
with running statistics per view size (pooled CNN features share a large common component; standardising across
the batch instead couples its samples and, at small batches, makes the two views of one sample opposite).

Files: ``state_file`` (rewritten atomically after every epoch, with the method, options, architecture and
backbone fingerprint it was made from; a state of another identity or other settings is refused), the optional
``plot_file`` and ``diagnostics_file`` (``tpp_diagnostics.json``: one entry per epoch, see
:class:`~nnunet_tpp.pretext.dino.CollapseMeter`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import (CollapseMeter, DINOConfig, DINOHead, DINOLoss, PretextSettingsError,
                                     RunningStandardization, cancel_last_layer_gradients, collapse_warning,
                                     cosine_schedule, ema_update, teacher_temperature)
from nnunet_tpp.pretext.optim import set_weight_decay, weight_decay_groups

TARGET_FORMAT = "nnunet_tpp.tpp/1"
STATE_FORMAT = "nnunet_tpp.tpp_state/2"


class TargetParameterError(ValueError):
    """A target-parameter file or pretext state that does not fit the network (method, options, architecture or
    backbone), or that cannot be read."""


@dataclass
class PretextSchedule:
    """Length and shape of the pretext stage.

    Attributes:
        epochs, iterations_per_epoch: schedule.
        batch_size: samples per iteration (each gives 2 global + k local views).
        feature_stages: encoder stages whose globally pooled outputs feed the DINO head (0 = full resolution;
            negative counts from the bottleneck, -1).
        grad_clip: gradient norm clipping of the student.
        calibration_samples: samples whose views set the head's running input statistics before training.
    """

    epochs: int = 50
    iterations_per_epoch: int = 100
    batch_size: int = 8
    feature_stages: tuple[int, ...] = (-2, -1)
    grad_clip: float = 3.0
    calibration_samples: int = 32


class EncoderEmbedding(nn.Module):
    """A CNN's encoder stages pooled into one vector per sample: per channel the spatial maximum and mean.

    Works on every network that describes itself (:mod:`nnunet_tpp.models.sites`): STU-Net, nnU-Net's
    PlainConvUNet / ResidualEncoderUNet. Every STU-Net block ends in an instance norm, which removes each
    channel's spatial mean; an average alone would make all views look alike (and DINO collapse), the maximum keeps
    what the view contains.
    """

    def __init__(self, network: nn.Module, stages: tuple[int, ...]):
        super().__init__()
        from nnunet_tpp.models.sites import describe, encoder_channels
        self.network = network
        self.encoder_stages = describe(network).encoder_stages
        channels = encoder_channels(network)
        n = len(channels)
        bad = [s for s in stages if not -n <= int(s) < n]
        if bad or not stages:
            raise PretextSettingsError(f"pretext feature stages {list(stages)}: {type(network).__name__} has "
                                       f"encoder stages 0..{n - 1} (or -{n}..-1 counted from the bottleneck)")
        self.stages = tuple(int(s) % n for s in stages)  # -1 = the bottleneck, whatever the depth
        self.dim = 2 * sum(channels[s] for s in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nnunet_tpp.models.sites import encoder_outputs
        encoded = encoder_outputs(self.network, x)
        pooled = [torch.cat([f.amax(dim=tuple(range(2, f.dim()))), f.mean(dim=tuple(range(2, f.dim())))], 1)
                  for f in (encoded[s] for s in self.stages)]
        return torch.cat(pooled, 1)

    def reached(self, names) -> set[str]:
        """Of the parameter ``names`` of the network, those inside the encoder stages up to the deepest pooled one
        (what the pretext loss can train)."""
        prefixes = tuple(f"{stage}." for stage in self.encoder_stages[:max(self.stages) + 1])
        return {n for n in names if n.startswith(prefixes)}


class DINOStudent(nn.Module):
    """Embedding + DINO head: the embedding runs once per view size, the head once over all views."""

    def __init__(self, embedding: nn.Module, head: DINOHead):
        super().__init__()
        self.embedding, self.head = embedding, head

    def features(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None) -> torch.Tensor:
        feats = [self.embedding(global_views)]
        if local_views is not None and local_views.shape[0]:
            feats.append(self.embedding(local_views))
        return torch.cat(feats)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None) -> torch.Tensor:
        """``(G, C, *global)`` and ``(L, C, *local)`` views -> ``(G + L, out_dim)`` logits, global views first
        (one head call; each view size standardised with its own running statistics)."""
        groups = [global_views.shape[0]] + ([local_views.shape[0]] if local_views is not None and
                                            local_views.shape[0] else [])
        return self.head(self.features(global_views, local_views), groups)


def _teacher_of(student: nn.Module) -> nn.Module:
    """A copy of the student for the EMA teacher that shares (does not copy) every frozen tensor and the running
    statistics of the head's input (the student updates them, the teacher uses the same)."""
    shared = {id(p): p for p in student.parameters() if not p.requires_grad}
    for module in student.modules():
        if isinstance(module, RunningStandardization):
            shared.update({id(b): b for b in module.buffers()})
    teacher = copy.deepcopy(student, memo=shared)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()


# --- target-parameter files ------------------------------------------------------------------------------------
def save_target_parameters(network: nn.Module, path: str, extra: dict | None = None) -> None:
    """Writes the method's target parameters with the method, options, architecture and (when fingerprinted)
    backbone they belong to."""
    payload = {"format": TARGET_FORMAT, **peft.identity(network),
               "target_parameters": {n: p.detach().cpu().clone() for n, p in peft.target_parameters(network).items()},
               **(extra or {})}
    peft.atomic_torch_save(payload, path)


def read_target_parameters(path: str) -> dict:
    """The content of a target-parameter file (refusing any other kind of file, safely)."""
    from nnunet_tpp import file_kinds
    try:
        payload = file_kinds.load_expected(path, file_kinds.TARGET_PARAMETERS, role="NNUNET_TPP_TARGET_PARAMETERS")
    except file_kinds.FileKindError as e:
        raise TargetParameterError(str(e)) from None
    if payload.get("format") != TARGET_FORMAT:
        raise TargetParameterError(f"{path!r} is a target-parameter file of format {payload.get('format')!r}; this "
                                   f"version reads {TARGET_FORMAT!r}: re-create it with `nnunet-tpp pretrain`")
    return payload


def check_file_identity(recorded: dict, network: nn.Module, source: str, what: str) -> None:
    """Refuses a file whose recorded method, options, architecture or backbone differ from ``network``'s
    (:func:`peft.check_identity`), as a :class:`TargetParameterError`."""
    try:
        peft.check_identity(recorded, peft.identity(network), source, what)
    except peft.PeftError as e:
        raise TargetParameterError(str(e)) from None


def load_target_parameters(network: nn.Module, path: str) -> dict:
    """Copies the target parameters of a file written by :func:`save_target_parameters` into ``network``.

    Returns:
        The file's metadata. Raises :class:`TargetParameterError` when the file is not a target-parameter file or
        was made for another method, other options, another architecture or another backbone.
    """
    payload = read_target_parameters(path)
    check_file_identity(payload, network, path, "target parameters")
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


# --- the resumable state ---------------------------------------------------------------------------------------
STATE_WHAT = "the pretext stage's resumable state (tpp_state.pth)"


def read_state(state_file: str, device: torch.device | str = "cpu") -> dict:
    """The content of a pretext state file (safely; refusing other files and states of earlier versions)."""
    from nnunet_tpp import file_kinds
    try:
        state = file_kinds.load_torch_file(state_file, STATE_WHAT, map_location=device)
    except file_kinds.FileKindError as e:
        raise TargetParameterError(str(e)) from None
    if not isinstance(state, dict) or state.get("state_format") != STATE_FORMAT:
        raise TargetParameterError(f"{state_file!r} is not {STATE_WHAT} of this version ({STATE_FORMAT}); it was "
                                   f"written by an earlier version or another program: remove it to start the "
                                   f"pretext stage afresh")
    return state


def stage_settings(schedule: PretextSchedule, cfg: DINOConfig, extra: dict | None = None) -> dict:
    """What a resumed state must share with the run that resumes it (everything but the number of epochs)."""
    plain = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
    return {"schedule": plain({k: v for k, v in dataclasses.asdict(schedule).items() if k != "epochs"}),
            "dino": plain(dataclasses.asdict(cfg)), **(extra or {})}


def check_state(state: dict, network: nn.Module, state_file: str, settings: dict | None = None) -> None:
    """Refuses a state made from another method, options, architecture or backbone, or with other settings."""
    check_file_identity(state["identity"], network, state_file, "pretext-stage weights")
    if settings is not None and state.get("settings") != settings:
        theirs = state.get("settings") or {}
        changed = []
        for group, values in settings.items():
            old = theirs.get(group)
            if isinstance(values, dict) and isinstance(old, dict):
                changed += [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in values.items() if old.get(k) != v]
            elif old != values:
                changed.append(f"{group}: {old!r} -> {values!r}")
        raise TargetParameterError(f"{state_file!r} was made with other pretext settings ({'; '.join(changed)}); "
                                   f"run with the settings it was made with, or remove it to start afresh")


# --- the stage -------------------------------------------------------------------------------------------------
def run_dino_stage(network: nn.Module, sample: Callable[[int], tuple[list, list]], schedule: PretextSchedule,
                   cfg: DINOConfig, device: torch.device, state_file: str, log: Callable[[str], None] = print,
                   plot_file: str | None = None, embedding: nn.Module | None = None,
                   diagnostics_file: str | None = None, settings: dict | None = None) -> list[float]:
    """Trains the network's target parameters with DINO; resumes from ``state_file`` when it exists.

    Args:
        network: a model with a PEFT method applied (only its target parameters will change).
        sample: ``sample(batch_size) -> (global_views, local_views)`` (see ``MultiCropSampler.sample``).
        schedule, cfg: stage length and DINO recipe.
        device: where to train.
        state_file: resumable state, rewritten atomically after every epoch.
        log: progress output (one message per epoch; a collapse warning is part of its epoch's message).
        plot_file: optional PNG of the loss, KL and entropies per epoch.
        embedding: views -> feature vectors, with a ``dim`` attribute (default: the CNN encoder's pooled
            stages, :class:`EncoderEmbedding`; the 2-D stage passes the ViT's class token).
        diagnostics_file: optional JSON of the per-epoch diagnostics (:class:`CollapseMeter`).
        settings: further settings a resumed state must share (e.g. the view sizes).
    Returns:
        The mean loss of every epoch (including resumed ones). On return the network holds the teacher's target
        parameters (``cfg.keep == "teacher"``, the default) or the student's.
    """
    cfg.validate(schedule.batch_size)
    if schedule.batch_size < 1 or schedule.epochs < 1 or schedule.iterations_per_epoch < 1:
        raise PretextSettingsError(f"the pretext batch size, epochs and iterations per epoch must be >= 1, got "
                                   f"{schedule.batch_size}, {schedule.epochs}, {schedule.iterations_per_epoch}")
    settings = stage_settings(schedule, cfg, settings)
    net = peft.unwrap(network)
    state = None
    if os.path.isfile(state_file):  # checked before anything changes
        state = read_state(state_file, device)
        check_state(state, net, state_file, settings)
    trainable = set(peft.target_parameters(net))
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
    try:
        embedding = embedding if embedding is not None else EncoderEmbedding(net, schedule.feature_stages)
        head = DINOHead(embedding.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_input_norm,
                        cfg.norm_momentum)
        student = DINOStudent(embedding, head).to(device)
        teacher = _teacher_of(student)
        loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device)
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(weight_decay_groups(named, cfg.weight_decay), lr=0.0)
        total = schedule.epochs * schedule.iterations_per_epoch
        warmup = min(cfg.warmup_epochs, schedule.epochs // 2) * schedule.iterations_per_epoch
        lrs = cosine_schedule(cfg.peak_lr(schedule.batch_size), cfg.min_lr, total, warmup)
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
        momenta = cosine_schedule(cfg.momentum_teacher, 1.0, total)
        start_epoch, history = 0, []
        if state is not None:
            student.load_state_dict(state["student"], strict=False)
            teacher.load_state_dict(state["teacher"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            loss_fn.center.copy_(state["center"])
            start_epoch, history = state["epoch"], list(state["history"])
            log(f"TPP pretext: resuming at epoch {start_epoch} from {state_file}")
        else:
            _calibrate(student, sample, schedule, device)
        cuda = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        teacher.eval()
        for epoch in range(start_epoch, schedule.epochs):
            started, meter = time.time(), CollapseMeter(cfg.out_dim)
            student.train()
            temp = teacher_temperature(cfg, epoch)
            for it in range(schedule.iterations_per_epoch):
                step = epoch * schedule.iterations_per_epoch + it
                for group in optimizer.param_groups:
                    group["lr"] = lrs[step]
                set_weight_decay(optimizer, wds[step])
                globals_, locals_ = sample(schedule.batch_size)
                n_global, n_views = len(globals_), len(globals_) + len(locals_)
                g = torch.cat(globals_).to(device, non_blocking=True)
                loc = torch.cat(locals_).to(device, non_blocking=True) if locals_ else None
                with torch.autocast(device.type, enabled=cuda):
                    with torch.no_grad():
                        teacher_out = teacher(g).float().chunk(n_global)
                    student_out = student(g, loc).float().chunk(n_views)
                    loss = loss_fn(list(student_out), list(teacher_out), temp)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
                if epoch < cfg.freeze_last_layer:
                    cancel_last_layer_gradients(student.head)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                ema_update(student, teacher, momenta[step])
                meter.add(float(loss.detach()), loss_fn.last_targets)
            history.append(meter.result(epoch + 1))
            row = history[-1]
            message = (f"TPP pretext: epoch {epoch + 1}/{schedule.epochs} DINO loss {row['loss']:.4f} lr "
                       f"{lrs[step]:.2e} | teacher entropy {row['teacher_entropy']:.3f}, batch-mean entropy "
                       f"{row['batch_mean_entropy']:.3f} (log K {row['log_k']:.3f}), KL {row['kl']:.3f} "
                       f"({time.time() - started:.1f} s)")
            warning = collapse_warning(row)
            _save_state(state_file, student, teacher, optimizer, loss_fn, epoch + 1, history, net, settings)
            if diagnostics_file:
                write_diagnostics(history, diagnostics_file)
            if plot_file:
                plot_progress(history, plot_file)
            log(message + (f"\n{warning}" if warning else ""))
        if cfg.keep == "teacher":
            _copy_teacher_targets(net, student, teacher)
        return [row["loss"] for row in history]
    finally:  # back to the supervised method's freezing (target parameters + heads + what the method trains)
        peft.freeze(net)


@torch.no_grad()
def _calibrate(student: DINOStudent, sample, schedule: PretextSchedule, device: torch.device) -> None:
    """Sets the head's running input statistics from the views of ``calibration_samples`` samples."""
    norm = student.head.input_norm
    if not isinstance(norm, RunningStandardization):
        return
    feats, seen = ([], []), 0
    while seen < max(1, schedule.calibration_samples):
        globals_, locals_ = sample(schedule.batch_size)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            feats[0].append(student.embedding(torch.cat(globals_).to(device)).float())
            if locals_:
                feats[1].append(student.embedding(torch.cat(locals_).to(device)).float())
        seen += schedule.batch_size
    for group, values in enumerate(feats):
        if values:
            norm.calibrate(torch.cat(values), group)


def _copy_teacher_targets(net: nn.Module, student: nn.Module, teacher: nn.Module) -> None:
    """Copies the teacher's values of the network's target parameters into the network (the student's)."""
    by_id = {id(p): n for n, p in student.named_parameters()}
    teacher_params = dict(teacher.named_parameters())
    with torch.no_grad():
        for param in peft.target_parameters(net).values():
            name = by_id.get(id(param))
            if name is not None:
                param.copy_(teacher_params[name])


def _save_state(path, student, teacher, optimizer, loss_fn, epoch, history, net, settings) -> None:
    names = {n for n, p in student.named_parameters() if p.requires_grad} | {n for n, _ in student.named_buffers()}
    peft.atomic_torch_save({
        "state_format": STATE_FORMAT, "identity": peft.identity(net), "settings": settings,
        "student": {k: v.detach().cpu() for k, v in student.state_dict().items() if k in names},
        "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items() if k in names},
        "optimizer": optimizer.state_dict(), "center": loss_fn.center.detach().cpu(),
        "epoch": epoch, "history": history}, path)


def write_diagnostics(history: list[dict], path: str) -> None:
    """``tpp_diagnostics.json``: the list of per-epoch diagnostics, written atomically."""
    keys = ("epoch", "loss", "teacher_entropy", "batch_mean_entropy", "kl", "log_k")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([{k: row[k] for k in keys} for row in history], f, indent=1)
    os.replace(tmp, path)


def plot_progress(history: list[dict], path: str) -> None:
    """A PNG of the pretext stage per epoch: DINO loss and student-teacher KL; teacher entropy and batch-mean
    entropy against log K (collapse: entropy near log K, or batch-mean entropy near 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(epochs, [r["loss"] for r in history], "b-o", linewidth=2, label="DINO loss")
    ax1.plot(epochs, [r["kl"] for r in history], "g--", label="KL(teacher || student)")
    ax1.set(xlabel="pretext epoch", ylabel="nats", title="TPP pretext stage (DINO, target parameters only)")
    ax2.plot(epochs, [r["teacher_entropy"] for r in history], "r-o", label="teacher entropy (per view)")
    ax2.plot(epochs, [r["batch_mean_entropy"] for r in history], "k-s", label="batch-mean teacher entropy")
    ax2.axhline(history[-1]["log_k"], color="grey", linestyle=":", label="log K (uniform)")
    ax2.set(xlabel="pretext epoch", ylabel="nats", title="collapse diagnostics")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(losses: list[float], path: str, objective: str = "DINO") -> None:
    """A PNG of a pretext loss per epoch, like nnU-Net's progress.png (the MAE stage's)."""
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
