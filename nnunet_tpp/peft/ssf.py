"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features"): a learnable per-channel scale
gamma and shift beta, ``y = gamma * x + beta``, after the outputs of a ViT's operations.

As in the official code (dongzelian/SSF, ``models/vision_transformer.py``, ``tuning_mode == 'ssf'``), the
scale and shift follow the patch-embedding projection, every block's ``norm1``, ``attn.qkv`` (3 D
channels), ``attn.proj``, ``norm2``, ``mlp.fc1`` (hidden channels), ``mlp.fc2`` and the final ``norm``
(also ``norm_pre`` when the ViT has one). Initialisation: gamma ~ N(1, 0.02), beta ~ N(0, 0.02).

Mergeable: a scale and shift after a linear map fold into it, ``W' = diag(gamma) W``, ``b' = gamma b + beta``
(LayerNorm affine parameters and the patch-embedding conv the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.peft.modules import find_vits, module_like, replace_submodule
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class SSFOptions:
    """Knobs of :class:`SSFMethod`.

    Attributes:
        init_std: standard deviation of the initial scale (around 1) and shift (around 0).
    """

    init_std: float = 0.02

    def validate(self) -> None:
        """Raises :class:`PeftError` for a negative standard deviation."""
        if float(self.init_std) < 0:
            raise PeftError(f"ssf: init_std must be >= 0, got {self.init_std}")


class _SSF:
    """Mixin: the wrapped layer's output times ``ssf_scale`` plus ``ssf_shift`` (per output channel)."""

    ssf_scale: nn.Parameter
    ssf_shift: nn.Parameter
    _channel_dim = -1

    def _affine(self, out: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (out.ndim - 2) if self._channel_dim == 1 else (-1,)
        return out * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)

    def add_ssf(self, channels: int, std: float) -> None:
        """Creates the scale and shift of ``channels`` channels on the layer's device and dtype."""
        like = self.weight
        self.ssf_scale = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        self.ssf_shift = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=std)
        nn.init.normal_(self.ssf_shift, mean=0.0, std=std)

    def merged(self) -> nn.Module:
        """The plain layer with the scale folded into its weight and scale and shift into its bias."""
        plain = module_like(self, self._base_type)
        s, t = self.ssf_scale, self.ssf_shift
        with torch.no_grad():
            shape = (-1,) + (1,) * (self.weight.ndim - 1)
            plain.weight = nn.Parameter(self.weight * s.view(shape), requires_grad=self.weight.requires_grad)
            bias = t if self.bias is None else self.bias * s + t
            grad = (self.bias if self.bias is not None else self.weight).requires_grad
            plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=grad)
        return plain


class SSFLinear(_SSF, nn.Linear):
    """An ``nn.Linear`` followed by SSF."""

    _base_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return self._affine(F.linear(x, self.weight, self.bias))


class SSFLayerNorm(_SSF, nn.LayerNorm):
    """An ``nn.LayerNorm`` followed by SSF."""

    _base_type = nn.LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self._affine(nn.LayerNorm.forward(self, x))


class SSFConv2d(_SSF, nn.Conv2d):
    """An ``nn.Conv2d`` (the patch embedding) followed by SSF over its output channels."""

    _base_type = nn.Conv2d
    _channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H', W')."""
        return self._affine(self._conv_forward(x, self.weight, self.bias))


_WRAPPERS = {nn.Linear: SSFLinear, nn.LayerNorm: SSFLayerNorm, nn.Conv2d: SSFConv2d}


@register
class SSFMethod(PeftMethod):
    """Registry entry ``ssf``."""

    name = "ssf"
    models = ("ViT",)
    options = SSFOptions
    mergeable = True
    adds_parameters = True
    description = "scale and shift after every ViT linear layer, norm and patch embedding (mergeable)"

    def inject(self, model: nn.Module, opts: SSFOptions) -> None:
        """Wraps the ViT's linear layers, LayerNorms and patch-embedding conv."""
        for _, vit in find_vits(model, self.name):
            for name, module in list(vit.named_modules()):
                wrapper = _WRAPPERS.get(type(module))
                if wrapper is None or (wrapper is SSFConv2d and name != "patch_embed.proj"):
                    continue
                if wrapper is SSFLayerNorm and not module.elementwise_affine:
                    raise PeftError(f"ssf: {name} is a LayerNorm without affine parameters; SSF could not be "
                                    f"merged into it")
                new = module_like(module, wrapper)
                channels = module.weight.shape[0]
                new.add_ssf(channels, float(opts.init_std))
                replace_submodule(vit, name, new)

    def is_target(self, name: str) -> bool:
        """The scales and shifts."""
        return name.endswith(".ssf_scale") or name.endswith(".ssf_shift")

    def merge(self, model: nn.Module, opts) -> None:
        """Folds every scale and shift into the layer before it."""
        for name, module in list(model.named_modules()):
            if isinstance(module, _SSF):
                replace_submodule(model, name, module.merged())
