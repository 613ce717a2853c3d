"""Memory paths: a backward pass through frozen layers that keeps only what the trainable parameters need.

When the backbone is frozen (PEFT), backpropagation still has to pass gradients *through* it to reach the
adapters, but it never computes the frozen layers' weight gradients. Autograd does not know that in advance and
keeps what a weight gradient would need. Three levers, each exact (the trainable parameters get the gradients of
the plain path; tested), each on CPU and CUDA alike:

* **lean frozen convolutions**: a convolution whose weight and bias are frozen keeps no copy of its input (only
  the weight, which exists anyway); its backward computes the input gradient alone.
* **lean norm + activation**: an instance norm followed by a LeakyReLU (and, in a residual block, the residual sum
  between them) keeps only its output; the backward recovers the normalised values from it (in-place
  activated batch norm, Rota Bulo et al. 2018: LeakyReLU is invertible, the affine map is invertible wherever its
  scale is non-zero, and where it is zero the gradient does not depend on the lost value). It replaces keeping the
  norm's input *and* the activation's output.
* **activation checkpointing** of whole blocks (``off | on | auto``): a block keeps only its input and recomputes
  its forward pass during the backward pass (about one more forward pass of time for a fraction of the memory);
  ``auto`` turns it on when the estimated training peak does not fit the device (:mod:`nnunet_tpp.models.memory`).

Each lever is switched per module by replacing the module's class with a subclass (parameters, buffers, names and
state-dict keys unchanged) and decides at every call: it is used only while gradients are being recorded for an
input that needs them, with the module's own parameters frozen; otherwise the module runs its plain forward. A
model that predicts (no grad) therefore runs exactly the plain network.

The autograd functions and mixins themselves are in :mod:`nnunet_tpp.models.lean_autograd`; this module decides which
modules of a network get them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_tpp.models.lean_autograd import (FoldedAct, LeanConv, LeanNormAct, act_fusable, norm_fusable,
                                             residual_join, statistics_dtype)
from nnunet_tpp.models.sites import describe

__all__ = ["CHECKPOINTING", "MemoryPaths", "apply_memory_paths", "residual_join", "statistics_dtype"]

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """``mixin`` + ``base`` as one class, created once per pair (named after both)."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {})
    return _SUBCLASSES[key]


def _swap_class(module: nn.Module, mixin: type) -> bool:
    """Makes ``module`` an instance of ``mixin`` + its class (idempotent); returns True when it changed."""
    if isinstance(module, mixin):
        return False
    module.__class__ = _subclass(mixin, type(module))
    return True


# --- activation checkpointing ---------------------------------------------------------------------------------
class _Checkpointed:
    """Mixin for a block whose forward is recomputed during the backward pass instead of keeping its activations."""

    def forward(self, *args):
        if torch.is_grad_enabled() and (any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
                                        or any(p.requires_grad for p in self.parameters())):
            return checkpoint(super().forward, *args, use_reentrant=False)
        return super().forward(*args)


CHECKPOINTING = ("off", "on", "auto")


@dataclass(frozen=True)
class MemoryPaths:
    """Which memory paths a network uses.

    Attributes:
        lean_convs: frozen convolutions keep no input (default off: in STU-Net's and nnU-Net's blocks with an adapter
            every frozen conv's input is kept by something else anyway, so it saves nothing and its backward's
            placeholder costs ~5 % of a step on CPU; it pays in networks whose frozen convs feed nothing else).
        lean_norm_act: norm + LeakyReLU (+ residual sum) keep only their output (default on).
        activation_checkpointing: ``off`` (default), ``on``, or ``auto`` (resolved to on/off by
            :func:`nnunet_tpp.models.memory.resolve_checkpointing` before training).
    """

    lean_convs: bool = False
    lean_norm_act: bool = True
    activation_checkpointing: str = "off"

    def __post_init__(self):
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {self.activation_checkpointing!r}")

    @classmethod
    def from_settings(cls, memory: dict) -> "MemoryPaths":
        """The paths of a recipe's stored ``memory`` settings (``{"lean_backward", "activation_checkpointing"}``,
        the defaults where a key is missing)."""
        return cls(lean_norm_act=bool(memory.get("lean_backward", True)),
                   activation_checkpointing=memory.get("activation_checkpointing", "off"))

    def label(self) -> str:
        """A short description, e.g. ``lean norm/act, checkpointing off``."""
        levers = [n for n, on in (("lean convs", self.lean_convs), ("lean norm/act", self.lean_norm_act)) if on]
        return f"{' + '.join(levers) or 'plain'}, checkpointing {self.activation_checkpointing}"


def apply_memory_paths(model: nn.Module, paths: MemoryPaths) -> dict[str, int]:
    """Switches the memory paths of ``paths`` on in ``model`` (in place; call after the PEFT method is applied).

    Args:
        model: a network that describes itself (:func:`nnunet_tpp.models.sites.describe`).
        paths: the levers; ``activation_checkpointing="auto"`` must be resolved to ``on``/``off`` first.
    Returns:
        How many modules each lever changed: ``{"lean_convs", "lean_norm_act", "lean_residual",
        "checkpointed_blocks"}``.
    """
    if paths.activation_checkpointing == "auto":
        raise ValueError("resolve activation_checkpointing='auto' to 'on' or 'off' before applying it "
                         "(nnunet_tpp.models.memory.resolve_checkpointing)")
    sites = describe(model)
    counts = {"lean_convs": 0, "lean_norm_act": 0, "lean_residual": 0, "checkpointed_blocks": 0}
    if paths.lean_convs:
        for module in model.modules():
            if isinstance(module, (nn.Conv3d, nn.Conv2d)):
                counts["lean_convs"] += _swap_class(module, LeanConv)
    if paths.lean_norm_act:
        for site in sites.convs:
            if site.norm is None:
                continue
            norm = model.get_submodule(site.norm)
            if norm._forward_hooks:  # something joins after it (conv_adapter join=after_act): keep it a module call
                continue
            if site.act is not None:
                act = model.get_submodule(site.act)
                if norm_fusable(norm) and act_fusable(act) and _swap_class(norm, LeanNormAct):
                    norm.lean_slope = act.negative_slope
                    _swap_class(act, FoldedAct)
                    counts["lean_norm_act"] += 1
            elif site.role == "block" and norm_fusable(norm) and getattr(
                    model.get_submodule(site.block), "lean_residual_join", False):
                norm.lean_residual = True
                counts["lean_residual"] += 1
    if paths.activation_checkpointing == "on":
        for name in sites.blocks:
            counts["checkpointed_blocks"] += _swap_class(model.get_submodule(name), _Checkpointed)
    model.memory_paths = paths
    return counts
