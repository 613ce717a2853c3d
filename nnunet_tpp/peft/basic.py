"""Methods that add no parameters: full fine-tuning, linear probing (heads only) and BitFit (biases)."""
from __future__ import annotations

from nnunet_tpp.models.sites import NoDescriptionError, cancelled_biases
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
    """Bias terms of every layer (convolutions and normalisations) and the heads train (Zaken et al., 2022).

    A convolution bias that the norm right after it cancels (instance norm: STU-Net's and nnU-Net's block convs)
    gets an exactly zero gradient; it stays frozen, which changes nothing the network computes."""

    name = "bitfit"
    description = "all bias terms + heads (except biases a following norm cancels)"

    def trains(self, name: str) -> bool:
        return name.endswith(".bias")

    def never_trained(self, model, opts) -> tuple[str, ...]:
        try:
            return tuple(cancelled_biases(model))
        except NoDescriptionError:
            return ()
