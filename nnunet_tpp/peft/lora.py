"""LoRA (Hu et al., 2022): W + (alpha/r) * B A with B initialised at zero. Mergeable.

One registry entry for both families of layers:

* convolutions of a CNN that describes its blocks (STU-Net, nnU-Net's networks; :mod:`nnunet_tpp.models.sites`):
  A is a k x k conv C_in -> r (same stride and padding as the adapted conv), B a 1x1 conv r -> C_out; for a
  transposed convolution (nnU-Net's decoder upsampling) A is a transposed conv C_in -> r with the same kernel and
  stride. Targets: ``all`` (default: every k x k convolution of every block, encoder and decoder), ``first``,
  ``upsample`` (the decoder's upsampling convolutions, transposed or not) or attribute names (``conv1``);
* layers of a described transformer (:mod:`nnunet_tpp.models.transformer_sites`: timm's ViT, LiteMedSAM's
  TinyViT): A is r x in, B out x r. Targets ``q``, ``k``, ``v`` adapt those rows of a fused q/k/v projection (one
  LoRA per chosen part, added only to its rows, as the official loralib ``MergedLinear`` with ``enable_lora``;
  timm stacks ``[q; k; v]``, TinyViT interleaves them per head), or the separate q / k / v projections where the
  description has them; ``qkv``, ``proj`` (the attention output), ``fc1`` / ``fc2`` (the MLP's projections) and
  other module names (``attn.proj``, ``patch_embed.proj``: the patch embedding is adapted only when named so)
  adapt whole ``nn.Linear`` / ``nn.Conv2d`` layers.

Which LoRA is whose: whole linear layers and 2-D convolutions of a transformer are Hugging Face ``peft``'s LoRA
(``LoraConfig`` + ``inject_adapter_in_model``; merged with its ``merge``). Its layers keep the adapted weight as
``<layer>.base_layer.weight`` and the factors as ``<layer>.lora_A.default.weight``; adapter files of earlier
versions (``<layer>.lora_A.weight``) load by a key map (:meth:`LoRAMethod.current_name`). Three kinds stay ours:
the q / k / v rows of a fused projection (``peft`` adapts whole layers only), every convolution of a CNN (the
published STU-Net / nnU-Net checkpoint loaders, nnU-Net's strict ``network_weights`` loading of earlier runs, the
backbone fingerprints, the network descriptions of :mod:`nnunet_tpp.models.sites` and the memory paths all need the
convolution weights under their own names, and nnU-Net's blocks hold each convolution twice, which
``inject_adapter_in_model`` would replace only once), and transposed / grouped convolutions (``peft`` has no
``ConvTranspose3d`` LoRA and refuses to merge a grouped one).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.models.sites import replace_module
from nnunet_tpp.models.transformer_sites import find_transformers
from nnunet_tpp.peft.modules import (CNN_POSITIONS, conv_like, describes_itself, module_like, name_matches,
                                     qualified, restore_class, select_sites, swap_class, transformers)
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


class _LoRARows:
    """Mixin for a fused q/k/v ``nn.Linear``: one LoRA per chosen part (``lora_A[s]`` in -> r, ``lora_B[s]`` r -> rows),
    added to that part's output rows (buffer ``lora_rows_<s>``); the layer's own parameters and names unchanged."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        for key, down in self.lora_A.items():
            out = out.index_add(-1, getattr(self, f"lora_rows_{key}"), self.lora_B[key](down(x)), alpha=self.scaling)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The dense update of the fused weight: zero except the chosen parts' rows."""
        delta = torch.zeros_like(self.weight)
        for key, down in self.lora_A.items():
            delta.index_add_(0, getattr(self, f"lora_rows_{key}"), (self.lora_B[key].weight @ down.weight) * self.scaling)
        return delta

    def merge_in_place(self) -> None:
        """Folds the updates into the weight and gives the layer its own class back."""
        with torch.no_grad():
            self.weight = nn.Parameter(self.weight + self.delta_weight().to(self.weight.dtype),
                                       requires_grad=self.weight.requires_grad)
        for key in list(self.lora_A):
            delattr(self, f"lora_rows_{key}")
        del self.lora_A, self.lora_B, self.scaling
        restore_class(self)


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


