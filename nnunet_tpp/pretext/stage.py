"""The TPP pretext stage with DINO: DINO on the target dataset's own images, training only the PEFT method's
target parameters (and a projection head); the backbone stays frozen. Resumable, with progress output, collapse
diagnostics and a plot; its result is a target-parameter file that fine-tuning starts from. (The masked-reconstruction
stage is :mod:`nnunet_tpp.pretext.masked`; the files both write are in :mod:`nnunet_tpp.pretext.targets`.)

**As the official DINO** (facebookresearch/dino ``main_dino.py``, ``utils.py``): AdamW with biases and 1-D
parameters exempt from weight decay, weight decay 0.04 -> 0.4 (cosine), linear warm-up then cosine learning rate to
``min_lr`` 1e-6, the head's last layer frozen in the first epoch (``freeze_last_layer``), the weight-normalised last
layer with its norm fixed, the EMA teacher (momentum 0.996 -> 1, cosine) initialised as the student and left in
train mode, only the global views through the teacher, the cross-entropy over every (teacher view, other view) pair,
the centre (momentum 0.9) averaged over ranks with ``all_reduce``, student temperature 0.1, gradient clipping 3 per
parameter (``utils.clip_gradients``) before the last layer's gradients are cancelled, mixed precision with a gradient
scaler on CUDA, the teacher's parameters as the result.

**Not as the official DINO** (each an option of :class:`~nnunet_tpp.pretext.dino.DINOConfig` or
:class:`PretextSchedule`; the README gives the measurement behind each default): an absolute learning rate ``lr``
5e-4 (the official ``--lr 5e-4`` is scaled by ``batch / 256``, which moves nothing at nnU-Net's batch sizes; the TPP
paper's ``1e-4 * batch / 256`` even less; ``lr=None`` restores the rule with ``base_lr``), a constant teacher
temperature 0.01 (official 0.04; with only the target parameters training, 0.04 drifted to uniform targets), 4,096
prototypes and a hidden width of 1,024 (official 65,536 and 2,048), the head's input standardised with running
statistics per view size (``head_input_norm``; the official head has no input normalisation: pooled CNN features
share a large common component), features pooled from encoder stages (max and mean per channel; the official code
takes a ViT's class token or a ResNet's average), 3-D multi-crop views from one region per sample (2 global + 4
local; official 2 + 8 crops of an image), and a pretext batch of its own (``batch_size`` 8, official 64 per GPU).

Under ``torch.distributed`` every rank computes its share of each batch (:func:`~nnunet_tpp.pretext.distributed.shard`),
gradients are averaged over ranks, the centre and the head's running statistics are pooled over ranks, so student,
teacher and centre stay identical on every rank; only rank 0 writes files and logs.

Files: ``state_file`` (rewritten atomically after every epoch, with the method, options, architecture and
backbone fingerprint it was made from; a state of another identity or other settings is refused), the optional
``plot_file`` and ``diagnostics_file`` (``tpp_diagnostics.json``: one entry per epoch, see
:class:`~nnunet_tpp.pretext.dino.CollapseMeter`).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import (CollapseMeter, DINOConfig, DINOHead, DINOLoss, PretextSettingsError,
                                     RunningStandardization, cancel_last_layer_gradients, collapse_warning,
                                     cosine_schedule, ema_update, teacher_temperature)
from nnunet_tpp.pretext.distributed import (all_reduce_sum, average_gradients, broadcast_module, is_main, shard,
                                             world)
from nnunet_tpp.pretext.feed import calibration_batches, stage_batches, step_random
from nnunet_tpp.pretext.optim import clip_gradients, set_weight_decay, weight_decay_groups
from nnunet_tpp.pretext.plots import plot_losses, plot_progress, write_diagnostics  # noqa: F401  (re-exported)
from nnunet_tpp.pretext.targets import (STATE_FORMAT, STATE_WHAT, TARGET_FORMAT,  # noqa: F401  (re-exported)
                                        PretextSchedule, TargetParameterError, check_file_identity, check_state,
                                        copy_target_parameters, load_target_parameters, read_state,
                                        read_target_parameters, save_state, save_target_parameters, stage_settings)


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


def teacher_of(student: nn.Module) -> nn.Module:
    """The EMA teacher of ``student``: a copy that shares (does not copy) every frozen tensor and the running
    statistics of the head's input (the student updates them, the teacher uses the same).

    Returns:
        The teacher, in eval mode, with no parameter requiring a gradient.
    """
    shared = {id(p): p for p in student.parameters() if not p.requires_grad}
    for module in student.modules():
        if isinstance(module, RunningStandardization):
            shared.update({id(b): b for b in module.buffers()})
    teacher = copy.deepcopy(student, memo=shared)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()


def set_teacher_mode(teacher: nn.Module, mode: str) -> nn.Module:
    """Puts the EMA teacher in ``train`` (the official DINO) or ``eval`` mode; the head's running input statistics
    (ours) stay in eval mode either way: only the student's inputs update them."""
    teacher.train(mode == "train")
    for module in teacher.modules():
        if isinstance(module, RunningStandardization):
            module.eval()
    return teacher


