"""The TPP pretext stage with masked reconstruction for CNN U-Nets: the frozen backbone with its PEFT target
parameters reconstructs masked blocks of the input through the U-Net's decoder and a light output layer; the loss is
the mean squared error on the masked voxels only. Resumable, with progress output, a per-epoch diagnostics file and
a plot, like the DINO stage (:mod:`nnunet_tpp.pretext.stage`).

Followed: nnU-Net's self-supervised framework, MIC-DKFZ/nnssl
``src/nnssl/training/nnsslTrainer/masked_image_modeling/BaseMAETrainer.py`` (``BaseMAETrainer.train_step``, the
masking in ``create_blocky_mask`` / ``mask_creation``, the loss ``MAEMSELoss`` of ``src/nnssl/training/loss/
mse_loss.py``, the optimiser of ``AbstractTrainer.configure_optimizers``). **As nnssl**: 75 % of 16-voxel blocks
masked (:mod:`nnunet_tpp.pretext.masked_views`), masked voxels set to 0, the whole U-Net (encoder, decoder) runs on
the masked input and its output layer has as many channels as the input (nnssl builds the network with
``num_output_channels`` = input channels and no deep supervision: the reconstruction layer is the U-Net's
highest-resolution 1x1x1 output convolution, initialised as nnU-Net initialises (He, ``neg_slope`` 1e-2, bias 0)),
the loss ``sum((out - x)^2 * (1 - mask)) / sum(1 - mask)`` on the unmasked input ``x``, SGD with Nesterov momentum
0.99 and weight decay 3e-5 on every trained parameter, nnU-Net's polynomial learning-rate decay (exponent 0.9, per
epoch) from 1e-2, the gradient norm clipped at 12 over all trained parameters together, batch 2, autocast with a
gradient scaler on CUDA, the batch split over ranks under DDP.

**Not as nnssl** (options of :class:`MaskedConfig`, the view settings of the sampler; the README gives the
measurements): only the PEFT method's target parameters and the output layer train, the backbone is frozen (TPP);
the output layer is a new 1x1x1 convolution beside the segmentation heads (the trainer's heads stay for fine-tuning),
fed the decoder's highest-resolution features through a forward hook, deep supervision off during the stage; the
views are crops of the training cases of the plan's patch size (nnssl: its own 160^3 pre-training patch) with
mirroring only (no rotation / scaling), and blocks at most the view per axis.

On a 3-D token network (nnU-Net's Primus, found through its transformer description) the same stage runs nnssl's
SimMIM recipe for Primus instead: :mod:`nnunet_tpp.pretext.masked_tokens` (mask token, token-sized blocks, AdamW;
:meth:`MaskedConfig.for_network`). Each step's random state (stochastic depth) is fixed by the step
(:func:`~nnunet_tpp.pretext.feed.step_random`), so a resumed stage equals an uninterrupted one.

Under ``torch.distributed`` each rank reconstructs its share of the batch and gradients are averaged over ranks
(what nnssl's DDP does), so the target parameters and the output layer stay identical on every rank; only rank 0
writes files and logs.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import PretextSettingsError
from nnunet_tpp.pretext.distributed import (all_reduce_sum, average_gradients, broadcast_module, is_main, shard,
                                             world)
from nnunet_tpp.pretext.feed import stage_batches, step_random
from nnunet_tpp.pretext.optim import CLIP_MODES, clip_gradients, weight_decay_groups
from nnunet_tpp.pretext.plots import plot_masked, write_diagnostics
from nnunet_tpp.pretext.targets import PretextSchedule, check_state, read_state, save_state, stage_settings

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class MaskedConfig:
    """Recipe of the masked-reconstruction stage (nnssl's ``BaseMAETrainer`` where it applies; module docstring).

    Attributes:
        mask_ratio: share of the blocks masked (nnssl 0.75).
        block_size: block edge in voxels (nnssl 16; at most the view per axis).
        optimizer: ``sgd`` (nnssl, nnU-Net: Nesterov momentum ``momentum``) or ``adamw`` (betas 0.9, 0.999; biases
            and 1-D parameters without weight decay).
        lr: the initial learning rate, decayed per epoch as ``lr * (1 - epoch / epochs) ** poly_exponent``.
        momentum, weight_decay: of the optimiser.
        poly_exponent: nnU-Net's polynomial decay.
        grad_clip: largest gradient norm (nnssl 12), over all trained parameters together (``clip: global``, nnssl)
            or per parameter.
        normalize_output_input: an instance norm (affine) before the output convolution (not in nnssl, whose
            ResEnc decoder ends in conv-norm-nonlinearity; see :class:`Reconstruction`).
        betas: AdamW's (nnssl's Primus trainers 0.9 / 0.98).
        decay_all: AdamW's weight decay on every trained parameter (nnssl's Primus trainers) instead of all but
            biases and 1-D parameters.
        warmup_share: the share of the stage's epochs (rounded down) over which the learning rate first rises
            linearly (nnssl's Primus trainers: 50 of 1000 epochs); the polynomial decay follows.
        token_output: on a token network (Primus): the output layer, ``patch_decode`` (nnssl) or ``linear``
            (:mod:`nnunet_tpp.pretext.masked_tokens`).

    :meth:`for_network` gives a network's defaults: the above for a CNN U-Net (nnssl's ``BaseMAETrainer``), nnssl's
    ``SimMIMEvaTrainer`` for a token network (Primus).
    """

    mask_ratio: float = 0.75
    block_size: int = 16
    optimizer: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    clip: str = "global"
    normalize_output_input: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    decay_all: bool = False
    warmup_share: float = 0.0
    token_output: str = "patch_decode"

    @classmethod
    def for_network(cls, network: nn.Module, **overrides) -> "MaskedConfig":
        """The defaults for ``network`` with ``overrides`` (fields) applied: a token network (Primus,
        :func:`~nnunet_tpp.pretext.masked_tokens.token_sites`) gets nnssl's ``SimMIMEvaTrainer`` recipe (mask blocks
        of one token, AdamW lr 3e-4, betas 0.9 / 0.98, weight decay 5e-2 on every parameter, 5 % linear warm-up,
        gradient norm clipped at 1); any other network the class defaults (``BaseMAETrainer``)."""
        from nnunet_tpp.pretext.masked_tokens import token_sites
        sites = token_sites(peft.unwrap(network))
        base = {} if sites is None else {"block_size": sites.patch, "optimizer": "adamw", "lr": 3e-4,
                                         "weight_decay": 5e-2, "betas": (0.9, 0.98), "decay_all": True,
                                         "warmup_share": 0.05, "grad_clip": 1.0}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def validate(self) -> None:
        """Raises :class:`PretextSettingsError` for settings that cannot train."""
        if not self.lr > 0:
            raise PretextSettingsError(f"the pretext learning rate must be > 0, got {self.lr:g}")
        if self.optimizer not in OPTIMIZERS:
            raise PretextSettingsError(f"the masked-reconstruction optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                       f"got {self.optimizer!r}")
        if self.clip not in CLIP_MODES:
            raise PretextSettingsError(f"clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        if not 0 < self.mask_ratio < 1 or self.block_size < 1 or not self.grad_clip > 0:
            raise PretextSettingsError("need 0 < mask_ratio < 1, block_size >= 1 and grad_clip > 0")
        if not 0 <= self.warmup_share < 1:
            raise PretextSettingsError(f"warmup_share must lie in [0, 1), got {self.warmup_share}")
        from nnunet_tpp.pretext.masked_tokens import TOKEN_OUTPUTS
        if self.token_output not in TOKEN_OUTPUTS:
            raise PretextSettingsError(f"token_output must be one of {', '.join(TOKEN_OUTPUTS)}, "
                                       f"got {self.token_output!r}")

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of ``epoch`` (from 0) of ``epochs``: over the first ``int(warmup_share * epochs)``
        epochs ``lr * (epoch + 1) / warm-up`` (nnssl's ``Lin_incr_LRScheduler``), then nnU-Net's polynomial decay
        over the rest (``PolyLRScheduler_offset``)."""
        warm = int(self.warmup_share * epochs)
        if epoch < warm:
            return self.lr * (epoch + 1) / warm
        return self.lr * (1 - (epoch - warm) / (epochs - warm)) ** self.poly_exponent


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nnssl's ``MAEMSELoss``: ``sum((prediction - target)^2 * (1 - mask)) / sum(1 - mask)``; ``mask`` 1 = visible,
    0 = masked, broadcast over channels."""
    hidden = 1 - mask
    return ((prediction - target) ** 2 * hidden).sum() / hidden.sum().clamp_min(1)


def output_head(network: nn.Module) -> str:
    """The name of the network's highest-resolution segmentation head (the last head in forward order of its
    description, :mod:`nnunet_tpp.models.sites`): its input is the decoder's last feature map."""
    from nnunet_tpp.models.sites import HEAD, describe
    heads = describe(network).select(HEAD)
    if not heads:
        raise PretextSettingsError(f"{type(network).__name__} names no segmentation head: the masked reconstruction "
                                   f"needs the decoder's highest-resolution features")
    return heads[-1].name


