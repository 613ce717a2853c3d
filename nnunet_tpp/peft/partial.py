"""Partial fine-tuning (Khan & Fang, "Revisiting Fine-Tuning Strategies for Self-supervised Medical Imaging
Analysis"): every parameter of one chosen quarter of the transformer blocks trains, plus the heads; the
rest of the backbone stays frozen. With depth d, quarter q (1..4) is blocks ``(q-1) d // 4`` to
``q d // 4 - 1`` (depth 12, q = 2: blocks 3, 4, 5).

``quarter: auto`` (the default) picks the quarter the paper found best for the backbone's self-supervised
pre-training: the **3rd** after restorative SSL (MAE, MedCoSS), the **2nd** after contrastive SSL (DINO, DINOv2,
Path-DINO). The pre-training is data on each ViT (``VisionTransformer.pretraining``, set by the checkpoint
loader from ``--backbone-format`` or the file: :mod:`nnunet_tpp.models.vit_pretraining`), so every backbone of a
combined classifier gets its own. A ViT whose pre-training is unknown (random initialisation, or a checkpoint
that does not name one, e.g. a supervised timm checkpoint) is an error asking for the quarter; an explicit
quarter (1..4) always wins.

The chosen blocks depend on the model, so the method names them through ``trained_modules`` (kept in
``model.peft_config``). Nothing is added to the network, so merging does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.models.vit_pretraining import PRETRAININGS, pretraining_kind
from nnunet_tpp.peft.modules import qualified, transformers
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

AUTO_QUARTER = {"restorative": 3, "contrastive": 2}  # Khan & Fang's best quarter per kind of SSL


@dataclass(frozen=True)
class PartialOptions:
    """Knobs of :class:`PartialMethod`.

    Attributes:
        quarter: which quarter of the blocks trains, 1 (first) to 4 (last), or ``auto`` (3 after restorative,
            2 after contrastive pre-training).
    """

    quarter: int | str = "auto"

    def validate(self) -> None:
        """Raises :class:`PeftError` unless quarter is 1, 2, 3, 4 or ``auto``."""
        if self.quarter == "auto":
            return
        if self.quarter not in (1, 2, 3, 4) or isinstance(self.quarter, bool):
            raise PeftError(f"partial: quarter must be 1, 2, 3, 4 or auto, got {self.quarter!r}")


def quarter_blocks(depth: int, quarter: int) -> range:
    """The 0-based block indices of ``quarter`` (1..4) of ``depth`` blocks."""
    return range((quarter - 1) * depth // 4, quarter * depth // 4)


def auto_quarter(pretraining: str | None) -> int:
    """The quarter ``auto`` picks for a pre-training name (:data:`~nnunet_tpp.models.vit_pretraining.PRETRAININGS`).

    Raises:
        PeftError: the pre-training is unknown (None or another name); the message asks for the quarter.
    """
    kind = pretraining_kind(pretraining)
    if kind is None:
        what = "random initialisation or a checkpoint that does not name its pre-training, e.g. a supervised " \
               "timm checkpoint" if pretraining is None else f"pre-training {pretraining!r}"
        raise PeftError(
            f"partial: quarter auto picks the quarter from the backbone's self-supervised pre-training (3 after "
            f"restorative: mae, medcoss; 2 after contrastive: dino, dinov2, path_dino; Khan & Fang), and this "
            f"backbone's is unknown ({what}). Give the quarter: quarter=N with N in 1..4 (train2d: "
            f"--method-option quarter=N), or name the pre-training with --backbone-format "
            f"{'|'.join(PRETRAININGS)}")
    return AUTO_QUARTER[kind]


def resolve_quarter(vit: nn.Module, quarter: int | str) -> int:
    """``quarter`` itself, or for ``auto`` the quarter of ``vit.pretraining`` (:func:`auto_quarter`)."""
    return auto_quarter(getattr(vit, "pretraining", None)) if quarter == "auto" else int(quarter)


@register
class PartialMethod(PeftMethod):
    """Registry entry ``partial``."""

    name = "partial"
    models = ("ViT",)
    options = PartialOptions
    mergeable = True
    adds_parameters = False
    description = "one quarter of the transformer blocks + heads (Khan & Fang; auto: by pre-training)"

    def inject(self, model: nn.Module, opts: PartialOptions) -> None:
        """Checks that every ViT of the model has blocks in the chosen quarter (nothing is added)."""
        self.trained_modules(model, opts)

    def trained_modules(self, model: nn.Module, opts: PartialOptions) -> tuple[str, ...]:
        """The chosen quarter of the described blocks of every transformer in the model, e.g. ``backbone.blocks.3``."""
        prefixes = []
        for name, net, description in transformers(model, self.name):
            quarter = resolve_quarter(net, opts.quarter)
            blocks = quarter_blocks(len(description.blocks), quarter)
            if not blocks:
                raise PeftError(f"partial: quarter {quarter} of a depth-{len(description.blocks)} transformer has no "
                                f"blocks")
            prefixes += [qualified(name, description.blocks[i]) for i in blocks]
        return tuple(prefixes)
