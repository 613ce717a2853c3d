"""SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features"): a learnable per-channel scale
gamma and shift beta, ``y = gamma * x + beta``, after the outputs of a ViT's operations.

As in the official code (dongzelian/SSF, ``models/vision_transformer.py``, ``tuning_mode == 'ssf'``), the
scale and shift follow the patch embedding, every block's ``norm1``, ``attn.qkv`` (3 D channels), ``attn.proj``,
``norm2``, ``mlp.fc1`` (hidden channels), ``mlp.fc2`` and the final ``norm`` (also ``norm_pre`` when the ViT has
one): on any described transformer, the places its description names (the patch embedding's last layer, every
block's norms, q/k/v, output projection and MLP projections, the outer norms). Initialisation: gamma ~ N(1, 0.02),
beta ~ N(0, 0.02). Each adapted layer keeps its class, parameters and names and gains ``ssf_scale`` / ``ssf_shift``
(its class becomes a subclass whose forward scales and shifts the output of the original forward).

Mergeable: a scale and shift after a linear map fold into it, ``W' = diag(gamma) W``, ``b' = gamma b + beta``
(norm affine parameters and convolutions the same way). A place that is no single layer (PrimusV3's patch
embedding: its conv stem's output is a sum of four convolutions) gets the scale and shift on the module's output all
the same; such a model cannot merge (:meth:`SSFMethod.merge` says so before folding anything).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.peft.modules import restore_class, swap_class, transformers
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
    """Mixin: the layer's own output times ``ssf_scale`` plus ``ssf_shift`` along its channel dimension."""

    ssf_scale: nn.Parameter
    ssf_shift: nn.Parameter
    ssf_channel_dim: int

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        shape = [1] * out.ndim
        shape[self.ssf_channel_dim] = -1
        return out * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)


def add_ssf(module: nn.Module, std: float, channels: int | None = None) -> None:
    """Gives ``module`` (a linear layer, a norm or a convolution with a per-channel weight; or, with ``channels``,
    any module whose output has those channels in dimension 1, which then cannot fold) its scale and shift."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        if channels is None:
            raise PeftError(f"ssf: a {type(module).__name__} without an affine weight cannot carry a foldable scale "
                            f"and shift")
        weight = next(module.parameters())
    else:
        channels = weight.shape[0]
    swap_class(module, _SSF)
    module.ssf_channel_dim = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
    module.ssf_scale = nn.Parameter(torch.empty(channels, device=weight.device, dtype=weight.dtype))
    module.ssf_shift = nn.Parameter(torch.empty(channels, device=weight.device, dtype=weight.dtype))
    nn.init.normal_(module.ssf_scale, mean=1.0, std=std)
    nn.init.normal_(module.ssf_shift, mean=0.0, std=std)


def fold_ssf(module: nn.Module) -> None:
    """Folds the scale into the weight and scale and shift into the bias; the layer gets its own class back."""
    s, t, weight, bias = module.ssf_scale, module.ssf_shift, module.weight, module.bias
    with torch.no_grad():
        module.weight = nn.Parameter(weight * s.view((-1,) + (1,) * (weight.ndim - 1)),
                                     requires_grad=weight.requires_grad)
        folded = t if bias is None else bias * s + t
        module.bias = nn.Parameter(folded.detach().clone(), requires_grad=(weight if bias is None else bias)
                                   .requires_grad)
    del module.ssf_scale, module.ssf_shift
    restore_class(module)


def ssf_places(description) -> list[str]:
    """The names (relative to the transformer) after which SSF scales and shifts, in forward order."""
    layout, places = description.layout, [description.patch_embed_out]
    parts = list(layout.norms) + [p for p in (layout.qkv, layout.q, layout.k, layout.v) if p]
    parts += [layout.attention_out, *layout.mlp_in, layout.mlp_out]
    places += [description.block_part(i, p) for i in range(len(description.blocks)) for p in parts]
    return places + list(description.outer_norms)


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
        """Adds a scale and shift to every place of every transformer's description."""
        for _, net, description in transformers(model, self.name):
            for name in ssf_places(description):
                add_ssf(net.get_submodule(name), float(opts.init_std),
                        description.widths[0] if name == description.patch_embed_out else None)

    def is_target(self, name: str) -> bool:
        """The scales and shifts."""
        return name.endswith(".ssf_scale") or name.endswith(".ssf_shift")

    def merge(self, model: nn.Module, opts) -> None:
        """Folds every scale and shift into the layer before it; raises :class:`PeftError` (nothing folded) when one
        follows a module that is no single layer."""
        loose = [n for n, m in model.named_modules()
                 if isinstance(m, _SSF) and not isinstance(m._parameters.get("weight"), nn.Parameter)]
        if loose:
            raise PeftError(f"ssf cannot be merged into this model: the scale and shift after {loose[0]} (a "
                            f"{type(model.get_submodule(loose[0])).__name__}, e.g. PrimusV3's conv stem, whose output "
                            f"is a sum of convolutions) fold into no single layer; run it unmerged")
        for module in list(model.modules()):
            if isinstance(module, _SSF):
                fold_ssf(module)