def network_embedding(net: nn.Module, stages: tuple[int, ...], size=None) -> nn.Module:
    """DINO's embedding of ``net``: the mean of the patch tokens of a token network (Primus,
    :class:`~nnunet_tpp.pretext.token_embedding.TokenEmbedding`; ``size``: the input it was built for, required),
    else the pooled encoder ``stages`` of a CNN U-Net (:class:`EncoderEmbedding`)."""
    from nnunet_tpp.pretext.masked_tokens import token_sites
    from nnunet_tpp.pretext.token_embedding import TokenEmbedding
    sites = token_sites(net)
    if sites is None:
        return EncoderEmbedding(net, stages)
    if size is None:
        raise PretextSettingsError(f"DINO on {type(net).__name__} needs the input size it was built for (its patch)")
    return TokenEmbedding(net, sites, size)


def build_student(net: nn.Module, cfg: DINOConfig, schedule: PretextSchedule,
                  embedding: nn.Module | None = None) -> DINOStudent:
    """The stage's student: ``embedding`` (default: the pooled encoder stages of ``net``) and a fresh DINO head."""
    embedding = embedding if embedding is not None else network_embedding(net, schedule.feature_stages)
    head = DINOHead(embedding.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_input_norm,
                    cfg.norm_momentum)
    return DINOStudent(embedding, head)


