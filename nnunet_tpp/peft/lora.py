"""LoRA (Hu et al., 2022): W + (alpha/r) * B A with B initialised at zero. Mergeable.

One registry entry for both families of layers:

* convolutions of a CNN that describes its blocks (STU-Net, nnU-Net's networks; :mod:`nnunet_tpp.models.sites`):
  A is a k x k conv C_in -> r (same stride and padding as the adapted conv), B a 1x1 conv r -> C_out; for a
  transposed convolution (nnU-Net's decoder upsampling) A is a transposed conv C_in -> r with the same kernel and
  stride. Targets: ``all`` (default: every k x k convolution of every block, encoder and decoder), ``first``,
  ``upsample`` (the decoder's upsampling convolutions, transposed or not) or attribute names (``conv1``);
* linear layers (ViT): A is r x in, B out x r. Targets ``q``, ``k``, ``v`` adapt those slices of the fused
  ``attn.qkv`` projection (one LoRA per chosen slice, added only to that slice's output, as the official
  loralib ``MergedLinear`` with ``enable_lora``); other names (``qkv``, ``proj``, ``fc1``, ``fc2``,
  ``attn.proj``) adapt whole ``nn.Linear`` layers. A ViT's patch embedding conv is adapted only when named
  as ``patch_embed.proj``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.models.sites import replace_module
from nnunet_tpp.peft.modules import (CNN_POSITIONS, conv_like, describes_itself, module_like, name_matches,
                                     replace_submodule, select_sites, wrap_convs)
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

QKV_SLICES = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class LoRAOptions:
    """Knobs of :class:`LoRAMethod`.

    Attributes:
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / rank.
        targets: what to adapt: on a CNN ``all`` / ``first`` / ``upsample`` or conv attribute names; on a ViT
            ``q``/``k``/``v`` slices of ``qkv`` or linear layer names (a ViT task model defaults to ``("q", "v")``).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("all",)

    def validate(self) -> None:
        """Raises :class:`PeftError` for a rank below 1 or no targets."""
        if int(self.rank) < 1:
            raise PeftError(f"lora: rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise PeftError("lora: targets must name at least one layer (e.g. conv1, or q and v on a ViT)")
        if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
            raise PeftError("lora: give either 'qkv' (the whole projection) or its slices q/k/v, not both")


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
        return _folded(self, self._base_type, self.delta_weight())


class LoRAConv3d(_LoRAConv, nn.Conv3d):
    """A Conv3d with a LoRA update."""

    _base_type = nn.Conv3d


class LoRAConv2d(_LoRAConv, nn.Conv2d):
    """A Conv2d with a LoRA update."""

    _base_type = nn.Conv2d


class LoRAConvTranspose3d(nn.ConvTranspose3d):
    """A ConvTranspose3d with a LoRA update (A: transposed conv C_in -> r, same kernel and stride; B: 1x1 conv)."""

    lora_A: nn.ConvTranspose3d
    lora_B: nn.Conv3d
    scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                 self.groups, self.dilation)
        return out.add_(self.lora_B(self.lora_A(x)), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r) * A B, shaped like ``weight`` (C_in, C_out, *k)."""
        a = self.lora_A.weight  # (in, r, *k)
        b = self.lora_B.weight.flatten(1)  # (out, r)
        return torch.einsum("ir...,or->io...", a, b) * self.scaling

    def merged(self) -> nn.ConvTranspose3d:
        """A plain ConvTranspose3d with the update folded into its weight."""
        plain = nn.ConvTranspose3d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                   self.output_padding, self.groups, self.bias is not None, self.dilation,
                                   device="meta")
        plain.bias = self.bias
        with torch.no_grad():
            plain.weight = nn.Parameter(self.weight + self.delta_weight().to(self.weight.dtype),
                                        requires_grad=self.weight.requires_grad)
        return plain


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus ``lora_B(lora_A(x)) * scaling``; the Linear's parameter names are unchanged."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight, self.bias).add_(self.lora_B(self.lora_A(x)), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r) * B A, shaped like ``weight``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        return _folded(self, nn.Linear, self.delta_weight())


class LoRAQKV(nn.Linear):
    """The fused qkv projection (out = 3 D) with one LoRA per chosen slice: ``lora_A[s]`` D -> r and
    ``lora_B[s]`` r -> D, added to rows ``[i D, (i+1) D)`` of the output for slice s = q (0), k (1), v (2)."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 3 D)."""
        out = F.linear(x, self.weight, self.bias)
        d = self.out_features // 3
        for key, down in self.lora_A.items():
            i = QKV_SLICES[key]
            out[..., i * d:(i + 1) * d].add_(self.lora_B[key](down(x)), alpha=self.scaling)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The dense update of the fused weight: zero except the chosen slices' rows."""
        delta = torch.zeros_like(self.weight)
        d = self.out_features // 3
        for key, down in self.lora_A.items():
            i = QKV_SLICES[key]
            delta[i * d:(i + 1) * d] = (self.lora_B[key].weight @ down.weight) * self.scaling
        return delta

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the slice updates folded into its weight."""
        return _folded(self, nn.Linear, self.delta_weight())


def _folded(module: nn.Module, base: type, delta: torch.Tensor) -> nn.Module:
    plain = module_like(module, base)
    with torch.no_grad():
        plain.weight = nn.Parameter(module.weight + delta.to(module.weight.dtype),
                                    requires_grad=module.weight.requires_grad)
    return plain


def _low_rank(in_features: int, out_features: int, rank: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    down = nn.Linear(in_features, rank, bias=False, device=like.device, dtype=like.dtype)
    up = nn.Linear(rank, out_features, bias=False, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    return down, up


def _attach_conv_factors(new: nn.Module, conv: nn.Module, rank: int, scaling: float) -> None:
    """Gives a wrapped conv its factors: A like the conv (C_in -> r, Kaiming-uniform), B a 1x1 conv (zero)."""
    conv_type = type(conv)
    extra = {"output_padding": conv.output_padding} if isinstance(conv, nn.ConvTranspose3d) else {}
    new.lora_A = conv_type(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, bias=False, **extra).to(conv.weight.device, conv.weight.dtype)
    new.lora_B = (nn.Conv3d if conv.weight.dim() == 5 else nn.Conv2d)(rank, conv.out_channels, 1, bias=False).to(
        conv.weight.device, conv.weight.dtype)
    nn.init.kaiming_uniform_(new.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(new.lora_B.weight)
    new.scaling = scaling


def _lora_conv(conv: nn.Module, rank: int, scaling: float) -> nn.Module:
    """The LoRA wrapper of a CNN site's convolution (same parameters and names as ``conv``)."""
    if type(conv) is nn.ConvTranspose3d:
        new = LoRAConvTranspose3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.output_padding, conv.groups, conv.bias is not None, conv.dilation,
                                  device="meta")
        new.weight, new.bias = conv.weight, conv.bias
    elif type(conv) in (nn.Conv3d, nn.Conv2d) and conv.groups == 1:
        new = conv_like(conv, LoRAConv3d if conv.weight.dim() == 5 else LoRAConv2d)
    else:
        raise PeftError(f"lora: cannot adapt a {type(conv).__name__} (groups {getattr(conv, 'groups', '?')})")
    _attach_conv_factors(new, conv, rank, scaling)
    return new


