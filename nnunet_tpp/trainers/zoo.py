"""Every trainer name nnU-Net can be asked for: one class per family (``recipes.yaml``) and size.

``ConvAdapterTrainer`` builds STU-Net-B; ``ConvAdapterTrainer_S``/``_B``/``_L``/``_H`` pick the size.
The classes are generated from the recipe table so that adding a family is one line of YAML.
"""
from __future__ import annotations

from nnunet_tpp.models.stunet import SIZES
from nnunet_tpp.trainers.base import STUNetPeftTrainer
from nnunet_tpp.trainers.recipe import _family_defaults
from nnunet_tpp.trainers.tpp import STUNetTPPTrainer

DEFAULT_SIZE = "B"
FROM_SCRATCH = {"STUNetTrainer"}


def _make_family(family: str) -> dict[str, type]:
    fields = _family_defaults()[family]
    doc = (f"nnU-Net trainer: STU-Net-{{size}} with PEFT method {fields['method']!r}"
           + (" (trained from scratch)" if family in FROM_SCRATCH else
              " on a pre-trained backbone (-pretrained_weights)")
           + (", its target parameters first pre-trained with DINO on the fold's images (TPP)" if fields.get("tpp")
              else "") + ".")
    attrs = {"family": family, "expects_pretrained": family not in FROM_SCRATCH, "__module__": __name__}
    parent = STUNetTPPTrainer if fields.get("tpp") else STUNetPeftTrainer
    base = type(family, (parent,), {**attrs, "stunet_size": DEFAULT_SIZE,
                                               "__doc__": doc.format(size=DEFAULT_SIZE)})
    classes = {family: base}
    for size in SIZES:
        name = f"{family}_{size}"
        classes[name] = type(name, (base,), {"stunet_size": size, "__module__": __name__,
                                             "__doc__": doc.format(size=size)})
    return classes


TRAINERS: dict[str, type] = {}
for _family in _family_defaults():
    TRAINERS.update(_make_family(_family))
globals().update(TRAINERS)
__all__ = sorted(TRAINERS)