# --- the stage -------------------------------------------------------------------------------------------------
def run_dino_stage(network: nn.Module, sample, schedule: PretextSchedule, cfg: DINOConfig, device: torch.device,
                   state_file: str, log: Callable[[str], None] = print, plot_file: str | None = None,
                   embedding: nn.Module | None = None, diagnostics_file: str | None = None,
                   settings: dict | None = None, *, workers: int = 0, train_targets: bool = True,
                   compile: bool = False, on_epoch_end: Callable[[dict], None] | None = None,
                   seed: int = 0) -> list[float]:
    """Trains the network's target parameters with DINO; resumes from ``state_file`` when it exists.

    Args:
        network: a model with a PEFT method applied (only its target parameters will change).
        sample: a :class:`~nnunet_tpp.pretext.feed.ViewSource` (views fixed by step and sample: the same for any
            number of workers or ranks, and for a resumed run; e.g. ``MultiCropSampler``), or a plain
            ``sample(batch_size) -> (global_views, local_views)`` callable (drawn in this process).
        schedule, cfg: stage length and DINO recipe.
        device: where to train.
        state_file: resumable state, rewritten atomically after every epoch.
        log: progress output (one message per epoch; a collapse warning is part of its epoch's message).
        plot_file: optional PNG of the loss, KL and entropies per epoch.
        embedding: views -> feature vectors, with a ``dim`` attribute (default: the CNN encoder's pooled
            stages, :class:`EncoderEmbedding`; the 2-D stage passes the ViT's class token).
        diagnostics_file: optional JSON of the per-epoch diagnostics (:class:`CollapseMeter`).
        settings: further settings a resumed state must share (e.g. the view sizes).
        workers: background processes that cut the views (a ``ViewSource`` only; 0: in this process).
        train_targets: False for the head-only control: the target parameters stay as they are, only the head
            trains (same steps, learning rates and views).
        compile: run student and teacher through ``torch.compile`` (as nnU-Net compiles its network on CUDA).
        on_epoch_end: called on every rank after each epoch with ``{"epoch", "student", "teacher", "center"}``.
        seed: the fresh head's initialisation (its own random stream: the full stage and its head-only control start
            from the same head, whatever ran before).
    Returns:
        The mean loss of every epoch (including resumed ones; over all ranks). On return the network holds the
        teacher's target parameters (``cfg.keep == "teacher"``, the default) or the student's.
    """
    cfg.validate(schedule.batch_size)
    if schedule.batch_size < 1 or schedule.epochs < 1 or schedule.iterations_per_epoch < 1:
        raise PretextSettingsError(f"the pretext batch size, epochs and iterations per epoch must be >= 1, got "
                                   f"{schedule.batch_size}, {schedule.epochs}, {schedule.iterations_per_epoch}")
    rank, size = world()
    try:
        indices = shard(schedule.batch_size, rank, size)
    except ValueError as e:
        raise PretextSettingsError(str(e)) from None
    settings = stage_settings(schedule, cfg, {**(settings or {}), "train_targets": bool(train_targets)})
    net = peft.unwrap(network)
    state = None
    if os.path.isfile(state_file):  # checked before anything changes
        state = read_state(state_file, device)
        check_state(state, net, state_file, settings)
    trainable = set(peft.target_parameters(net)) if train_targets else set()
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = build_student(net, cfg, schedule, embedding).to(device)
        teacher = teacher_of(student)
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
            if is_main():
                log(f"TPP pretext: resuming at epoch {start_epoch} from {state_file}")
        else:  # a fresh head (and target parameters) as rank 0 has them, on every rank; then the same statistics
            broadcast_module(student)
            teacher.load_state_dict(student.state_dict())
            _calibrate(student, sample, schedule, device, rank, size)
        cuda = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        set_teacher_mode(teacher, cfg.teacher_mode)
        run_student = torch.compile(student) if compile else student
        run_teacher = torch.compile(teacher) if compile else teacher
        ipe = schedule.iterations_per_epoch
        for epoch in range(start_epoch, schedule.epochs):
            started, meter = time.time(), CollapseMeter(cfg.out_dim)
            student.train()
            temp = teacher_temperature(cfg, epoch)
            steps = range(epoch * ipe, (epoch + 1) * ipe)
            for step, (globals_, locals_) in zip(steps, stage_batches(sample, steps, indices, workers)):
                for group in optimizer.param_groups:
                    group["lr"] = lrs[step]
                set_weight_decay(optimizer, wds[step])
                n_global, n_views = len(globals_), len(globals_) + len(locals_)
                g = torch.cat(globals_).to(device, non_blocking=True)
                loc = torch.cat(locals_).to(device, non_blocking=True) if locals_ else None
                with step_random(seed, step, device):  # stochastic depth (Primus): the same after a resume
                    with torch.autocast(device.type, enabled=cuda):
                        with torch.no_grad():
                            teacher_out = run_teacher(g).float().chunk(n_global)
                        student_out = run_student(g, loc).float().chunk(n_views)
                        loss = loss_fn(list(student_out), list(teacher_out), temp)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                average_gradients(params)
                clip_gradients(params, schedule.grad_clip, cfg.clip)
                if epoch < cfg.freeze_last_layer:
                    cancel_last_layer_gradients(student.head)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                ema_update(student, teacher, momenta[step])
                meter.add(float(loss.detach()), loss_fn.last_targets)
            history.append(_pooled_result(meter, epoch + 1, device))
            if on_epoch_end is not None:
                on_epoch_end({"epoch": epoch + 1, "student": student, "teacher": teacher, "center": loss_fn.center})
            if is_main():
                row = history[-1]
                message = (f"TPP pretext: epoch {epoch + 1}/{schedule.epochs} DINO loss {row['loss']:.4f} lr "
                           f"{lrs[step]:.2e} | teacher entropy {row['teacher_entropy']:.3f}, batch-mean entropy "
                           f"{row['batch_mean_entropy']:.3f} (log K {row['log_k']:.3f}), KL {row['kl']:.3f} "
                           f"({time.time() - started:.1f} s)" + ("" if train_targets else " [head-only control]"))
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


