"""Loading pre-trained ViT backbones (timm / MAE / DINO / Path-DINO, DINOv2, MedCoSS) into timm's ViT: key maps
into timm's state dict.

Files are read with ``torch.load(weights_only=True)``; besides tensors and plain Python values only numpy
scalars/arrays and ``argparse.Namespace`` (the ``args`` that MAE, DINO and MedCoSS store) are allowed. The weights
are the top-level dict or its ``teacher`` (DINO; preferred), ``model`` (MAE, MedCoSS), ``state_dict`` or ``student``
entry; ``module.``, ``_orig_mod.`` and ``backbone.`` prefixes are stripped; a dict of ``teacher.*`` / ``student.*``
keys (DINOv2 training) keeps the teacher.

Formats (``fmt``; ``auto`` detects them from the keys):

* ``timm`` (also MAE, DINO, Path-DINO): timm's names already. ``head.*``, ``heads.*``, ``head_dist.*``, ``fc_norm.*``,
  ``pre_logits.*``, ``dino_head.*``, ``ibot_head.*`` are heads (skipped, reported); the MAE decoder (``decoder_*``,
  ``mask_token``) goes to :attr:`LoadReport.extra` (and :func:`mae_decoder_state_dict`).
* ``dinov2`` (facebookresearch/dinov2): converted by timm's own ``checkpoint_filter_fn`` (registers; the class-token
  position folded into ``cls_token`` for timm's register layout); chunked blocks ``blocks.<chunk>.<i>.*`` are
  flattened first; ``mask_token`` (1, D) goes to ``extra``.
* ``medcoss`` (yeerwen/MedCoSS): its own layout, mapped by :mod:`nnunet_tpp.models.vit_medcoss`.

Class-token position: a checkpoint position for the class token is folded into ``cls_token`` for a model without
one and a model with one gets a zero position where the checkpoint has none; both are exact. A patch grid other than
the model's is resampled (``interpolate_pos``) by the rule of the checkpoint's own code
(:mod:`nnunet_tpp.models.vit_pretraining`), which the model keeps for inputs of other sizes.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from timm.models.vision_transformer import checkpoint_filter_fn

from nnunet_tpp.models.file_kinds import numpy_allow_list
from nnunet_tpp.models.checkpoint_errors import CheckpointError, ViTCheckpointError  # noqa: F401
from nnunet_tpp.models.vit import (PRETRAININGS, RESAMPLING, PosResampling, ViTConfig, VisionTransformer,
                                   config_dict, resample_patch_pos_embed)
from nnunet_tpp.models.vit_medcoss import MEDCOSS_PRETRAIN_GRID, convert_medcoss, medcoss_config  # noqa: F401
from nnunet_tpp.models.vit_pretraining import pretraining_from_contents, resampling_for

FORMATS = ("auto", "timm", "dinov2", "medcoss")
_ALIASES = {"mae": "timm", "dino": "timm", "path_dino": "timm"}
_CONTAINERS = ("teacher", "model", "state_dict", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_HEADS = ("head.", "heads.", "head_dist.", "fc_norm.", "pre_logits.", "dino_head.", "ibot_head.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

@dataclass
class LoadReport:
    """What :func:`load_vit_checkpoint` did.

    Attributes:
        path: the file; format: ``timm``, ``dinov2`` or ``medcoss``; container: where the weights were in the
        file (``teacher``, ``model``, ... or ``""`` for the top level).
        loaded: model keys filled from the checkpoint (all of them).
        skipped: checkpoint heads that were not loaded.
        extra: checkpoint tensors that are not backbone (MAE decoder, mask token, MedCoSS text/3D parts).
        interpolated: ``"14x14 -> 8x8"`` when the position embedding was resampled, else None.
        notes: conversions made on the way (renames, folded positions).
        pretraining: the checkpoint's self-supervised pre-training (see the module docstring), or None.
        resampling: the name of the position-embedding resampling rule the model now uses.
    """

    path: str
    format: str
    container: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    interpolated: str | None = None
    notes: list[str] = field(default_factory=list)
    pretraining: str | None = None
    resampling: str = "mae"

    def lines(self) -> list[str]:
        """The report as human-readable lines (for training logs)."""
        where = f", from '{self.container}'" if self.container else ""
        out = [f"pre-trained ViT: {self.path} ({self.format}{where})",
               f"  loaded {len(self.loaded)} tensors (every backbone tensor)",
               f"  skipped {len(self.skipped)} head tensors: {_short(self.skipped)}",
               f"  kept aside {len(self.extra)} non-backbone tensors: {_short(sorted(self.extra))}"]
        out.append(f"  pre-training: {self.pretraining or 'unknown'}; position-embedding resampling: {self.resampling}")
        if self.interpolated:
            out.append(f"  position embedding resampled ({self.resampling}): {self.interpolated}")
        out += [f"  {note}" for note in self.notes]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class _Converted:
    backbone: dict[str, torch.Tensor]
    heads: list[str]
    extra: dict[str, torch.Tensor]
    format: str
    container: str
    notes: list[str]
    pretraining: str | None = None
    resampling: str = "timm"
    layout: str = "timm"


def _short(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise ViTCheckpointError(f"checkpoint file not found: {path!r}. Pass the path of a ViT checkpoint "
                                 f"(timm / MAE / DINO / DINOv2 / MedCoSS).")
    try:
        with torch.serialization.safe_globals(numpy_allow_list() + [argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "unsupported global" in line.lower()), None)
        if detail is None:
            raise ViTCheckpointError(f"{path!r} is not a readable PyTorch checkpoint (corrupt or another file "
                                     f"type).") from None
        raise ViTCheckpointError(f"{path!r} holds objects outside the allow-list of a weights file (tensors, "
                                 f"numbers, numpy values, argparse.Namespace); it was not unpickled. "
                                 f"Detail: {detail}") from None
    except Exception as e:  # zip corruption, a text file, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ViTCheckpointError(f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                                 f"{first}).") from None
    if not isinstance(obj, dict):
        raise ViTCheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dictionary.")
    return obj


def _unwrap(obj: dict, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a checkpoint and where it was, with wrapper prefixes stripped."""
    container = []
    while not (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        key = next((k for k in _CONTAINERS if isinstance(obj.get(k), dict) and obj[k]), None)
        if key is None or len(container) > 2:
            raise ViTCheckpointError(f"no weights found in {path!r}: expected a state dict or one under "
                                     f"{', '.join(map(repr, _CONTAINERS))}; found keys {sorted(map(str, obj))[:8]}")
        container.append(key)
        obj = obj[key]
    keys = list(obj)
    if any(k.startswith("teacher.") for k in keys):  # DINOv2 training state: teacher.* and student.*
        obj, container = {k[8:]: v for k, v in obj.items() if k.startswith("teacher.")}, container + ["teacher.*"]
    clean = {}
    for key, value in obj.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean, "/".join(container)


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Names the layout of an (unwrapped) state dict: ``medcoss``, ``dinov2`` or ``timm``.

    Raises:
        ViTCheckpointError: the keys are not those of a ViT.
    """
    if any(k.startswith(("fused_encoder.layers.", "video_embed.")) for k in state):
        return "medcoss"
    mask = state.get("mask_token")
    if "register_tokens" in state or any(_CHUNKED.match(k) for k in state) or (mask is not None and mask.ndim == 2):
        return "dinov2"
    if "patch_embed.proj.weight" in state or "cls_token" in state:
        return "timm"
    raise ViTCheckpointError(f"not a ViT checkpoint: keys like {', '.join(sorted(state)[:4])}")


def _convert_timm(state: dict, notes: list[str]) -> tuple[dict, list[str], dict]:
    """Splits a timm-named state dict into backbone, heads and extra (MAE decoder, mask token); DINOv2's chunked
    blocks are flattened (timm's filter does not know them)."""
    backbone, heads, extra, chunked = {}, [], {}, False
    for key, value in state.items():
        m = _CHUNKED.match(key)
        if m:
            key, chunked = f"blocks.{m.group(1)}.{m.group(2)}", True
        if key.startswith(_HEADS):
            heads.append(key)
        elif key == "mask_token" or key.startswith("decoder"):
            extra[key] = value
        else:
            backbone[key] = value
    if chunked:
        notes.append("chunked blocks (blocks.<chunk>.<i>) flattened to blocks.<i>")
    return backbone, heads, extra


def _convert_file(path, fmt: str, medcoss_grid: int) -> _Converted:
    path = os.fspath(path)
    requested = fmt.lower()
    fmt = _ALIASES.get(requested, requested)
    if fmt not in FORMATS:
        raise ViTCheckpointError(f"unknown ViT checkpoint format {fmt!r}; known: {', '.join(FORMATS)} "
                                 f"(mae, dino and path_dino are timm)")
    top = _read(path)
    state, container = _unwrap(top, path)
    detected = detect_format(state)
    if fmt != "auto" and (fmt == "medcoss") != (detected == "medcoss"):
        raise ViTCheckpointError(f"{path!r} was requested as {fmt} but its keys are {detected} "
                                 f"(e.g. {', '.join(sorted(state)[:3])}); use fmt='{detected}' or 'auto'")
    notes: list[str] = []
    if detected == "medcoss":
        backbone, heads, extra = convert_medcoss(state, notes, medcoss_grid, _HEADS)
    else:
        backbone, heads, extra = _convert_timm(state, notes)
    pretraining = pretraining_from_contents(requested, top, state, container, detected)
    return _Converted(backbone, sorted(heads), extra, detected if fmt == "auto" else fmt, container, notes,
                      pretraining, resampling_for(pretraining, state), detected)


def vit_state_dict_from_file(path: str | os.PathLike, fmt: str = "auto", *,
                             medcoss_grid: int = MEDCOSS_PRETRAIN_GRID) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a ViT checkpoint and renames its backbone tensors to this package's (timm) names.

    Args:
        path: the checkpoint file.
        fmt: ``auto``, ``timm`` (``mae``, ``dino``, ``path_dino``), ``dinov2`` or ``medcoss``.
        medcoss_grid: patches per side of MedCoSS's 2D pre-training (224 / 16).
    Returns:
        ``(state_dict, format)``: the backbone tensors only (no heads, no MAE decoder) with the position
        embedding as the file has it (with or without a class-token position), and the format name.
    Raises:
        ViTCheckpointError: unreadable or disallowed file, unknown format, not a ViT.
    """
    conv = _convert_file(path, fmt, medcoss_grid)
    return conv.backbone, conv.format


def checkpoint_pretraining(path: str | os.PathLike, fmt: str = "auto") -> str | None:
    """The self-supervised pre-training of a ViT checkpoint (a name of
    :data:`~nnunet_tpp.models.vit_pretraining.PRETRAININGS`, or None when unknown), read as
    :func:`load_vit_checkpoint` reads it, without a model. Raises :class:`ViTCheckpointError` as the loader."""
    return _convert_file(path, fmt, MEDCOSS_PRETRAIN_GRID).pretraining


def mae_decoder_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The MAE decoder of a pre-training checkpoint: its ``decoder_*`` tensors and ``mask_token``, names
    as in the file (an empty dict when the file has no decoder)."""
    extra = _convert_file(path, "auto", MEDCOSS_PRETRAIN_GRID).extra
    return {k: v for k, v in extra.items() if k == "mask_token" or k.startswith("decoder")}


def _fit_pos_embed(state: dict, model: VisionTransformer, interpolate_pos: bool, notes: list[str],
                   problems: list[str], hints: list[str], rule: PosResampling) -> str | None:
    """Brings ``state["pos_embed"]`` to the model's grid in place (the checkpoint's own resampling rule, a class-token
    row kept); returns the resampling done."""
    cfg, pos = model.config, state.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    n = pos.shape[1]
    has_cls = math.isqrt(n) ** 2 != n
    side = math.isqrt(n - has_cls)
    if side * side != n - has_cls:
        problems.append(f"position embedding of {n} tokens is neither a square grid nor one plus a square grid")
        return None
    if side == cfg.grid:
        return None
    if not interpolate_pos:
        problems.append(f"position embedding grid: checkpoint {side}x{side} patches, model {cfg.grid}x{cfg.grid} "
                        f"(img_size {cfg.img_size}, patch {cfg.patch_size})")
        hints.append(f"pass interpolate_pos=True, or build the model with img_size={side * cfg.patch_size}")
        return None
    patches = resample_patch_pos_embed(pos[:, int(has_cls):], (cfg.grid, cfg.grid), rule)
    state["pos_embed"] = torch.cat([pos[:, :int(has_cls)], patches], dim=1)
    return f"{side}x{side} -> {cfg.grid}x{cfg.grid}"


def _fit_prefix(state: dict, model: VisionTransformer, fmt: str, extra: dict, notes: list[str]) -> None:
    """The class token and registers in the model's layout, in place. DINOv2 files go through timm's own
    ``checkpoint_filter_fn`` where it fits the model (registers; the class-token position folded into
    ``cls_token``); otherwise a class-token position is folded into ``cls_token`` for a model without one and a
    model with one gets a zero position where the checkpoint has none (both exact)."""
    pos = state.get("pos_embed")
    with_cls = pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]
    registers = "register_tokens" in state
    fits = (model.reg_token is not None) if registers else not model.no_embed_class  # else: the mismatch error
    if fmt == "dinov2" and with_cls and fits:
        token = extra.get("mask_token", torch.zeros(1, model.embed_dim))  # timm recognises DINOv2 by its mask token
        state.update(checkpoint_filter_fn({**state, "mask_token": token}, model))
        state.pop("register_tokens", None)
        if "reg_token" in state:
            notes.append("DINOv2 registers loaded by timm's checkpoint_filter_fn (class-token position folded "
                         "into cls_token)")
        return
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        notes.append("register_tokens loaded as reg_token")
    if pos is None or pos.ndim != 3:
        return
    has_cls = math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]
    if not model.no_embed_class and not has_cls:
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        notes.append("class-token position set to zero (the checkpoint has none)")
    elif model.no_embed_class and has_cls:
        cls = state.get("cls_token")
        if cls is not None and cls.shape == pos[:, :1].shape:
            state["cls_token"] = cls + pos[:, :1]
            notes.append("class-token position folded into cls_token (the model has none)")
        state["pos_embed"] = pos[:, 1:]


