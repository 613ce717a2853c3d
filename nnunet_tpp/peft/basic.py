"""Methods that add no parameters: full fine-tuning, linear probing (heads only) and BitFit (biases)."""
from __future__ import annotations

from nnunet_tpp.peft.registry import PeftMethod, register


@register
class Full(PeftMethod):
    """Every parameter trains (the baseline PEFT is measured against)."""

    name = "full"
    description = "full fine-tuning: every parameter"

    def trains(self, name: str) -> bool:
        return True


@register
class LinearProbe(PeftMethod):
    """Only the task heads train; the backbone is frozen."""

    name = "linear_probe"
    description = "the task heads only"


@register
class BitFit(PeftMethod):
    """Bias terms of every layer (convolutions and normalisations) and the heads train (Zaken et al., 2022)."""

    name = "bitfit"
    description = "all bias terms + heads"

    def trains(self, name: str) -> bool:
        return name.endswith(".bias")
