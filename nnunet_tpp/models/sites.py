"""Where PEFT methods and memory paths may attach to a convolutional network: its blocks and convolutions.

A CNN describes itself once, as data (:class:`NetworkSites`): every convolution with its role (a k x k
convolution inside a block, a block's shortcut, an upsampling layer, a segmentation head), the block it belongs
to, the normalisation and nonlinearity that follow it, and the blocks that can be recomputed (activation
checkpointing). PEFT methods (``conv_adapter``, ``lora``, ``bitfit``) and the memory paths select from this
description, so they never name one backbone's attributes, and a new architecture needs one small describer.

A model provides its description through a ``peft_sites()`` method (STU-Net) or through a describer function for
its class: nnU-Net's own networks, which are not ours to edit, have theirs in
:data:`nnunet_tpp.models.nnunet_networks.NNUNET_DESCRIBERS`; others are added with :func:`register_describer`. The
description's data types are in :mod:`nnunet_tpp.models.site_types` (re-exported here).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from nnunet_tpp.models.nnunet_networks import NNUNET_DESCRIBERS
from nnunet_tpp.models.site_types import BLOCK, HEAD, ROLES, SHORTCUT, UPSAMPLE, ConvSite, NetworkSites

__all__ = ["BLOCK", "HEAD", "ROLES", "SHORTCUT", "UPSAMPLE", "ConvSite", "NetworkSites", "NoDescriptionError",
           "cancelled_biases", "cancels_channel_bias", "describe", "encoder_channels", "encoder_outputs",
           "parent_and_attr", "register_describer", "replace_module"]

_DESCRIBERS: dict[type, Callable[[nn.Module], NetworkSites]] = dict(NNUNET_DESCRIBERS)


def register_describer(cls: type) -> Callable:
    """Decorator for a network class we cannot give a ``peft_sites()`` method: ``@register_describer(SomeUNet)``
    over ``fn(model) -> NetworkSites`` makes :func:`describe` use ``fn`` for ``SomeUNet`` and its subclasses.

    Returns:
        The decorator, which returns ``fn`` unchanged.
    """
    def wrap(fn: Callable[[nn.Module], NetworkSites]) -> Callable[[nn.Module], NetworkSites]:
        _DESCRIBERS[cls] = fn
        return fn
    return wrap


class NoDescriptionError(TypeError):
    """The model does not say where convolutional PEFT methods may attach."""


def describe(model: nn.Module) -> NetworkSites:
    """The :class:`NetworkSites` of ``model`` (from its ``peft_sites()`` or a registered describer).

    Raises:
        NoDescriptionError: neither exists for the model's class.
    """
    own = getattr(model, "peft_sites", None)
    if callable(own):
        return own()
    for cls in type(model).__mro__:
        if cls in _DESCRIBERS:
            return _DESCRIBERS[cls](model)
    raise NoDescriptionError(
        f"{type(model).__name__} does not describe its blocks and convolutions, so convolutional PEFT methods "
        f"cannot attach to it; give it a peft_sites() method or register a describer "
        f"(nnunet_tpp.models.sites.register_describer)")


def encoder_outputs(model: nn.Module, x):
    """The outputs of every encoder stage of ``model`` for input ``x``, highest resolution first: ``model.encode``
    (STU-Net) or ``model.encoder`` returning its skips (nnU-Net's U-Nets)."""
    if callable(getattr(model, "encode", None)):
        return list(model.encode(x))
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module):
        out = encoder(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    raise NoDescriptionError(f"{type(model).__name__} has neither encode() nor an encoder module")


def encoder_channels(model: nn.Module) -> list[int]:
    """The channel count of each encoder stage's output (the same order as :func:`encoder_outputs`)."""
    if hasattr(model, "encoder_channels"):
        return list(model.encoder_channels)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "output_channels"):
        return list(encoder.output_channels)
    raise NoDescriptionError(f"{type(model).__name__} does not tell its encoder's channel counts")


def cancels_channel_bias(norm: nn.Module | None) -> bool:
    """True for norms that remove each channel's own mean (instance norm, batch norm, a group norm with one channel
    per group): a per-channel constant added before them has no effect, and a bias that adds it no gradient."""
    if norm is None:
        return False
    if isinstance(norm, (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels


def cancelled_biases(model: nn.Module) -> list[str]:
    """Names of the convolution biases of ``model`` that the norm right after them cancels (they cannot learn)."""
    names = []
    for site in describe(model).convs:
        conv = model.get_submodule(site.name)
        if getattr(conv, "bias", None) is not None and site.norm and cancels_channel_bias(
                model.get_submodule(site.norm)):
            names.append(f"{site.name}.bias")
    return names


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name`` and the attribute name it is held under."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule at ``name`` by ``new`` everywhere it is referenced in ``model``.

    nnU-Net's blocks hold each layer twice (``conv`` and ``all_modules.0``), so replacing one attribute alone
    would leave the forward pass on the old layer.
    """
    old = model.get_submodule(name)
    for module in list(model.modules()):
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new
