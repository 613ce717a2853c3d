"""Partial fine-tuning (Khan & Fang, "Revisiting Fine-Tuning Strategies for Self-supervised Medical Imaging
Analysis"): every parameter of one chosen quarter of the transformer blocks trains, plus the heads; the
rest of the backbone stays frozen. With depth d, quarter q (1..4) is blocks ``(q-1) d // 4`` to
``q d // 4 - 1`` (depth 12, q = 2: blocks 3, 4, 5).

The chosen blocks depend on the model's depth, so the method names them through ``trained_modules`` (kept
in ``model.peft_config``). Nothing is added to the network, so merging does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.peft.modules import find_vits
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class PartialOptions:
    """Knobs of :class:`PartialMethod`.

    Attributes:
        quarter: which quarter of the blocks trains, 1 (first) to 4 (last).
    """

    quarter: int = 2

    def validate(self) -> None:
        """Raises :class:`PeftError` unless quarter is 1, 2, 3 or 4."""
        if self.quarter not in (1, 2, 3, 4) or isinstance(self.quarter, bool):
            raise PeftError(f"partial: quarter must be 1, 2, 3 or 4, got {self.quarter!r}")


def quarter_blocks(depth: int, quarter: int) -> range:
    """The 0-based block indices of ``quarter`` (1..4) of ``depth`` blocks."""
    return range((quarter - 1) * depth // 4, quarter * depth // 4)


@register
class PartialMethod(PeftMethod):
    """Registry entry ``partial``."""

    name = "partial"
    models = ("ViT",)
    options = PartialOptions
    mergeable = True
    adds_parameters = False
    description = "one quarter of the transformer blocks + heads (Khan & Fang)"

    def inject(self, model: nn.Module, opts: PartialOptions) -> None:
        """Checks that every ViT of the model has blocks in the chosen quarter (nothing is added)."""
        self.trained_modules(model, opts)

    def trained_modules(self, model: nn.Module, opts: PartialOptions) -> tuple[str, ...]:
        """The chosen quarter's blocks of every ViT in the model, e.g. ``backbone.blocks.3``."""
        prefixes = []
        for name, vit in find_vits(model, self.name):
            blocks = quarter_blocks(len(vit.blocks), int(opts.quarter))
            if not blocks:
                raise PeftError(f"partial: quarter {opts.quarter} of a depth-{len(vit.blocks)} ViT has no blocks")
            prefixes += [f"{name}.blocks.{i}" if name else f"blocks.{i}" for i in blocks]
        return tuple(prefixes)
