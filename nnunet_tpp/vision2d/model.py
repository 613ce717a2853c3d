"""The model of a 2-D run: its backbone (timm's ViT or LiteMedSAM's image encoder, loaded from ``cfg.backbone``),
the task model on it (classifier, segmenter, or a combination of backbones) and the PEFT method applied to it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.vision2d.config import LITEMEDSAM, Train2dConfig


def checkpoint_in_chans(path: Path, fmt: str) -> int:
    """The input channels of a ViT checkpoint's patch embedding."""
    from nnunet_tpp.models.vit_checkpoint import vit_state_dict_from_file
    state, _ = vit_state_dict_from_file(path, fmt)
    return int(state["patch_embed.proj.weight"].shape[1])


def build_backbone(cfg: Train2dConfig, in_chans: int, log: Callable[[str], None] = print) -> nn.Module:
    """The backbone of ``cfg.arch``: a ViT at ``cfg.img_size`` (random, or loaded from ``cfg.backbone``), or
    LiteMedSAM's image encoder loaded from ``cfg.backbone`` (default: the installed package's checkpoint)."""
    if cfg.arch == LITEMEDSAM:
        from nnunet_tpp.models.litemedsam import LiteMedSAMBackbone
        from nnunet_tpp.vision2d.data import IMAGENET_MEAN, IMAGENET_STD
        backbone = LiteMedSAMBackbone(cfg.backbone or "default", IMAGENET_MEAN, IMAGENET_STD)
        log(f"pre-trained LiteMedSAM image encoder: {backbone.checkpoint} (its image_encoder.* tensors)")
        return backbone
    from nnunet_tpp.models.vit import build_vit
    overrides = dict(cfg.arch_options)
    if cfg.patch_size:
        overrides["patch_size"] = cfg.patch_size
    backbone = build_vit(cfg.arch, img_size=cfg.img_size, in_chans=in_chans, **overrides)
    if cfg.backbone is not None:
        from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint
        log(str(load_vit_checkpoint(backbone, cfg.backbone, fmt=cfg.backbone_format)))
    return backbone


def build_other_backbones(cfg: Train2dConfig, in_chans: int, log: Callable[[str], None] = print
                          ) -> list[nn.Module]:
    """The backbones of ``cfg.combine_backbones`` (empty without), built as :func:`build_backbone`."""
    return [build_backbone(replace(cfg, backbone=p, combine_backbones=[]), in_chans, log)
            for p in cfg.combine_backbones]


def build_task_model(cfg: Train2dConfig, backbone: nn.Module, num_classes: int, others: list[nn.Module] = ()
                     ) -> nn.Module:
    """The task model on ``backbone``, no PEFT method yet: a classifier, a segmenter, or (with
    ``cfg.combine_backbones``) a combined classifier of ``backbone`` and ``others``."""
    if cfg.arch == LITEMEDSAM:
        from nnunet_tpp.models.litemedsam import LiteMedSAMClassifier, LiteMedSAMSegmenter
        return LiteMedSAMClassifier(backbone, num_classes) if cfg.task == "cls" else \
            LiteMedSAMSegmenter(backbone, num_classes)
    if cfg.combine_backbones:
        from nnunet_tpp.models.vit_combine import CombinedClassifier
        return CombinedClassifier([backbone, *others], num_classes, mode=cfg.combine, pool=cfg.pool)
    from nnunet_tpp.models.vit_heads import ViTClassifier, ViTSegmenter
    if cfg.task == "cls":
        return ViTClassifier(backbone, num_classes, pool=cfg.pool)
    return ViTSegmenter(backbone, num_classes)


def build_model(cfg: Train2dConfig, backbone: nn.Module, num_classes: int,
                log: Callable[[str], None] = print, others: list[nn.Module] | None = None) -> nn.Module:
    """The task model on ``backbone`` (:func:`build_task_model`; the further checkpoints of ``cfg.combine_backbones``
    are built here unless given as ``others``) with the PEFT method applied.

    Returns:
        The model, with ``peft_config`` set.
    """
    if cfg.combine_backbones and others is None:
        others = build_other_backbones(cfg, backbone.config.in_chans, log)
    model = build_task_model(cfg, backbone, num_classes, others or [])
    return peft.apply(model, cfg.method, **cfg.method_options)
