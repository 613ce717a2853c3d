"""Every trainer name nnU-Net can be asked for: one class per family (``recipes.yaml``) and backbone.

``ConvAdapterTrainer_S``/``_B``/``_L``/``_H`` adapt a published STU-Net of that size (``ConvAdapterTrainer`` alone is
``_B``); ``ConvAdapterTrainer_nnUNet`` adapts the network the plans describe (nnU-Net's ``PlainConvUNet`` or
``ResidualEncoderUNet``), started from an nnU-Net or nnssl checkpoint. ``FullFinetuneTrainer_Primus_M``,
``LinearProbeTrainer_PrimusV3_S`` ... adapt nnU-Net's transformer Primus at the sizes nnU-Net's Primus trainers
build, and ``..._Primus`` the Primus the plans describe (plans adopted from an nnssl checkpoint), with the
optimisation of nnU-Net's Primus trainers (:mod:`nnunet_tpp.trainers.primus`); they exist for the families whose
method runs on Primus (:data:`nnunet_tpp.trainers.primus.PRIMUS_METHODS`), their TPP families included
(``TPPLoRATrainer_Primus_M``, ``TPPAdapterTrainer_PrimusV3_S``: the masked-reconstruction stage on Primus,
:mod:`nnunet_tpp.pretext.masked_tokens`). A family whose method adapts transformers only (``AdapterTrainer``,
``TPPAdapterTrainer``) has Primus trainers only. The classes are generated from the recipe table, so adding a
family is one line of YAML.
"""
from __future__ import annotations

from nnunet_tpp.models.primus import PLANS_BACKBONE, TRAINER_PRESETS
from nnunet_tpp.models.stunet import SIZES
from nnunet_tpp.peft import get_method
from nnunet_tpp.trainers.backbones import DEFAULT_STUNET_SIZE, NNUNET, backbone_of
from nnunet_tpp.trainers.base import PeftTrainer
from nnunet_tpp.trainers.primus import PRIMUS_METHODS, PrimusTrainerMixin
from nnunet_tpp.trainers.recipe import recipe_families
from nnunet_tpp.trainers.tpp import TPPTrainer

FROM_SCRATCH = {"STUNetTrainer"}  # STU-Net trained from scratch: no nnU-Net variant (that is nnUNetTrainer)
BACKBONES = (*SIZES, NNUNET)
PRIMUS_BACKBONES = (*TRAINER_PRESETS, PLANS_BACKBONE)


def _doc(family: str, fields: dict, key: str) -> str:
    backbone = backbone_of(key)
    what = (backbone.label() if backbone.is_stunet or key in TRAINER_PRESETS else "the Primus the plans describe"
            if key == PLANS_BACKBONE else "the network of the plans (PlainConvUNet / ResidualEncoderUNet)")
    start = " (trained from scratch)" if family in FROM_SCRATCH else f" from {backbone.checkpoint_hint()}"
    tpp = (", its target parameters first pre-trained on the fold's images (TPP: masked reconstruction or DINO, "
           "the recipe's pretext)") if fields.get("tpp") else ""
    return f"nnU-Net trainer: {what} with PEFT method {fields['method']!r}{start}{tpp}."


def _make_family(family: str) -> dict[str, type]:
    fields = recipe_families()[family]
    parent = TPPTrainer if fields.get("tpp") else PeftTrainer
    attrs = {"family": family, "expects_pretrained": family not in FROM_SCRATCH, "__module__": __name__}
    base = type(family, (parent,), {**attrs, "backbone": backbone_of(DEFAULT_STUNET_SIZE),
                                    "__doc__": _doc(family, fields, DEFAULT_STUNET_SIZE)})
    cnn = "STUNet" in get_method(fields["method"]).models
    classes = {family: base} if cnn else {}
    for key in BACKBONES if cnn else ():
        if key == NNUNET and family in FROM_SCRATCH:
            continue
        name = f"{family}_{key}"
        classes[name] = type(name, (base,), {"backbone": backbone_of(key), "__module__": __name__,
                                             "__doc__": _doc(family, fields, key)})
    if fields["method"] in PRIMUS_METHODS and family not in FROM_SCRATCH:
        for key in PRIMUS_BACKBONES:
            name = f"{family}_{key}"
            classes[name] = type(name, (PrimusTrainerMixin, base), {"backbone": backbone_of(key),
                                                                    "__module__": __name__,
                                                                    "__doc__": _doc(family, fields, key)})
    return classes


TRAINERS: dict[str, type] = {}
for _family in recipe_families():
    TRAINERS.update(_make_family(_family))
globals().update(TRAINERS)
__all__ = sorted(TRAINERS)