def _pooled_result(meter: CollapseMeter, epoch: int, device: torch.device) -> dict:
    """The epoch's diagnostics over every rank (loss and entropy averaged, the batch-mean distribution pooled)."""
    if world()[1] > 1:
        size = world()[1]
        scalars = all_reduce_sum(torch.tensor([meter.loss, meter.entropy], dtype=torch.float64, device=device))
        meter.loss, meter.entropy = float(scalars[0]) / size, float(scalars[1]) / size
        if meter.prob_sum is not None:
            meter.prob_sum = all_reduce_sum(meter.prob_sum.to(device)).cpu()
        meter.rows = int(all_reduce_sum(torch.tensor([meter.rows], device=device))[0])
    return meter.result(epoch)


@torch.no_grad()
def _calibrate(student: DINOStudent, sample, schedule: PretextSchedule, device: torch.device, rank: int = 0,
               size: int = 1) -> None:
    """Sets the head's running input statistics from the views of ``calibration_samples`` samples (pooled over
    ranks)."""
    norm = student.head.input_norm
    if not isinstance(norm, RunningStandardization):
        return
    feats = ([], [])
    for globals_, locals_ in calibration_batches(sample, schedule.calibration_samples, schedule.batch_size, rank,
                                                 size):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            feats[0].append(student.embedding(torch.cat(globals_).to(device)).float())
            if locals_:
                feats[1].append(student.embedding(torch.cat(locals_).to(device)).float())
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
            if name is not None and param.requires_grad:
                param.copy_(teacher_params[name])


def _save_state(path, student, teacher, optimizer, loss_fn, epoch, history, net, settings) -> None:
    names = {n for n, p in student.named_parameters() if p.requires_grad} | {n for n, _ in student.named_buffers()}
    save_state(path, net, settings,
               student={k: v.detach().cpu() for k, v in student.state_dict().items() if k in names},
               teacher={k: v.detach().cpu() for k, v in teacher.state_dict().items() if k in names},
               optimizer=optimizer.state_dict(), center=loss_fn.center.detach().cpu(), epoch=epoch,
               history=history)


# --- evaluation (the target check) -----------------------------------------------------------------------------
@torch.no_grad()
def dino_eval_loss(network: nn.Module, state: dict, cfg: DINOConfig, schedule: PretextSchedule, batches: list,
                   device: torch.device, embedding: nn.Module | None = None) -> float:
    """The DINO loss of a fixed set of views for the network's present target parameters and the head of a stage
    state (the result's: ``cfg.keep``), with the stage's final centre and teacher temperature, the same network as
    teacher and student, in eval mode, nothing updated.

    Args:
        state: a DINO stage state (:func:`read_state`) of a stage run on this network (full or head-only control).
        batches: ``(global_views, local_views)`` batches (e.g. :func:`nnunet_tpp.pretext.feed.fixed_set`).
    Returns:
        The mean loss over the batches.
    """
    net = peft.unwrap(network)
    student = build_student(net, cfg, schedule, embedding).to(device)
    weights = state[cfg.keep]
    student.head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")},
                                 strict=False)
    student.eval()
    loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device)
    loss_fn.center.copy_(state["center"])
    temp = teacher_temperature(cfg, schedule.epochs - 1)
    losses = []
    for globals_, locals_ in batches:
        g = torch.cat(globals_).to(device)
        loc = torch.cat(locals_).to(device) if locals_ else None
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = student(g, loc).float()
            views = out.chunk(len(globals_) + len(locals_))
            losses.append(float(loss_fn(list(views), list(views[:len(globals_)]), temp, update_center=False)))
    return sum(losses) / len(losses)