def _hints(state: dict, fmt: str, cfg: ViTConfig, heads: list[str]) -> list[str]:
    """Fixes for the usual architecture mismatches between a checkpoint and the model."""
    out = []
    cls = state.get("cls_token")
    if cls is not None and cls.shape[-1] != cfg.embed_dim:
        out.append(f"the checkpoint's embed_dim is {cls.shape[-1]}, the model's {cfg.embed_dim}: build the matching "
                   f"arch (vit_tiny 192, vit_small 384, vit_base 768, vit_large 1024)")
    regs = next((state[k].shape[1] for k in ("reg_token", "register_tokens") if k in state), 0)
    if regs != cfg.num_register_tokens:
        out.append(f"the checkpoint has {regs} register tokens, the model {cfg.num_register_tokens}: build the "
                   f"model with num_register_tokens={regs}")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth and depth != cfg.depth:
        out.append(f"the checkpoint has {depth} blocks: build the model with depth={depth}")
    has_ls = any(k.endswith(".ls1.gamma") for k in state)
    if has_ls and cfg.layer_scale is None:
        out.append("the checkpoint has layer scale (ls1/ls2.gamma): build the model with layer_scale set "
                   "(e.g. 1e-5 for DINOv2, 1e-3 for MedCoSS; the loaded values replace the initial ones)")
    elif not has_ls and depth and cfg.layer_scale is not None:
        out.append("the checkpoint has no layer scale: build the model with layer_scale=None")
    if ("norm_pre.weight" in state) != cfg.pre_norm:
        out.append(f"build the model with pre_norm={'norm_pre.weight' in state}")
    if ("norm.weight" in state) != cfg.final_norm:
        out.append(f"build the model with final_norm={'norm.weight' in state}")
        if "norm.weight" not in state and any(h.startswith("fc_norm.") for h in heads):
            out.append("(fc_norm instead of norm: a fine-tuned global-pool checkpoint, not a pre-trained backbone)")
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        if w.shape[-1] != cfg.patch_size:
            out.append(f"the checkpoint's patch size is {w.shape[-1]}: build the model with patch_size={w.shape[-1]}")
        if w.shape[1] != cfg.in_chans:
            out.append(f"the checkpoint expects {w.shape[1]} input channels: build the model with "
                       f"in_chans={w.shape[1]}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and cls is not None and fc1.shape[0] != int(cfg.embed_dim * cfg.mlp_ratio) \
            and cls.shape[-1] == cfg.embed_dim:
        out.append(f"build the model with mlp_ratio={fc1.shape[0] / cfg.embed_dim:g}")
    if ("blocks.0.attn.qkv.bias" in state) != cfg.qkv_bias and depth:
        out.append(f"build the model with qkv_bias={'blocks.0.attn.qkv.bias' in state}")
    if any(".mlp.w12." in k for k in state):
        out.append("the checkpoint uses a SwiGLU MLP (DINOv2 ViT-g), which this ViT does not implement")
    if fmt == "medcoss" and not (cfg.pre_norm and not cfg.pre_norm_prefix and not cfg.final_norm):
        out.append("for MedCoSS checkpoints build the model with medcoss_config()")
    return out


def load_vit_checkpoint(model: VisionTransformer, path: str | os.PathLike, fmt: str = "auto",
                        interpolate_pos: bool = True, *, medcoss_grid: int = MEDCOSS_PRETRAIN_GRID,
                        pos_resampling: str = "checkpoint") -> LoadReport:
    """Loads a pre-trained backbone into ``model`` (a plain :class:`VisionTransformer`, before PEFT).

    Args:
        model: the ViT to fill; every one of its tensors must come from the checkpoint.
        path: the checkpoint file.
        fmt: ``auto``, ``timm`` (``mae``, ``dino``, ``path_dino``), ``dinov2`` or ``medcoss``; the pre-training
            names also set ``model.pretraining``.
        interpolate_pos: resample a position embedding of another patch grid (else an error).
        medcoss_grid: patches per side of MedCoSS's 2D pre-training (224 / 16).
        pos_resampling: ``checkpoint`` (default): the resampling of the checkpoint's own code (module
            docstring); or a rule name of :data:`~nnunet_tpp.models.vit_pretraining.RESAMPLING` to use instead.
    Returns:
        A :class:`LoadReport` (``str()`` of it suits a training log); MAE decoder tensors are in ``extra``.
        The model's ``pretraining`` and ``pos_resampling`` are set.
    Raises:
        ViTCheckpointError: unreadable or disallowed file, or one that does not fit the model (one message
            with the missing and unexpected keys, the shape mismatches and the fix); the model is then left
            unchanged.
    """
    path = os.fspath(path)
    if pos_resampling != "checkpoint" and pos_resampling not in RESAMPLING:
        raise ViTCheckpointError(f"unknown pos_resampling {pos_resampling!r}; known: checkpoint, "
                                 f"{', '.join(RESAMPLING)}")
    conv = _convert_file(path, fmt, medcoss_grid)
    rule = RESAMPLING[conv.resampling if pos_resampling == "checkpoint" else pos_resampling]
    cfg, state, notes = model.config, dict(conv.backbone), list(conv.notes)
    problems, hints = [], []
    interpolated = _fit_pos_embed(state, model, interpolate_pos, notes, problems, hints, rule)
    if not problems:
        _fit_prefix(state, model, conv.layout, conv.extra, notes)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in target.items() if k in state and state[k].shape != v.shape
                  and not (k == "pos_embed" and problems)]
    if missing or unexpected or mismatched or problems:
        lines = [f"{path!r} ({conv.format} checkpoint) does not fit this ViT (embed_dim {cfg.embed_dim}, depth "
                 f"{cfg.depth}, patch {cfg.patch_size}, in_chans {cfg.in_chans}, registers {cfg.num_register_tokens}):"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {_short(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches: {'; '.join(mismatched[:5])}"
                         + (f"; ... ({len(mismatched) - 5} more)" if len(mismatched) > 5 else ""))
        lines += [f"  {p}" for p in problems]
        fixes = _hints(state, conv.format, cfg, conv.heads) + hints
        lines.append("Fix:")
        lines += [f"  - {fix}" for fix in fixes or ["build the model with the checkpoint's architecture"]]
        raise ViTCheckpointError("\n".join(lines))
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    model.pretraining, model.pos_resampling = conv.pretraining, rule
    return LoadReport(path, conv.format, conv.container, loaded=sorted(target), skipped=conv.heads,
                      extra=conv.extra, interpolated=interpolated, notes=notes, pretraining=conv.pretraining,
                      resampling=rule.name)


def save_vit_checkpoint(model: VisionTransformer, path: str | os.PathLike,
                        extra: dict[str, torch.Tensor] | None = None, pretraining: str | None = None) -> None:
    """Writes ``model`` as a timm-layout checkpoint, atomically.

    Args:
        model: the ViT (PEFT modules merged or removed first, or their tensors are saved too).
        path: the file to write: ``{"model": state dict (+ extra), "vit_config": the config as a dict,
            "pretraining": name or None}``.
        extra: further tensors to store next to the backbone (e.g. an MAE decoder, ``decoder_*`` /
            ``mask_token``); their names must not clash with the model's.
        pretraining: the pre-training to record (a name of
            :data:`~nnunet_tpp.models.vit_pretraining.PRETRAININGS`); None: the model's own ``pretraining``.
    """
    pretraining = pretraining if pretraining is not None else getattr(model, "pretraining", None)
    if pretraining is not None and pretraining not in PRETRAININGS:
        raise ValueError(f"unknown pretraining {pretraining!r}; known: {', '.join(PRETRAININGS)}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    clash = sorted(set(state) & set(extra or {}))
    if clash:
        raise ValueError(f"extra tensors clash with model keys: {clash[:5]}")
    state.update({k: v.detach().cpu().clone() for k, v in (extra or {}).items()})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({"model": state, "vit_config": config_dict(model), "pretraining": pretraining}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
