"""LoRA (Hu et al., 2022): W + (alpha/r) * B A with B initialised at zero. Mergeable.

One registry entry for both families of layers:

* convolutions (STU-Net): A is a k x k conv C_in -> r (same stride and padding as the adapted conv), B a
  1x1 conv r -> C_out; targets are conv attribute names (``conv1``, ``conv2``);
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

from nnunet_tpp.peft.modules import module_like, name_matches, replace_submodule, wrap_convs
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

QKV_SLICES = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class LoRAOptions:
    """Knobs of :class:`LoRAMethod`.

    Attributes:
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / rank.
        targets: what to adapt: conv attribute names, ``q``/``k``/``v`` slices of ``qkv``, or linear layer
            names (a ViT task model defaults to ``("q", "v")``).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("conv1", "conv2")

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

        def attach(new: nn.Module, conv: nn.Module) -> None:
            conv_type = type(conv)
            new.lora_A = conv_type(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, bias=False).to(conv.weight.device)
            new.lora_B = conv_type(rank, conv.out_channels, 1, bias=False).to(conv.weight.device)
            nn.init.kaiming_uniform_(new.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(new.lora_B.weight)
            new.scaling = scaling

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
            if isinstance(module, (_LoRAConv, LoRALinear, LoRAQKV)):
                replace_submodule(model, name, module.merged())