def _slice_lora(layer: nn.Linear, rows: dict[str, torch.Tensor], rank: int, scaling: float) -> None:
    """Adds one LoRA per part of ``rows`` to a fused projection (:class:`_LoRARows`)."""
    pairs = {key: _low_rank(layer.in_features, len(index), rank, layer.weight) for key, index in rows.items()}
    swap_class(layer, _LoRARows)
    layer.lora_A = nn.ModuleDict({key: pair[0] for key, pair in pairs.items()})
    layer.lora_B = nn.ModuleDict({key: pair[1] for key, pair in pairs.items()})
    layer.scaling = scaling
    for key, index in rows.items():
        layer.register_buffer(f"lora_rows_{key}", index.to(layer.weight.device), persistent=False)


def _transformer_targets(model: nn.Module, targets: tuple[str, ...], rank: int, scaling: float) -> list[str]:
    """Adds the row LoRAs of every described transformer; returns the qualified names of the whole layers to adapt."""
    slices = [t for t in targets if t in QKV_SLICES]
    roles = {"qkv": lambda d: [d.layout.qkv], "proj": lambda d: [d.layout.attention_out],
             "fc1": lambda d: list(d.layout.mlp_in), "fc2": lambda d: [d.layout.mlp_out]}
    whole = []
    for prefix, net, d in transformers(model, "lora"):
        for i in range(len(d.blocks)):
            if slices and d.layout.qkv:
                layer = net.get_submodule(d.block_part(i, d.layout.qkv))
                _slice_lora(layer, {s: d.qkv_rows(i, s) for s in slices}, rank, scaling)
            elif slices:
                whole += [qualified(prefix, d.block_part(i, getattr(d.layout, s))) for s in slices]
            for target in targets:
                if target in roles:
                    whole += [qualified(prefix, d.block_part(i, part)) for part in roles[target](d) if part]
        names = [t for t in targets if t not in QKV_SLICES and t not in roles]
        whole += [qualified(prefix, n) for n, m in net.named_modules() if type(m) in (nn.Linear, nn.Conv2d)
                  and any(name_matches(n, t) for t in names)]
    return list(dict.fromkeys(whole))


def _hf_lora(model: nn.Module, names: list[str], rank: int, alpha: float) -> None:
    """Hugging Face ``peft``'s LoRA on exactly the layers ``names`` (``nn.Linear`` / ``nn.Conv2d``)."""
    from peft import LoraConfig, inject_adapter_in_model
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0),
                            model, adapter_name="default")


def _is_hf_lora(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora")


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
        if not any(True for _ in find_transformers(model)):
            if set(targets) & set(QKV_SLICES):
                raise PeftError(f"lora: targets {sorted(set(targets) & set(QKV_SLICES))} are slices of a fused "
                                f"attention projection 'qkv' (Vision Transformer), and {type(model).__name__} has none")
            raise PeftError(f"{self.name}: no convolution named {list(targets)} in {type(model).__name__}, nor a "
                            f"linear layer of that name (ViT targets: q, k, v, qkv, proj, fc1, fc2)")
        whole = _transformer_targets(model, targets, rank, scaling)
        if whole:
            _hf_lora(model, whole, rank, float(opts.alpha))
        elif not any(isinstance(m, _LoRARows) for m in model.modules()):
            raise PeftError(f"{self.name}: no convolution named {list(targets)} in {type(model).__name__}, nor a "
                            f"linear layer of that name (ViT targets: q, k, v, qkv, proj, fc1, fc2)")

    def is_target(self, name: str) -> bool:
        """The low-rank factors ``lora_A`` / ``lora_B``."""
        return ".lora_A." in name or ".lora_B." in name

    def current_name(self, name: str, names: set[str]) -> str:
        """An adapter file's tensor name as this model names it: files of earlier versions hold our own LoRA's
        ``<layer>.lora_A.weight`` where Hugging Face ``peft`` now holds ``<layer>.lora_A.default.weight``."""
        if name in names:
            return name
        for part in (".lora_A.", ".lora_B."):
            if part in name:
                moved = name.replace(part, f"{part}default.")
                return moved if moved in names else name
        return name

    def merge(self, model: nn.Module, opts) -> None:
        """Folds every LoRA into its layer: ours replaced by a plain layer, ``peft``'s merged and unloaded."""
        for name, module in list(model.named_modules()):
            if isinstance(module, (_LoRAConv, LoRAConvTranspose3d)):
                replace_module(model, name, module.merged())
            elif isinstance(module, _LoRARows):
                module.merge_in_place()
            elif _is_hf_lora(module):
                module.merge()
                replace_module(model, name, module.get_base_layer())
