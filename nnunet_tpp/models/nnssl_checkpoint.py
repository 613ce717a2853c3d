"""nnssl pre-training checkpoints (MIC-DKFZ/nnssl): the adaptation plan they carry, and the two adaptations nnU-Net
master's pretrained route (``PretrainedTrainer.load_pretrained_weights``) applies to their encoder.

An nnssl checkpoint is the dict nnssl's trainer saves (``network_weights``, ``optimizer_state``,
``grad_scaler_state``, ``logging``, ``_best_ema``, ``current_epoch``, ``init_args`` with ``plan``,
``configuration_name``, ``fold``, ``pretrain_json``, ``device``, and ``trainer_name``) plus
``nnssl_adaptation_plan``: the architecture (``architecture_plans``: ``arch_class_name``, ``arch_kwargs``,
``arch_kwargs_requiring_import``), the pre-training plan (``pretrain_plan`` with one configuration: spacing,
normalisation, patch), ``pretrain_num_input_channels``, ``recommended_downstream_patchsize`` and where the encoder,
stem, input projection and learned position embedding live (``key_to_encoder``, ``key_to_stem``,
``keys_to_in_proj``, ``key_to_lpe``). Published: OpenMind ResEnc-L (``ResEncL``) and Primus-M (``PrimusM``).

* :func:`read_adaptation_plan` checks and reads the plan (:class:`AdaptationPlan`);
* :func:`repeat_stem_weight`: a stem pre-trained on one channel, for C channels: repeated and divided by C, so the
  first layer's output keeps its scale;
* :func:`resize_position_embedding`: the learned position embedding for another patch: trilinear interpolation
  of the token grid (``align_corners=False``), tokens ordered with the first axis slowest, as Primus flattens them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PLAN_KEY = "nnssl_adaptation_plan"
REQUIRED = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
            "key_to_encoder", "key_to_stem", "keys_to_in_proj")


class AdaptationPlanError(ValueError):
    """An nnssl checkpoint whose adaptation plan is missing or incomplete."""


@dataclass(frozen=True)
class AdaptationPlan:
    """What an nnssl checkpoint says about adapting it downstream.

    Attributes:
        architecture: ``arch_class_name`` (``PrimusM``, ``ResEncL``, ``ResidualEncoderUNet`` ...).
        arch_kwargs: the architecture's arguments (None for the named presets).
        arch_kwargs_requiring_import: which of them name classes.
        pretrain_channels: input channels during pre-training.
        pretrain_patch: the patch the encoder saw (``pretrain_patch_size`` when the plan overrides it, else the
            pre-training configuration's ``patch_size``).
        pretrain_spacing: the pre-training configuration's spacing (None: not resampled).
        pretrain_normalization: its normalisation schemes.
        recommended_patch: ``recommended_downstream_patchsize``.
        key_to_encoder, key_to_stem, keys_to_in_proj, key_to_lpe: where the weights live in ``network_weights``.
        configuration: the pre-training configuration (name, dict).
        trainer_name: the nnssl trainer (the pre-training method, e.g. ``BaseEvaMAETrainer``).
        citations: the papers to cite (``citations`` of the checkpoint, if any).
    """

    architecture: str
    arch_kwargs: dict | None
    arch_kwargs_requiring_import: list | None
    pretrain_channels: int
    pretrain_patch: tuple[int, ...]
    pretrain_spacing: tuple[float, ...] | None
    pretrain_normalization: tuple[str, ...]
    recommended_patch: tuple[int, ...]
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: str | None
    configuration: tuple[str, dict] = field(default=("", {}))
    trainer_name: str = ""
    citations: tuple = ()


def is_nnssl_checkpoint(checkpoint: dict) -> bool:
    """True for a checkpoint that carries an nnssl adaptation plan."""
    return isinstance(checkpoint, dict) and PLAN_KEY in checkpoint


def read_adaptation_plan(checkpoint: dict, source: str = "the checkpoint") -> AdaptationPlan:
    """The checked adaptation plan of an nnssl checkpoint.

    Args:
        checkpoint: the loaded checkpoint dict.
        source: the file, for messages.
    Raises:
        AdaptationPlanError: no plan, or one that lacks fields nnssl's ``AdaptationPlan`` always writes (all named).
    """
    plan = checkpoint.get(PLAN_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(plan, dict):
        raise AdaptationPlanError(f"{source} has no {PLAN_KEY}: it is not an nnssl pre-training checkpoint (nnssl "
                                  f"writes the plan into checkpoint_final.pth; older files get it with nnssl's "
                                  f"add_adaptation_plan)")
    missing = [k for k in REQUIRED if k not in plan]
    arch = plan.get("architecture_plans") or {}
    if "arch_class_name" not in arch:
        missing.append("architecture_plans.arch_class_name")
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    if not configs:
        missing.append("pretrain_plan.configurations")
    if missing:
        raise AdaptationPlanError(f"{source}: the {PLAN_KEY} lacks {missing}; it must hold what nnssl's "
                                  f"AdaptationPlan serialises ({', '.join(REQUIRED)}, key_to_lpe)")
    name, config = next(iter(configs.items()))
    patch = plan.get("pretrain_patch_size") or config.get("patch_size")
    if not patch:
        raise AdaptationPlanError(f"{source}: the pre-training configuration {name!r} has no patch_size")
    spacing = config.get("spacing")
    return AdaptationPlan(
        architecture=str(arch["arch_class_name"]), arch_kwargs=arch.get("arch_kwargs"),
        arch_kwargs_requiring_import=arch.get("arch_kwargs_requiring_import"),
        pretrain_channels=int(plan["pretrain_num_input_channels"]),
        pretrain_patch=tuple(int(p) for p in patch),
        pretrain_spacing=tuple(float(s) for s in spacing) if spacing and None not in spacing else None,
        pretrain_normalization=tuple(config.get("normalization_schemes") or ("ZScoreNormalization",)),
        recommended_patch=tuple(int(p) for p in plan["recommended_downstream_patchsize"]),
        key_to_encoder=str(plan["key_to_encoder"]), key_to_stem=str(plan["key_to_stem"]),
        keys_to_in_proj=tuple(plan["keys_to_in_proj"] or ()), key_to_lpe=plan.get("key_to_lpe"),
        configuration=(str(name), dict(config)), trainer_name=str(checkpoint.get("trainer_name", "")),
        citations=tuple(checkpoint.get("citations") or ()))


def repeat_stem_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A stem convolution pre-trained on one input channel, for ``channels`` channels: the weights repeated over the
    channels and divided by their number (nnU-Net master's rule), so an image whose channels are equal gives the
    pre-trained output.

    Args:
        weight: ``(out, 1, *kernel)``.
        channels: the new input channel count.
    Returns:
        ``(out, channels, *kernel)``.
    """
    if weight.shape[1] != 1:
        raise ValueError(f"only a 1-channel stem can be repeated over channels, got {tuple(weight.shape)}")
    return weight.repeat(1, channels, *([1] * (weight.dim() - 2))) / channels


def resize_position_embedding(pos_embed: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """A learned position embedding ``(1, tokens, dim)`` of an ``old_grid`` of tokens, for ``new_grid``.

    Trilinear interpolation with ``align_corners=False`` (nnU-Net master's ``interpolate_trilinear``); the tokens
    are ordered with the first axis slowest (Primus's ``b c x y z -> b (x y z) c``).

    Returns:
        ``(1, prod(new_grid), dim)`` in ``pos_embed``'s dtype.
    Raises:
        ValueError: ``old_grid`` does not account for the embedding's tokens.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    if old_grid[0] * old_grid[1] * old_grid[2] != n:
        raise ValueError(f"a position embedding of {n} tokens is not a {'x'.join(map(str, old_grid))} grid")
    if old_grid == new_grid:
        return pos_embed.clone()
    volume = pos_embed.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3).float()
    resized = F.interpolate(volume, size=new_grid, mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos_embed.dtype)


def under(key: str, prefix: str) -> bool:
    """True when state-dict ``key`` lies in module ``prefix`` (or is it)."""
    return key == prefix or key.startswith(prefix + ".")


def map_encoder_keys(state: dict[str, torch.Tensor], plan: AdaptationPlan, encoder: str, stem: str
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's encoder and stem tensors renamed into the network (its ``key_to_encoder`` / ``key_to_stem``),
    and the names of every other checkpoint tensor (the pre-training decoder, mask token ...; class tokens, which
    nnU-Net master drops, among them).

    Returns:
        ``({network name: tensor}, [skipped checkpoint names])``.
    """
    kept, skipped = {}, []
    for key, value in state.items():
        if key.split(".")[-1] == "cls_token":
            skipped.append(key)
        elif under(key, plan.key_to_stem):
            kept[stem + key[len(plan.key_to_stem):]] = value
        elif under(key, plan.key_to_encoder):
            kept[encoder + key[len(plan.key_to_encoder):]] = value
        else:
            skipped.append(key)
    return kept, skipped
