"""Conv-Adapter (Chen et al., 2024): a bottleneck of a grouped k x k conv (C_in -> C_in/gamma, groups C_in/gamma),
ReLU and a 1x1 conv (-> C_out), times a learnable per-channel scale, run in parallel with a convolution.

The adapter sits beside each chosen convolution (by default ``conv1`` and ``conv2`` of every STU-Net
residual block, encoder and decoder) and uses the same stride, so its output adds to the conv's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.peft.modules import wrap_convs
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class ConvAdapterOptions:
    """Knobs of :class:`ConvAdapterMethod`.

    Attributes:
        reduction: gamma, the channel reduction of the bottleneck (width = C_in / gamma).
        kernel_size: kernel of the grouped convolution (odd).
        targets: attribute names of the convolutions that get an adapter.
        zero_init: start the 1x1 conv at zero so the adapted network equals the pre-trained one.
    """

    reduction: int = 8
    kernel_size: int = 3
    targets: tuple[str, ...] = ("conv1", "conv2")
    zero_init: bool = True

    def validate(self) -> None:
        if int(self.reduction) < 1:
            raise PeftError(f"conv_adapter: reduction must be >= 1, got {self.reduction}")
        if int(self.kernel_size) < 1 or int(self.kernel_size) % 2 == 0:
            raise PeftError(f"conv_adapter: kernel_size must be a positive odd number, got {self.kernel_size}")
        if not self.targets:
            raise PeftError("conv_adapter: targets must name at least one convolution (e.g. conv1)")


class ConvAdapter(nn.Module):
    """The adapter branch. ``forward(x)`` returns a tensor shaped like the adapted conv's output."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int, kernel_size: int, stride,
                 ndim: int, zero_init: bool = True):
        super().__init__()
        width = max(1, in_channels // reduction)
        while in_channels % width:
            width -= 1
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.down = conv(in_channels, width, kernel_size, stride=stride, padding=kernel_size // 2, groups=width)
        self.up = conv(width, out_channels, 1)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self._conv = F.conv3d if ndim == 3 else F.conv2d
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.down(x))
        # (W h + b) * s == (s W) h + s b: scaling the weights instead of the output keeps autograd from
        # storing a full-resolution activation for the scale's gradient.
        shape = (-1,) + (1,) * (self.up.weight.dim() - 1)
        return self._conv(hidden, self.up.weight * self.scale.view(shape), self.up.bias * self.scale)


class _AdaptedConv:
    """Mixin: the frozen convolution plus its adapter; parameter names of the conv are unchanged."""

    adapter: ConvAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        # the conv's own backward does not need its output, so adding in place is safe and saves a buffer
        return out.add_(self.adapter(x))


class ConvAdapterConv3d(_AdaptedConv, nn.Conv3d):
    """A Conv3d with a Conv-Adapter in parallel."""


class ConvAdapterConv2d(_AdaptedConv, nn.Conv2d):
    """A Conv2d with a Conv-Adapter in parallel."""


@register
class ConvAdapterMethod(PeftMethod):
    """Registry entry ``conv_adapter``."""

    name = "conv_adapter"
    models = ("STUNet",)
    options = ConvAdapterOptions
    mergeable = False
    adds_parameters = True
    description = "Conv-Adapter beside the residual blocks' convolutions"

    def inject(self, model: nn.Module, opts: ConvAdapterOptions) -> None:
        def attach(new: nn.Module, conv: nn.Module) -> None:
            new.adapter = ConvAdapter(conv.in_channels, conv.out_channels, int(opts.reduction), int(opts.kernel_size),
                                      conv.stride, conv.weight.dim() - 2, opts.zero_init).to(conv.weight.device)

        wrap_convs(model, self.name, opts.targets, {nn.Conv3d: ConvAdapterConv3d, nn.Conv2d: ConvAdapterConv2d},
                   attach)

    def is_target(self, name: str) -> bool:
        return ".adapter." in name

    def merge(self, model: nn.Module, opts) -> None:
        raise PeftError("conv_adapter cannot be merged: the ReLU inside the adapter makes it non-linear, so it "
                        "has no equivalent plain convolution. Run it unmerged (its cost is small), or use 'lora' "
                        "when a merged network is required.")