def _wrap_linears(model: nn.Module, targets: tuple[str, ...], rank: int, scaling: float) -> int:
    slices = [t for t in targets if t in QKV_SLICES]
    names = [t for t in targets if t not in QKV_SLICES]
    found = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if slices and name_matches(name, "qkv") and module.out_features == 3 * module.in_features:
            new = module_like(module, LoRAQKV)
            pairs = {s: _low_rank(module.in_features, module.in_features, rank, module.weight) for s in slices}
            new.lora_A = nn.ModuleDict({s: p[0] for s, p in pairs.items()})
            new.lora_B = nn.ModuleDict({s: p[1] for s, p in pairs.items()})
        elif any(name_matches(name, t) for t in names):
            new = module_like(module, LoRALinear)
            new.lora_A, new.lora_B = _low_rank(module.in_features, module.out_features, rank, module.weight)
        else:
            continue
        new.scaling = scaling
        replace_submodule(model, name, new)
        found += 1
    if slices and not any(isinstance(m, LoRAQKV) for m in model.modules()):
        raise PeftError(f"lora: targets {slices} are slices of a fused attention projection 'qkv' "
                        f"(Vision Transformer), and {type(model).__name__} has none")
    return found


@register
class LoRAMethod(PeftMethod):
    """Registry entry ``lora``: convolutions (STU-Net) and linear layers / q, k, v slices (ViT)."""

    name = "lora"
    options = LoRAOptions
    mergeable = True
    adds_parameters = True
    description = "low-rank update of convolution / linear weights (mergeable)"

    def inject(self, model: nn.Module, opts: LoRAOptions) -> None:
        """Wraps every targeted conv / linear layer with its LoRA update."""
        rank, targets = int(opts.rank), tuple(opts.targets)
        scaling = float(opts.alpha) / rank
        if describes_itself(model):
            vit_only = sorted(set(targets) & (set(QKV_SLICES) | {"qkv", "proj", "fc1", "fc2"}))
            if vit_only:
                raise PeftError(f"lora: targets {vit_only} are layers of a Vision Transformer (q/k/v are slices of "
                                f"a fused attention projection 'qkv'); {type(model).__name__} is a CNN: use "
                                f"{', '.join(CNN_POSITIONS)} or convolution names")
            for site in select_sites(model, targets, self.name):
                replace_module(model, site.name, _lora_conv(model.get_submodule(site.name), rank, scaling))
            return
        if set(targets) & set(CNN_POSITIONS):
            raise PeftError(f"lora: targets {sorted(set(targets) & set(CNN_POSITIONS))} select the blocks of a CNN "
                            f"that describes itself (STU-Net, nnU-Net networks); {type(model).__name__} does not. "
                            f"On a Vision Transformer use q, k, v, qkv, proj, fc1 or fc2")

        def attach(new: nn.Module, conv: nn.Module) -> None:
            _attach_conv_factors(new, conv, rank, scaling)

        # a bare "proj" means the attention output projection, not a ViT's patch embedding
        def exclude(name: str) -> bool:
            return name_matches(name, "patch_embed.proj") and not any(
                "." in t and name_matches(name, t) for t in targets)

        found = _wrap_linears(model, targets, rank, scaling)
        found += wrap_convs(model, self.name, targets, {nn.Conv3d: LoRAConv3d, nn.Conv2d: LoRAConv2d}, attach,
                            skip_grouped=True, required=False, exclude=exclude)
        if not found:
            raise PeftError(f"{self.name}: no convolution named {list(targets)} in {type(model).__name__}, nor a "
                            f"linear layer of that name (ViT targets: q, k, v, qkv, proj, fc1, fc2)")

    def is_target(self, name: str) -> bool:
        """The low-rank factors ``lora_A`` / ``lora_B``."""
        return ".lora_A." in name or ".lora_B." in name

    def merge(self, model: nn.Module, opts) -> None:
        """Replaces every LoRA layer by a plain layer with the update folded into its weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, (_LoRAConv, LoRAConvTranspose3d, LoRALinear, LoRAQKV)):
                replace_module(model, name, module.merged())
