"""What a ViT checkpoint's pre-training decides downstream, as data: the self-supervised pre-trainings the
package knows (their kind, which ``partial``'s ``quarter: auto`` reads) and the position-embedding
resampling rule of each checkpoint family's own code.

Pre-training (``model.pretraining``, what ``partial``'s ``quarter: auto`` reads): ``fmt`` ``mae``,
``medcoss``, ``dino``, ``path_dino`` or ``dinov2`` names it. For ``auto`` and ``timm`` it is read from the file:
a ``pretraining`` entry (written by
:func:`~nnunet_tpp.models.vit_checkpoint.save_vit_checkpoint`), the MedCoSS or DINOv2 layout, an MAE decoder
(``decoder_*`` keys: ``mae``), or DINO's ``teacher`` container (``dino``); otherwise it is unknown (None: e.g.
a supervised timm checkpoint).

==============  ==================  ==========================================================
pre-training    kind                position-embedding resampling (the checkpoint's own code)
==============  ==================  ==========================================================
mae, medcoss    restorative         MAE ``interpolate_pos_embed``: bicubic to the size, no antialias
dino            contrastive         DINO ``interpolate_pos_encoding``: scale factor (g + 0.1) / M
dinov2          contrastive         DINOv2 ``interpolate_pos_encoding``: offset 0.1, no antialias;
                                    with registers (the hub's ``_reg`` models) offset 0, antialias
path_dino       contrastive         timm ``resample_abs_pos_embed`` (its authors load it into timm)
unknown         --                  timm ``resample_abs_pos_embed``: bicubic to the size, antialias
==============  ==================  ==========================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PosResampling:
    """How a square grid of patch position embeddings is resampled to another grid: always bicubic with
    ``align_corners=False``, in float32.

    Attributes:
        name: the rule's name (a key of :data:`RESAMPLING`).
        antialias: ``F.interpolate(..., antialias=True)`` (timm's ``resample_abs_pos_embed``). PyTorch's
            antialiased bicubic kernel uses a = -0.5 (PIL's) instead of -0.75, so it differs even when upsampling.
        offset: DINO's "small number": when > 0 the interpolation is given ``scale_factor = (g + offset) / M``
            per axis (M the checkpoint grid, g the new one) instead of an output size, so the sampling
            positions follow that scale (DINO / DINOv2 ``interpolate_pos_encoding``, offset 0.1).
    """

    name: str
    antialias: bool = False
    offset: float = 0.0


# The rule of each checkpoint family's own code:
#   mae        MAE util/pos_embed.py interpolate_pos_embed (size, no antialias); MedCoSS as MAE
#   timm       timm layers/pos_embed.py resample_abs_pos_embed (size, antialias=True), also Path-DINO (loaded
#              into timm's VisionTransformer by its authors' code)
#   dino       DINO vision_transformer.py interpolate_pos_encoding (scale factor (g + 0.1) / M, no antialias)
#   dinov2     DINOv2 vision_transformer.py interpolate_pos_encoding with the hub's defaults for the plain
#              models (interpolate_offset 0.1, interpolate_antialias False)
#   dinov2_reg the same for the hub's register models (interpolate_offset 0, interpolate_antialias True)
RESAMPLING: dict[str, PosResampling] = {
    "mae": PosResampling("mae"),
    "timm": PosResampling("timm", antialias=True),
    "dino": PosResampling("dino", offset=0.1),
    "dinov2": PosResampling("dinov2", offset=0.1),
    "dinov2_reg": PosResampling("dinov2_reg", antialias=True),
}


@dataclass(frozen=True)
class Pretraining:
    """A self-supervised pre-training a checkpoint can come from.

    Attributes:
        name: ``mae``, ``medcoss``, ``dino``, ``dinov2`` or ``path_dino``.
        kind: ``restorative`` (masked-image reconstruction) or ``contrastive`` (self-distillation); Khan & Fang
            find the 3rd quarter of the blocks best to fine-tune after restorative SSL, the 2nd after contrastive.
        resampling: the key of its :data:`RESAMPLING` rule.
    """

    name: str
    kind: str
    resampling: str


PRETRAININGS: dict[str, Pretraining] = {
    "mae": Pretraining("mae", "restorative", "mae"),
    "medcoss": Pretraining("medcoss", "restorative", "mae"),
    "dino": Pretraining("dino", "contrastive", "dino"),
    "path_dino": Pretraining("path_dino", "contrastive", "timm"),
    "dinov2": Pretraining("dinov2", "contrastive", "dinov2"),
}



def pretraining_kind(name: str | None) -> str | None:
    """``restorative`` / ``contrastive`` for a name of :data:`PRETRAININGS`, None for None or an unknown name."""
    entry = PRETRAININGS.get(name) if name else None
    return entry.kind if entry else None


def pretraining_from_contents(requested: str, top: dict, state: dict, container: str, layout: str) -> str | None:
    """The pre-training a checkpoint comes from (module docstring), or None when nothing names it.

    Args:
        requested: the ``fmt`` asked for (``auto``, ``timm``, or a pre-training name).
        top: the file's top-level dict; state: its (unwrapped) tensors; container: where they were
        (``teacher``, ``model``, ...); layout: the detected key layout (``timm``, ``dinov2``, ``medcoss``).
    Returns:
        A name of :data:`PRETRAININGS`, or None.
    """
    if requested in PRETRAININGS:
        return requested
    named = top.get("pretraining")
    if isinstance(named, str) and named in PRETRAININGS:
        return named
    if layout in ("medcoss", "dinov2"):
        return layout
    if any(k.startswith("decoder") for k in state):
        return "mae"
    if container.split("/")[0] == "teacher":
        return "dino"
    return None


def resampling_for(pretraining: str | None, state: dict) -> str:
    """The name of the resampling rule of the checkpoint's own code (module docstring) for a pre-training
    (None: unknown, timm's) and the checkpoint's tensors (DINOv2 register models have their own)."""
    if pretraining is None:
        return "timm"
    rule = PRETRAININGS[pretraining].resampling
    if rule == "dinov2" and ("register_tokens" in state or "reg_token" in state):
        return "dinov2_reg"
    return rule


def resample_patch_pos_embed(pos: torch.Tensor, grid: tuple[int, int],
                             rule: PosResampling | str = "mae") -> torch.Tensor:
    """Resizes a square patch position embedding to another grid.

    Args:
        pos: (1, N, D) patch positions of a square grid (no class-token position).
        grid: the new (rows, cols).
        rule: a :class:`PosResampling` or the name of one in :data:`RESAMPLING` (default MAE's: bicubic to
            the output size, no antialiasing). Rules without an offset are timm's ``resample_abs_pos_embed``.
    Returns:
        (1, rows * cols, D) in ``pos``'s dtype; ``pos`` itself when the grid is already ``grid``.
    """
    rule = RESAMPLING[rule] if isinstance(rule, str) else rule
    n = pos.shape[1]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    grid = (int(grid[0]), int(grid[1]))
    if (side, side) == grid:
        return pos
    if rule.offset <= 0:
        from timm.layers import resample_abs_pos_embed  # (timm is imported only where a ViT is used)
        return resample_abs_pos_embed(pos, list(grid), (side, side), num_prefix_tokens=0, antialias=rule.antialias)
    img = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    scale = ((grid[0] + rule.offset) / side, (grid[1] + rule.offset) / side)
    img = F.interpolate(img, scale_factor=scale, mode="bicubic", align_corners=False, antialias=rule.antialias)
    if tuple(img.shape[-2:]) != grid:
        raise ValueError(f"resampling rule {rule.name} gave a {tuple(img.shape[-2:])} grid instead of {grid}")
    return img.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
