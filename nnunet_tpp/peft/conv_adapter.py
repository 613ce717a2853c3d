"""Conv-Adapter (Chen et al., 2024), as its official code (Hhhhhhao/Conv-Adapter) builds it by default.

The adapter is a bottleneck beside a k x k convolution of a block: a grouped k x k convolution C_in -> C_in/gamma
(groups C_in/gamma, the adapted convolution's stride), ReLU, a 1x1 convolution -> C_out, times a learnable
per-channel scale initialised to 1. The official ResNet code puts **one** adapter in each residual block, in
parallel with the block's first k x k convolution (BasicBlock: ``conv1``, its output summed with the conv's
before the block's norm; Bottleneck: the 3x3 ``conv2``, summed after its norm and activation), and initialises
the adapter like every other convolution of the network (Kaiming normal, fan_out, zero biases), so the adapted
network does not start as the pre-trained one. The backbone is frozen; the adapters and the task heads train.

The blocks come from the model's own description (:mod:`nnunet_tpp.models.sites`), so the method works on STU-Net
and on nnU-Net's networks without naming their attributes. Options (defaults = the official code):

* ``targets``: ``("first",)`` one adapter per block beside its first k x k convolution; ``("all",)`` beside every
  k x k convolution of each block (this package's earlier default, with ``init: zero``); ``upsample``; or
  attribute names (``conv1``, ``conv2``, the shortcut ``conv3``).
* ``init``: ``kaiming`` (official) or ``zero`` (the 1x1 convolution starts at zero, so training starts from exactly
  the pre-trained network, as LoRA does).
* ``join``: ``before_norm`` (official BasicBlock: added to the convolution's output, before its norm) or
  ``after_act`` (official Bottleneck: added after the convolution's norm and activation; after the norm alone when
  the residual sum comes before the activation).

One departure, forced by the rule that no parameter may be unable to learn: when the adapter joins before a norm
that normalises each channel on its own (instance norm, batch norm, a group norm with one channel per group), the
1x1 convolution has no bias: the norm removes any per-channel constant, so that bias would get an exactly zero
gradient (the official code keeps it, dead). Nothing else changes: the function computed is the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.models.sites import cancels_channel_bias, replace_module
from nnunet_tpp.peft.modules import conv_like, select_sites
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

INITS = ("kaiming", "zero")
JOINS = ("before_norm", "after_act")


@dataclass(frozen=True)
class ConvAdapterOptions:
    """Knobs of :class:`ConvAdapterMethod` (defaults: the official code).

    Attributes:
        reduction: gamma, the channel reduction of the bottleneck (width = C_in / gamma).
        kernel_size: kernel of the grouped convolution (odd).
        targets: ``first`` (each block's first k x k conv), ``all`` (every k x k conv of a block) or conv
            attribute names such as ``conv1``.
        init: ``kaiming`` (Kaiming normal, fan_out, zero biases) or ``zero`` (the 1x1 conv starts at zero).
        join: ``before_norm`` or ``after_act`` (see the module docstring).
    """

    reduction: int = 8
    kernel_size: int = 3
    targets: tuple[str, ...] = ("first",)
    init: str = "kaiming"
    join: str = "before_norm"

    def validate(self) -> None:
        """Raises :class:`PeftError` for an impossible value, naming the option."""
        if isinstance(self.reduction, bool) or int(self.reduction) != self.reduction or int(self.reduction) < 1:
            raise PeftError(f"conv_adapter: reduction must be an integer >= 1, got {self.reduction!r}")
        if int(self.kernel_size) < 1 or int(self.kernel_size) % 2 == 0:
            raise PeftError(f"conv_adapter: kernel_size must be a positive odd number, got {self.kernel_size}")
        if not self.targets:
            raise PeftError("conv_adapter: targets must name at least one position (first, all) or convolution")
        if self.init not in INITS:
            raise PeftError(f"conv_adapter: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.join not in JOINS:
            raise PeftError(f"conv_adapter: join must be one of {', '.join(JOINS)}, got {self.join!r}")


class ConvAdapter(nn.Module):
    """The adapter branch: ``scale * up(relu(down(x)))``, shaped like the adapted convolution's output.

    Args:
        in_channels, out_channels: those of the adapted convolution.
        reduction: gamma; the hidden width is the largest divisor of ``in_channels`` not above C_in / gamma.
        kernel_size, stride: of the grouped convolution (the adapted conv's stride).
        ndim: 2 or 3.
        init: ``kaiming`` or ``zero``.
        up_bias: whether the 1x1 convolution has a bias (False where the following norm would cancel it).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int, kernel_size: int, stride,
                 ndim: int, init: str = "kaiming", up_bias: bool = True):
        super().__init__()
        width = max(1, in_channels // reduction)
        while in_channels % width:
            width -= 1
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.down = conv(in_channels, width, kernel_size, stride=stride, padding=kernel_size // 2, groups=width)
        self.up = conv(width, out_channels, 1, bias=up_bias)
        self.scale = nn.Parameter(torch.ones(out_channels))
        for layer in (self.down, self.up):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.down(x))
        # (W h + b) * s == (s W) h + s b: scaling the weights instead of the output keeps autograd from storing a
        # full-resolution activation for the scale's gradient
        shape = (-1,) + (1,) * (self.up.weight.dim() - 1)
        bias = self.up.bias * self.scale if self.up.bias is not None else None
        conv = F.conv3d if self.up.weight.dim() == 5 else F.conv2d
        return conv(hidden, self.up.weight * self.scale.view(shape), bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # files of nnunet_tpp 0.1 hold a 1x1 bias that the following norm cancelled exactly: dropping it loads the
        # same function
        legacy = prefix + "up.bias"
        if self.up.bias is None and legacy in state_dict:
            state_dict.pop(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _Pending:
    """Holds an adapter output between the adapted convolution and the module it joins after."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class _AdaptedConv:
    """Mixin: the frozen convolution plus its adapter; the conv's parameter names are unchanged."""

    adapter: ConvAdapter
    pending: _Pending | None = None  # set when the adapter joins after the norm/activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        if self.pending is not None:
            self.pending.value = self.adapter(x)
            return out
        # the conv's own backward does not need its output, so adding in place is safe and saves a buffer
        return out.add_(self.adapter(x))


class ConvAdapterConv3d(_AdaptedConv, nn.Conv3d):
    """A Conv3d with a Conv-Adapter in parallel."""


class ConvAdapterConv2d(_AdaptedConv, nn.Conv2d):
    """A Conv2d with a Conv-Adapter in parallel."""


class _JoinAfter:
    """Forward hook of the module an adapter joins after: adds the adapter output its conv left pending."""

    def __init__(self, pending: _Pending):
        self.pending = pending

    def __call__(self, module, inputs, output):
        value, self.pending.value = self.pending.value, None
        return output if value is None else output + value


@register
class ConvAdapterMethod(PeftMethod):
    """Registry entry ``conv_adapter``."""

    name = "conv_adapter"
    models = ("STUNet", "nnU-Net CNNs")
    options = ConvAdapterOptions
    mergeable = False
    adds_parameters = True
    description = "Conv-Adapter: one bottleneck per block beside its first k x k convolution (official)"

    def upgrade_options(self, options: dict) -> dict:
        """Options stored by nnunet_tpp 0.1 (``zero_init``; two adapters per block) in today's terms."""
        if "zero_init" not in options:
            return options
        old = dict(options)
        zero = bool(old.pop("zero_init"))
        old.setdefault("targets", ("conv1", "conv2"))
        return {**old, "init": "zero" if zero else "kaiming", "join": "before_norm"}

    def inject(self, model: nn.Module, opts: ConvAdapterOptions) -> None:
        """Wraps each chosen convolution with an adapter (see the module docstring)."""
        for site in select_sites(model, tuple(opts.targets), self.name):
            conv = model.get_submodule(site.name)
            if type(conv) not in (nn.Conv3d, nn.Conv2d):
                raise PeftError(f"conv_adapter: {site.name} is a {type(conv).__name__}, not a plain convolution "
                                f"(another method already wraps it?)")
            norm = model.get_submodule(site.norm) if site.norm else None
            join_after = opts.join == "after_act" and norm is not None
            new = conv_like(conv, ConvAdapterConv3d if conv.weight.dim() == 5 else ConvAdapterConv2d)
            up_bias = join_after or not cancels_channel_bias(norm)
            new.adapter = ConvAdapter(conv.in_channels, conv.out_channels, int(opts.reduction), int(opts.kernel_size),
                                      conv.stride, conv.weight.dim() - 2, opts.init, up_bias).to(conv.weight.device, conv.weight.dtype)
            if join_after:
                new.pending = _Pending()
                model.get_submodule(site.act or site.norm).register_forward_hook(_JoinAfter(new.pending))
            replace_module(model, site.name, new)

    def is_target(self, name: str) -> bool:
        """The adapter parameters (``...adapter.down``, ``.up``, ``.scale``)."""
        return ".adapter." in name

    def legacy_key(self, name: str) -> bool:
        """Keys of 0.1 files that today's structure leaves out on purpose (a bias cancelled by the norm)."""
        return name.endswith(".adapter.up.bias")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the ReLU makes the adapter non-linear."""
        raise PeftError("conv_adapter cannot be merged: the ReLU inside the adapter makes it non-linear, so it "
                        "has no equivalent plain convolution. Run it unmerged (its cost is small), or use 'lora' "
                        "when a merged network is required.")