def input_channels(network: nn.Module) -> int:
    """The number of input channels (of the network's first convolution)."""
    from nnunet_tpp.models.sites import describe
    return int(network.get_submodule(describe(network).convs[0].name).in_channels)


class Reconstruction(nn.Module):
    """A U-Net and a reconstruction output layer: inside :meth:`attached` the network's forward returns the
    output layer applied to the decoder's highest-resolution features (``(B, C_in, *spatial)``), deep supervision
    off; outside it the network is untouched.

    The output layer is a 1x1x1 convolution to the input's channels (nnssl's), preceded by an instance norm (affine)
    when ``normalize_input`` (:attr:`MaskedConfig.normalize_output_input`): STU-Net's decoder ends in a residual sum
    that no norm follows, whose scale a pre-trained network sets freely."""

    def __init__(self, network: nn.Module, normalize_input: bool = True):
        super().__init__()
        self.network = network
        self.head_name = output_head(network)
        head = network.get_submodule(self.head_name)
        dims = len(getattr(head, "kernel_size", (1, 1, 1)))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        channels = head.in_channels
        layers = [norm(channels, affine=True)] if normalize_input else []
        self.output = nn.Sequential(*layers, conv(channels, input_channels(network), 1))
        nn.init.kaiming_normal_(self.output[-1].weight, a=1e-2)  # nnU-Net's InitWeights_He(1e-2)
        nn.init.zeros_(self.output[-1].bias)

    @contextmanager
    def attached(self):
        """Routes the network's output through the output layer (a forward hook on the head) for the block."""
        decoder = getattr(self.network, "decoder", None)
        supervised = getattr(decoder, "deep_supervision", None)
        handle = self.network.get_submodule(self.head_name).register_forward_hook(
            lambda module, args, out: self.output(args[0]))
        if supervised is not None:
            decoder.deep_supervision = False
        try:
            yield self
        finally:
            handle.remove()
            if supervised is not None:
                decoder.deep_supervision = supervised

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of ``x`` (call inside :meth:`attached`; the mask, already applied to ``x``, is not
        needed)."""
        return self.network(x)


def reconstruction(network: nn.Module, cfg: MaskedConfig) -> nn.Module:
    """The reconstruction model of ``network``: :class:`~nnunet_tpp.pretext.masked_tokens.TokenReconstruction` for
    a token network (Primus), :class:`Reconstruction` for a CNN U-Net. Its own parameters (output layer, mask
    token) are those outside ``network.``."""
    from nnunet_tpp.pretext.masked_tokens import TokenReconstruction, token_sites
    sites = token_sites(network)
    if sites is not None:
        return TokenReconstruction(network, sites, cfg.token_output)
    return Reconstruction(network, cfg.normalize_output_input)


def _optimizer(cfg: MaskedConfig, named: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([p for _, p in named], cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    groups = ([{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}] if cfg.decay_all else
              weight_decay_groups(named, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def run_masked_stage(network: nn.Module, source, schedule: PretextSchedule, cfg: MaskedConfig, device: torch.device,
                     state_file: str, log: Callable[[str], None] = print, plot_file: str | None = None,
                     diagnostics_file: str | None = None, settings: dict | None = None, *, workers: int = 0,
                     train_targets: bool = True, compile: bool = False,
                     on_epoch_end: Callable[[dict], None] | None = None, seed: int = 0) -> list[float]:
    """Trains the network's target parameters by masked reconstruction; resumes from ``state_file`` when it exists.

    Args:
        network: a U-Net with a PEFT method applied (STU-Net or nnU-Net's own; only its target parameters change).
        source: a :class:`~nnunet_tpp.pretext.feed.ViewSource` of ``(view, mask)`` samples
            (:class:`~nnunet_tpp.pretext.masked_views.MaskedViewSampler`), or a plain ``sample(batch_size) ->
            (views, masks)`` callable.
        schedule: epochs, iterations per epoch, batch (over all ranks).
        cfg: the recipe (:class:`MaskedConfig`).
        device: where to train.
        state_file: resumable state (target parameters, output layer, optimiser, history), rewritten atomically
            after every epoch.
        log: progress output, one message per epoch.
        plot_file, diagnostics_file: optional PNG and JSON of the per-epoch loss and the loss of predicting 0.
        settings: further settings a resumed state must share (e.g. the view size).
        workers: background processes that cut the views (a ``ViewSource`` only).
        train_targets: False for the head-only control (only the output layer trains).
        compile: run the network through ``torch.compile``.
        on_epoch_end: called on every rank after each epoch with ``{"epoch", "model"}`` (the
            :class:`Reconstruction`: network and output layer).
        seed: the fresh output layer's initialisation (its own random stream: the full stage and its head-only
            control start from the same layer).
    Returns:
        The mean loss of every epoch (over all ranks). On return the network holds the trained target parameters;
        its freezing and its heads are as before.
    """
    cfg.validate()
    if schedule.batch_size < 1 or schedule.epochs < 1 or schedule.iterations_per_epoch < 1:
        raise PretextSettingsError(f"the pretext batch size, epochs and iterations per epoch must be >= 1, got "
                                   f"{schedule.batch_size}, {schedule.epochs}, {schedule.iterations_per_epoch}")
    rank, size = world()
    try:
        indices = shard(schedule.batch_size, rank, size)
    except ValueError as e:
        raise PretextSettingsError(str(e)) from None
    settings = stage_settings(schedule, cfg, {**(settings or {}), "train_targets": bool(train_targets)}, "masked")
    net = peft.unwrap(network)
    state = None
    if os.path.isfile(state_file):
        state = read_state(state_file, device)
        check_state(state, net, state_file, settings)
    trainable = set(peft.target_parameters(net)) if train_targets else set()
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = reconstruction(net, cfg).to(device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = _optimizer(cfg, named)
        start_epoch, history = 0, []
        if state is not None:
            model.load_state_dict(state["student"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = state["epoch"], list(state["history"])
            if is_main():
                log(f"TPP pretext: resuming at epoch {start_epoch} from {state_file}")
        else:  # the fresh output layer (and the target parameters) as rank 0 has them, on every rank
            broadcast_module(model)
        cuda = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        ipe = schedule.iterations_per_epoch
        with model.attached():
            run = torch.compile(model) if compile else model
            for epoch in range(start_epoch, schedule.epochs):
                started = time.time()
                model.train()
                lr = cfg.lr_at(epoch, schedule.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, predicting-0 loss, steps
                steps = range(epoch * ipe, (epoch + 1) * ipe)
                for step, (views, masks) in zip(steps, stage_batches(source, steps, indices, workers)):
                    x = views.to(device, non_blocking=True)
                    m = masks.to(device, non_blocking=True)
                    with step_random(seed, step, device):  # stochastic depth: the same after a resume
                        with torch.autocast(device.type, enabled=cuda):
                            prediction = run(x * m, m)
                        loss = masked_mse(prediction.float(), x, m)
                        optimizer.zero_grad(set_to_none=True)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            scaler.unscale_(optimizer)
                        else:
                            loss.backward()
                    average_gradients(params)
                    clip_gradients(params, cfg.grad_clip, cfg.clip)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    with torch.no_grad():
                        sums += torch.stack([loss.detach().double(), masked_mse(torch.zeros_like(x), x, m).double(),
                                             torch.ones((), dtype=torch.float64, device=device)])
                all_reduce_sum(sums)
                history.append({"epoch": epoch + 1, "loss": float(sums[0] / sums[2]),
                                "mean_prediction_loss": float(sums[1] / sums[2]), "lr": lr})
                if on_epoch_end is not None:
                    on_epoch_end({"epoch": epoch + 1, "model": model})
                if is_main():
                    row = history[-1]
                    _save(state_file, model, optimizer, epoch + 1, history, net, settings)
                    if diagnostics_file:
                        write_diagnostics(history, diagnostics_file)
                    if plot_file:
                        plot_masked(history, plot_file)
                    log(f"TPP pretext: epoch {epoch + 1}/{schedule.epochs} masked-reconstruction loss "
                        f"{row['loss']:.4f} (predicting 0: {row['mean_prediction_loss']:.4f}, ratio "
                        f"{row['loss'] / max(row['mean_prediction_loss'], 1e-12):.3f}) lr {lr:.2e} "
                        f"({time.time() - started:.1f} s)" + ("" if train_targets else " [head-only control]"))
        return [row["loss"] for row in history]
    finally:
        peft.freeze(net)


def _save(path, model: Reconstruction, optimizer, epoch, history, net, settings) -> None:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    save_state(path, net, settings,
               student={k: v.detach().cpu() for k, v in model.state_dict().items() if k in names},
               optimizer=optimizer.state_dict(), epoch=epoch, history=history)


@torch.no_grad()
def masked_eval_loss(network: nn.Module, state: dict, batches: list, device: torch.device,
                     cfg: MaskedConfig | None = None) -> float:
    """The masked-voxel MSE of a fixed set of masked views for the network's present target parameters and the
    output layer of a stage state (full run or head-only control).

    Args:
        state: a masked-reconstruction stage state (:func:`~nnunet_tpp.pretext.targets.read_state`).
        batches: ``(views, masks)`` batches (:func:`nnunet_tpp.pretext.feed.fixed_set`).
    Returns:
        Squared error over all masked voxels of all batches, divided by their number.
    """
    net = peft.unwrap(network)
    model = reconstruction(net, cfg or MaskedConfig.for_network(net)).to(device)
    own = {k: v for k, v in state["student"].items() if not k.startswith("network.")}
    missing = {k for k, _ in model.named_parameters() if not k.startswith("network.")} - set(own)
    if missing:
        raise KeyError(f"the stage state lacks {sorted(missing)}")
    model.load_state_dict(own, strict=False)
    model.eval()
    total, count = 0.0, 0.0
    with model.attached():
        for views, masks in batches:
            x, m = views.to(device), masks.to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                prediction = model(x * m, m)
            hidden = float((1 - m).sum())
            total += float(masked_mse(prediction.float(), x, m)) * hidden
            count += hidden
    return total / max(count, 1.0)

