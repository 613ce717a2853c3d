"""nnU-Net's 3-D transformer **Primus** (``dynamic_network_architectures.architectures.primus``) as a backbone.

Primus embeds the image in 8x8x8 patches (V1: one strided convolution ``down_projection.proj``; V3: a small residual
conv stem), runs an EVA transformer over the tokens (``eva``: learned absolute position embedding ``eva.pos_embed``
plus rotary embeddings, blocks with separate ``q_proj``/``k_proj``/``v_proj``, SwiGLU MLP, LayerScale) and decodes
with transposed convolutions (``up_projection``, whose last layer outputs the classes). The network only takes
inputs of the patch it was built for (the position embedding has one entry per token), so it is built per plan.

This module says which Primus a trainer or a plan means (:class:`PrimusSpec`: the presets of nnU-Net's
``nnUNet_Primus_{S,B,M,L}_Trainer`` and ``nnUNet_PrimusV3{S,B,M,L}_Trainer``, and the architectures nnssl
checkpoints name), builds it (:func:`build_primus`) and readies it for PEFT (:func:`prepare_primus`: the decoder is
the task head, as nnU-Net master's pretrained trainer treats it as new). Where transformer PEFT methods attach is
said by Primus's transformer description, :mod:`nnunet_tpp.models.primus_sites`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_tpp.models.nnunet_networks import architecture_id
from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS

PATCH_EMBED = (8, 8, 8)
HEAD_PREFIXES = ("up_projection",)
PLANS_BACKBONE = "Primus"  # the trainer suffix of "the Primus the plans describe"


class PrimusError(ValueError):
    """A Primus that cannot be built as asked (patch, plans); the message names the fix."""


@dataclass(frozen=True)
class PrimusSpec:
    """One Primus architecture.

    Attributes:
        name: e.g. ``Primus-M``, ``PrimusV3-S`` or ``Primus`` (explicit sizes).
        version: ``V1`` (``Primus``: an 8^3 strided patch-embedding conv) or ``V3`` (``PrimusV3``: a residual conv
            stem down to 8^3 patches).
        embed_dim, depth, heads: the EVA transformer's width, number of blocks and attention heads.
        patch_embed_size: voxels per token along each axis.
        drop_path_rate: stochastic depth of the last block (linearly from 0 over the blocks).
        init_values: LayerScale's initial value (None: no LayerScale).
        scale_attn_inner: a LayerNorm inside attention before the output projection.
    """

    name: str
    version: str
    embed_dim: int
    depth: int
    heads: int
    patch_embed_size: tuple[int, int, int] = PATCH_EMBED
    drop_path_rate: float = 0.2
    init_values: float | None = 0.1
    scale_attn_inner: bool = True

    def same_architecture(self, other: "PrimusSpec") -> bool:
        """True when both build the same tensors (stochastic depth and names aside)."""
        keys = ("version", "embed_dim", "depth", "heads", "patch_embed_size", "scale_attn_inner")
        return all(getattr(self, k) == getattr(other, k) for k in keys) and (
            (self.init_values is None) == (other.init_values is None))

    def describe(self) -> str:
        """``Primus-M (864 dims, depth 16, 12 heads)``."""
        return f"{self.name} ({self.embed_dim} dims, depth {self.depth}, {self.heads} heads)"


_SIZES = {"S": (396, 12, 6), "B": (792, 12, 12), "M": (864, 16, 12), "L": (1056, 24, 16)}
# nnU-Net 2.8.1's nnUNet_Primus_{S,B,M,L}_Trainer and nnUNet_PrimusV3{S,B,M,L}_Trainer build these (drop path 0.2,
# LayerScale 0.1, inner attention norm); the trainer suffixes _Primus_M, _PrimusV3_S ... name them.
TRAINER_PRESETS: dict[str, PrimusSpec] = {
    **{f"Primus_{s}": PrimusSpec(f"Primus-{s}", "V1", *dims) for s, dims in _SIZES.items()},
    **{f"PrimusV3_{s}": PrimusSpec(f"PrimusV3-{s}", "V3", *dims) for s, dims in _SIZES.items()},
}
# nnssl checkpoints name presets PrimusS/B/M/L; nnU-Net master builds them with get_network_from_name, i.e. the
# preset classes' defaults (no stochastic depth).
NNSSL_PRESETS: dict[str, PrimusSpec] = {
    f"Primus{s}": PrimusSpec(f"Primus-{s}", "V1", *dims, drop_path_rate=0.0) for s, dims in _SIZES.items()}
# the explicit-size form nnU-Net master's PretrainedTrainer_Primusx reads from a plan's arch_kwargs
EXPLICIT_KEYS = ("embed_dim", "patch_embed_size", "encoder_eva_depth", "encoder_eva_numheads", "scale_attn_inner",
                 "init_values")


def is_primus_backbone(key: str | None) -> bool:
    """True for the trainer suffixes of Primus backbones (``Primus_M``, ``PrimusV3_S``, ``Primus``)."""
    return key == PLANS_BACKBONE or key in TRAINER_PRESETS


def check_patch(patch, patch_embed_size=PATCH_EMBED) -> tuple[int, int, int]:
    """The patch as a tuple, or :class:`PrimusError` when it is not 3 sizes divisible by ``patch_embed_size``."""
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p <= 0 or p % e for p, e in zip(patch, patch_embed_size)):
        fixed = tuple(max(e, -(-p // e) * e) for p, e in zip(patch, patch_embed_size)) if len(patch) == 3 else None
        raise PrimusError(f"patch {list(patch)} does not fit Primus: every axis must be divisible by "
                          f"{patch_embed_size[0]} (it embeds {'x'.join(map(str, patch_embed_size))} patches)"
                          + (f"; e.g. {list(fixed)} (`nnunet-tpp adopt-plans ... --patch` or the plans' patch_size)"
                             if fixed else ""))
    return patch


def spec_from_architecture(architecture: dict) -> PrimusSpec | None:
    """The Primus an nnU-Net plan's ``architecture`` entry describes (as ``nnunet-tpp adopt-plans`` and nnU-Net
    master's ``nnUNetv2_preprocess_like_nnssl`` write it from an nnssl checkpoint), or None when it names no Primus.

    Args:
        architecture: ``{"network_class_name", "arch_kwargs", ...}``: a preset name (``PrimusM``, kwargs None) or
            explicit sizes (kwargs with :data:`EXPLICIT_KEYS`, built with stochastic depth 0.2 as nnU-Net master's
            ``PretrainedTrainer_Primusx`` does).
    Raises:
        PrimusError: a Primus with explicit sizes that lack some of :data:`EXPLICIT_KEYS`.
    """
    name = str(architecture.get("network_class_name", "")).split(".")[-1]
    kwargs = architecture.get("arch_kwargs")
    if not name.startswith("Primus"):
        return None
    if kwargs:
        missing = [k for k in EXPLICIT_KEYS if k not in kwargs]
        if missing:
            raise PrimusError(f"the plans' {name} lacks {missing} in arch_kwargs (a Primus with explicit sizes needs "
                              f"{list(EXPLICIT_KEYS)}); write the plans again with `nnunet-tpp adopt-plans`")
        init = kwargs["init_values"]
        init = init[0] if isinstance(init, (list, tuple)) else init
        embed, depth, heads = int(kwargs["embed_dim"]), int(kwargs["encoder_eva_depth"]), int(
            kwargs["encoder_eva_numheads"])
        return PrimusSpec("Primus", "V1", embed, depth, heads,
                          tuple(int(p) for p in kwargs["patch_embed_size"]), 0.2, init,
                          bool(kwargs["scale_attn_inner"]))
    if name in NNSSL_PRESETS:
        return NNSSL_PRESETS[name]
    raise PrimusError(f"the plans name {name}, which nnunet_tpp cannot build: a Primus in plans is one of "
                      f"{sorted(NNSSL_PRESETS)} or a Primus with explicit sizes ({list(EXPLICIT_KEYS)})")


def build_primus(spec: PrimusSpec, input_channels: int, num_classes: int, patch) -> nn.Module:
    """A randomly initialised Primus of ``spec`` for ``patch``, readied for PEFT (:func:`prepare_primus`).

    Args:
        spec: the architecture.
        input_channels, num_classes: image channels and output channels (segmentation heads).
        patch: the 3 patch sizes the network takes (each divisible by the patch embedding, 8).
    Returns:
        The network (``Primus`` or ``PrimusV3`` of dynamic_network_architectures).
    Raises:
        PrimusError: a patch that does not fit, or an EVA width the rotary embedding cannot split.
    """
    from dynamic_network_architectures.architectures.primus import Primus, PrimusV3
    patch = check_patch(patch, spec.patch_embed_size)
    rope = spec.embed_dim / spec.heads / 1.5
    if rope != int(rope) or int(rope) % 4:
        raise PrimusError(f"{spec.describe()}: EVA's 3-D rotary embedding needs embed_dim / heads / 1.5 to be a "
                          f"multiple of 4 (got {rope:g}); e.g. 192 dims with 4 heads")
    if spec.version == "V3" and spec.patch_embed_size != PATCH_EMBED:
        raise PrimusError(f"{spec.name}: PrimusV3's stem always embeds 8x8x8 patches")
    cls = {"V1": Primus, "V3": PrimusV3}[spec.version]
    net = cls(input_channels, spec.embed_dim, spec.patch_embed_size, num_classes, spec.depth, spec.heads, patch,
              drop_path_rate=spec.drop_path_rate, init_values=spec.init_values,
              scale_attn_inner=spec.scale_attn_inner)
    return prepare_primus(net, spec, patch)


def prepare_primus(net: nn.Module, spec: PrimusSpec, patch) -> nn.Module:
    """Readies a Primus for PEFT in place and records what loaders need.

    Sets ``head_prefixes`` (``up_projection``: the decoder trains with the heads; nnssl checkpoints hold no
    decoder), ``label_layer_prefixes`` (the decoder's last layer, whose shape follows the label set: skipped when
    loading an nnU-Net checkpoint of another task), ``peft_defaults`` (a transformer's: LoRA on q and v),
    ``patch_embed_size``, ``patch_size``, ``primus_spec`` and ``architecture_id``.

    Returns:
        ``net``.
    """
    net.head_prefixes = HEAD_PREFIXES
    net.peft_defaults = PEFT_DEFAULTS
    net.label_layer_prefixes = (f"up_projection.decode.{len(net.up_projection.decode) - 1}",)
    net.patch_embed_size = tuple(spec.patch_embed_size)
    net.patch_size = tuple(int(p) for p in patch)
    net.primus_spec = spec
    net.architecture_id = architecture_id(net, HEAD_PREFIXES)
    return net


class _CheckpointedBlock:
    """Mixed into an EVA block's class: its forward runs under ``torch.utils.checkpoint`` (non-reentrant: EVA's own
    ``set_grad_checkpointing`` passes ``rope`` as a keyword, which the reentrant default of torch 2.14 refuses)."""

    def forward(self, x, rope=None, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(x, rope=rope, **kwargs)
        return checkpoint(super().forward, x, rope=rope, use_reentrant=False, **kwargs)


_CHECKPOINTED: dict[type, type] = {}


def set_activation_checkpointing(net: nn.Module, on: bool) -> int:
    """Recomputes each EVA block in the backward pass instead of keeping its activations (``on``), or not.

    Returns:
        The number of blocks switched.
    """
    count = 0
    for block in net.eva.blocks:
        checkpointed = isinstance(block, _CheckpointedBlock)
        if on and not checkpointed:
            base = type(block)
            block.__class__ = _CHECKPOINTED.setdefault(base, type(f"Checkpointed{base.__name__}",
                                                                  (_CheckpointedBlock, base), {}))
        elif checkpointed and not on:
            block.__class__ = type(block).__bases__[1]
        else:
            continue
        count += 1
    net.activation_checkpointing = on
    return count


def token_grid(patch, patch_embed_size=PATCH_EMBED) -> tuple[int, int, int]:
    """Tokens per axis for a patch: ``patch // patch_embed_size``."""
    return tuple(int(p) // int(e) for p, e in zip(patch, patch_embed_size))


def spec_for_backbone(key: str, configuration_manager) -> PrimusSpec:
    """The Primus a trainer suffix builds for an nnU-Net configuration.

    ``Primus_M``, ``PrimusV3_S`` ...: that preset (nnU-Net's Primus trainers); when the plans themselves name a Primus
    (plans adopted from an nnssl checkpoint), it must be the same architecture. ``Primus``: the Primus the plans
    describe. Raises :class:`PrimusError` naming the trainer that fits.
    """
    architecture = configuration_manager.configuration.get("architecture", {})
    planned = spec_from_architecture(architecture)
    if key == PLANS_BACKBONE:
        if planned is None:
            raise PrimusError(f"the _Primus trainers build the Primus the plans describe, but these plans describe "
                              f"{architecture.get('network_class_name')}; adopt an nnssl Primus checkpoint's plans "
                              f"with `nnunet-tpp adopt-plans CHECKPOINT -d D`, or pick a Primus size: "
                              f"{', '.join('_' + k for k in TRAINER_PRESETS)}")
        return planned
    preset = TRAINER_PRESETS[key]
    if planned is not None and not planned.same_architecture(preset):
        fits = [k for k, s in TRAINER_PRESETS.items() if s.same_architecture(planned)]
        raise PrimusError(f"these plans describe {planned.describe()}, but the _{key} trainers build "
                          f"{preset.describe()}; use the trainer with suffix _{(fits or [PLANS_BACKBONE])[0]}")
    if planned is not None:
        preset = dataclasses.replace(preset, drop_path_rate=planned.drop_path_rate)
    return preset


def primus_from_plans(key: str, configuration_manager, num_input_channels: int, num_output_channels: int) -> nn.Module:
    """The Primus of trainer suffix ``key`` at the configuration's patch (:func:`spec_for_backbone`)."""
    spec = spec_for_backbone(key, configuration_manager)
    return build_primus(spec, num_input_channels, num_output_channels, configuration_manager.patch_size)


def bench_network(preset: str, patch, input_channels: int = 1, num_classes: int = 3) -> nn.Module:
    """A Primus for ``nnunet-tpp bench``: a trainer preset (``Primus_M``, ``PrimusV3_S`` or just ``M`` / ``V3S``)
    or explicit sizes ``EMBED:DEPTH:HEADS`` (V1, e.g. ``192:4:4``), at ``patch``.

    Returns:
        The network (random weights; seed before calling for a reproducible one).
    """
    key = str(preset)
    aliases = {**{s: f"Primus_{s}" for s in _SIZES}, **{f"V3{s}": f"PrimusV3_{s}" for s in _SIZES}}
    key = aliases.get(key.upper(), key)
    if key in TRAINER_PRESETS:
        spec = TRAINER_PRESETS[key]
    else:
        try:
            embed, depth, heads = (int(v) for v in key.split(":"))
        except ValueError:
            raise PrimusError(f"unknown Primus {preset!r}: use a preset ({', '.join(TRAINER_PRESETS)}, or S/B/M/L, "
                              f"V3S ...) or EMBED:DEPTH:HEADS such as 192:4:4") from None
        spec = PrimusSpec("Primus", "V1", embed, depth, heads)
    return build_primus(spec, input_channels, num_classes, patch)
