"""MedCoSS (yeerwen/MedCoSS: ``model/Unimodel.py`` ``Unified_Model``, ``model/Base_module.py``; checkpoints from
``util/misc.py`` ``save_model`` hold the weights under ``model``): the key map onto timm's ViT and the matching
:class:`~nnunet_tpp.models.vit.ViTConfig`.

===========================================================================  ===================================
MedCoSS                                                                      timm's ViT
===========================================================================  ===================================
``video_embed.embeddings.{weight,bias}`` (Conv2d 3 -> 768, 16 x 16)          ``patch_embed.proj.*``
``video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight`` (M, D)          ``pos_embed`` (patches only)
``  + ...temporal_pos_embed.weight[0]`` (added to every patch; t = 1)
``video_embed.embeddings_norm.*`` (patch tokens, after their positions)       ``norm_pre.*`` (``pre_norm_prefix=False``)
``cls_token`` (no position, no norm)                                         ``cls_token`` (``no_embed_class``)
``fused_encoder.layers.N.norm1.*`` / ``norm2.*``                             ``blocks.N.norm1.*`` / ``norm2.*``
``fused_encoder.layers.N.self_attn.in_proj_weight`` / ``in_proj_bias``       ``blocks.N.attn.qkv.weight`` / ``bias``
``fused_encoder.layers.N.self_attn.out_proj.*``                              ``blocks.N.attn.proj.*``
``fused_encoder.layers.N.linear1.*`` / ``linear2.*``                         ``blocks.N.mlp.fc1.*`` / ``fc2.*``
``fused_encoder.layers.N.gamma_1`` / ``gamma_2``                             ``blocks.N.ls1.gamma`` / ``ls2.gamma``
===========================================================================  ===================================

``nn.MultiheadAttention``'s ``in_proj`` stacks q, k, v rows as timm's ``qkv`` does. There is no output norm
(``final_norm=False``); every LayerNorm has eps 1e-5. The spatial table has a row per patch of the ``input_size_2D``
default 512 x 512 (1024 rows), but MedCoSS indexes it with ``arange(H*W)`` and pre-trains 2D images at 224 px, so the
first 14 * 14 rows form the grid. In evaluation mode this reproduces MedCoSS's forward (checked against its code:
7e-7); in training mode MedCoSS adds a random temporal row (not reproduced). ``decoder_*``, ``mask_token``,
``token_embed.*``, ``mlm_head.*`` and the 3D embedding go to ``extra``.
"""
from __future__ import annotations

import math
import re

from nnunet_tpp.models.checkpoint_errors import ViTCheckpointError
from nnunet_tpp.models.vit import ViTConfig, vit_config

MEDCOSS_PRETRAIN_GRID = 14  # main_pretrain_medcoss.py builds the model with now_2D_input_size=(224, 224), patch 16
_MEDCOSS_LAYER = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")
_MEDCOSS_BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                  "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
                  "self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
                  "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
                  "linear1.weight": "mlp.fc1.weight", "linear1.bias": "mlp.fc1.bias",
                  "linear2.weight": "mlp.fc2.weight", "linear2.bias": "mlp.fc2.bias",
                  "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_MEDCOSS_TOP = {"cls_token": "cls_token",
                "video_embed.embeddings.weight": "patch_embed.proj.weight",
                "video_embed.embeddings.bias": "patch_embed.proj.bias",
                "video_embed.embeddings_norm.weight": "norm_pre.weight",
                "video_embed.embeddings_norm.bias": "norm_pre.bias"}
_MEDCOSS_SPATIAL = "video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight"
_MEDCOSS_TEMPORAL = "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight"



def convert_medcoss(state: dict, notes: list[str], grid: int, head_prefixes: tuple[str, ...]
                    ) -> tuple[dict, list[str], dict]:
    """Renames a MedCoSS state dict to this package's names (the table in
    :mod:`nnunet_tpp.models.vit_checkpoint`).

    Args:
        state: the unwrapped MedCoSS tensors; notes: receives the conversions made; grid: patches per side of
        MedCoSS's 2D pre-training; head_prefixes: key prefixes that are heads.
    Returns:
        ``(backbone tensors, head keys, other tensors)``. Raises ``ViTCheckpointError`` for a position table
        that cannot be the pre-training grid.
    """
    backbone, heads, extra = {}, [], {}
    for key, value in state.items():
        m = _MEDCOSS_LAYER.match(key)
        if m:
            backbone[f"blocks.{m.group(1)}.{_MEDCOSS_BLOCK.get(m.group(2), m.group(2))}"] = value
        elif key in _MEDCOSS_TOP:
            backbone[_MEDCOSS_TOP[key]] = value
        elif key.startswith("fused_encoder."):
            backbone[key] = value  # an unknown encoder part: reported as unexpected
        elif key in (_MEDCOSS_SPATIAL, _MEDCOSS_TEMPORAL):
            continue
        elif key.startswith(head_prefixes):
            heads.append(key)
        else:
            extra[key] = value
    if _MEDCOSS_SPATIAL in state:
        spatial = state[_MEDCOSS_SPATIAL]
        rows = spatial.shape[0]
        if rows >= grid * grid:
            used = grid * grid
        elif math.isqrt(rows) ** 2 == rows:
            used = rows
        else:
            raise ViTCheckpointError(f"MedCoSS spatial position table has {rows} rows, fewer than the "
                                     f"{grid}x{grid} grid of its 2D pre-training and not a square grid")
        pos = spatial[:used]
        if _MEDCOSS_TEMPORAL in state:
            pos = pos + state[_MEDCOSS_TEMPORAL][0]
            notes.append("MedCoSS temporal position 0 added to the patch positions")
        side = math.isqrt(used)
        notes.append(f"MedCoSS spatial positions: first {used} of {rows} rows used as the {side}x{side} grid")
        backbone["pos_embed"] = pos[None]
    return backbone, heads, extra


def medcoss_config(**overrides) -> ViTConfig:
    """The :class:`ViTConfig` of MedCoSS's ViT-B/16 (224 px, 3 channels, layer scale 1e-3, no class-token
    position, LayerNorm on the patch tokens after the position embedding, no output norm, eps 1e-5) with
    ``overrides`` applied. MedCoSS trains with constant drop-path 0.1, which is left to the caller."""
    options = dict(img_size=224, patch_size=16, in_chans=3, layer_scale=1e-3, cls_pos_embed=False,
                   pre_norm=True, pre_norm_prefix=False, final_norm=False, eps=1e-5)
    options.update(overrides)
    return vit_config("vit_base", **options)
