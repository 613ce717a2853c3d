"""Optimiser parameter groups shared by every pretext stage (DINO, MAE, DINOv2) and the upstream MAE.

The official DINO (``utils.get_params_groups``), MAE (``util.misc.add_weight_decay``) and DINOv2 codes all
exempt biases and one-dimensional parameters (norm scales, layer scales) from weight decay; MAE and DINOv2
also exempt tokens and position embeddings. One rule serves them all here.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

NO_DECAY_NAMES = ("token", "pos_embed")


def decays(name: str, param: torch.Tensor, skip: Iterable[str] = NO_DECAY_NAMES) -> bool:
    """True when ``param`` gets weight decay: neither a bias, nor 1-D, nor named like one of ``skip``
    (a component of the dotted name ending with it, e.g. ``cls_token``, ``mask_token``, ``pos_embed``)."""
    if param.ndim <= 1 or name.endswith(".bias") or name == "bias":
        return False
    leaf = name.rsplit(".", 1)[-1]
    return not any(leaf.endswith(s) or f".{s}" in f".{name}" for s in skip)


def weight_decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], weight_decay: float,
                        skip: Iterable[str] = NO_DECAY_NAMES) -> list[dict]:
    """AdamW parameter groups: ``[{decayed, weight_decay}, {exempt, weight_decay 0, "no_decay": True}]``.

    Args:
        named_parameters: ``(name, parameter)`` pairs; frozen ones (``requires_grad`` False) are left out.
        weight_decay: the decay of the first group (schedules change it per step; see :func:`set_weight_decay`).
        skip: name endings that never decay (besides biases and 1-D parameters).
    Returns:
        Two groups (either may be empty); the exempt one carries ``"no_decay": True``.
    """
    decay, exempt = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (decay if decays(name, param, tuple(skip)) else exempt).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0, "no_decay": True}]


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Sets the decay of every group that is not marked ``no_decay`` (those stay at 0)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0 if group.get("no_decay") else weight_decay


CLIP_MODES = ("per_parameter", "global")


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, mode: str = "per_parameter") -> None:
    """Clips gradients in place.

    Args:
        params: the trained parameters (those without a gradient are skipped).
        max_norm: the largest norm allowed.
        mode: ``per_parameter``: each parameter's gradient on its own is scaled down to norm ``max_norm`` when
            larger (the official DINO's ``utils.clip_gradients``); ``global``: all gradients together, as one vector
            (``torch.nn.utils.clip_grad_norm_``: nnU-Net's and nnssl's clipping).
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"gradient clipping mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    params = [p for p in params if p.grad is not None]
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    for param in params:
        coef = max_norm / (param.grad.norm(2) + 1e-6)
        if bool(coef < 1):
            param.grad.mul_(coef)
