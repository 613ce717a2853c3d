"""LoRA for convolutions (Hu et al., 2022): W + (alpha/r) * B A, where A is a k x k conv C_in -> r (same stride and
padding as the adapted conv) and B a 1x1 conv r -> C_out initialised at zero. Mergeable."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.peft.modules import replace_submodule, wrap_convs
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class LoRAOptions:
    """Knobs of :class:`LoRAMethod`.

    Attributes:
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / rank.
        targets: attribute names of the convolutions to adapt.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("conv1", "conv2")

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise PeftError(f"lora: rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise PeftError("lora: targets must name at least one convolution (e.g. conv1)")


class _LoRAConv:
    """Mixin: a frozen conv plus its low-rank update; the conv's parameter names are unchanged."""

    lora_A: nn.Module
    lora_B: nn.Module
    scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        return out.add_(self.lora_B(self.lora_A(x)), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The dense weight update (alpha/r) * B A, shaped like ``weight``."""
        b = self.lora_B.weight.flatten(1)  # (out, r)
        a = self.lora_A.weight  # (r, in, *k)
        return (b @ a.flatten(1)).view_as(self.weight) * self.scaling

    def merged(self) -> nn.Module:
        """A plain conv of the base type with the update folded into its weight."""
        plain = self._base_type(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, groups=self.groups,
                                bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        with torch.no_grad():
            plain.weight = nn.Parameter(self.weight + self.delta_weight().to(self.weight.dtype),
                                        requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        return plain


class LoRAConv3d(_LoRAConv, nn.Conv3d):
    """A Conv3d with a LoRA update."""

    _base_type = nn.Conv3d


class LoRAConv2d(_LoRAConv, nn.Conv2d):
    """A Conv2d with a LoRA update."""

    _base_type = nn.Conv2d


@register
class LoRAMethod(PeftMethod):
    """Registry entry ``lora`` (convolutions; the ViT branch adds linear layers to the same entry)."""

    name = "lora"
    options = LoRAOptions
    mergeable = True
    adds_parameters = True
    description = "low-rank update of the convolution weights (mergeable)"

    def inject(self, model: nn.Module, opts: LoRAOptions) -> None:
        rank = int(opts.rank)

        def attach(new: nn.Module, conv: nn.Module) -> None:
            conv_type = type(conv)
            new.lora_A = conv_type(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, bias=False).to(conv.weight.device)
            new.lora_B = conv_type(rank, conv.out_channels, 1, bias=False).to(conv.weight.device)
            nn.init.kaiming_uniform_(new.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(new.lora_B.weight)
            new.scaling = float(opts.alpha) / rank

        wrap_convs(model, self.name, opts.targets, {nn.Conv3d: LoRAConv3d, nn.Conv2d: LoRAConv2d}, attach,
                   skip_grouped=True)

    def is_target(self, name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def merge(self, model: nn.Module, opts) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, _LoRAConv):
                replace_submodule(model, name, module.merged())
