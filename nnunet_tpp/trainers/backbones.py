"""The kinds of backbone a PEFT trainer adapts: a published STU-Net (sizes S/B/L/H), the nnU-Net network its plans
describe (``PlainConvUNet``, ``ResidualEncoderUNet``), or nnU-Net's transformer Primus (a size of nnU-Net's Primus
trainers, ``Primus_M``, ``PrimusV3_S`` ..., or ``Primus``: the Primus the plans describe). Each knows how to build
itself for an nnU-Net configuration and how to load its pre-trained checkpoints; everything else (PEFT, memory
paths, optimiser, TPP) lives in the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.models.stunet_checkpoint import LoadReport


@dataclass(frozen=True)
class Backbone:
    """One backbone choice of a trainer class.

    Attributes:
        key: ``S``/``B``/``L``/``H`` (STU-Net sizes), ``nnUNet`` (the plans' network), a Primus size (``Primus_S`` ...
            ``Primus_L``, ``PrimusV3_S`` ... ``PrimusV3_L``) or ``Primus`` (the Primus the plans describe).
    """

    key: str

    @property
    def is_stunet(self) -> bool:
        from nnunet_tpp.models.stunet import SIZES
        return self.key in SIZES

    @property
    def is_primus(self) -> bool:
        from nnunet_tpp.models.primus import is_primus_backbone
        return is_primus_backbone(self.key)

    @property
    def suffix(self) -> str:
        """The trainer-name suffix: ``_S`` ... ``_H`` or ``_nnUNet``."""
        return f"_{self.key}"

    def label(self, configuration_manager=None) -> str:
        """What is adapted, for the log: ``STU-Net-B`` or ``the plans' ResidualEncoderUNet``."""
        if self.is_stunet:
            return f"STU-Net-{self.key}"
        if self.is_primus:
            from nnunet_tpp.models.primus import PLANS_BACKBONE, TRAINER_PRESETS, spec_for_backbone
            if configuration_manager is not None:
                try:
                    return spec_for_backbone(self.key, configuration_manager).describe()
                except ValueError:
                    pass
            return "the plans' Primus" if self.key == PLANS_BACKBONE else TRAINER_PRESETS[self.key].describe()
        name = configuration_manager.network_arch_class_name.split(".")[-1] if configuration_manager else "network"
        return f"the plans' {name}"

    def checkpoint_hint(self) -> str:
        """What ``-pretrained_weights`` expects."""
        if self.is_stunet:
            return f"-pretrained_weights STUNet_{self.key}.model (a published STU-Net-{self.key} checkpoint)"
        if self.is_primus:
            return ("-pretrained_weights checkpoint_final.pth (an nnssl Primus checkpoint whose plans "
                    "`nnunet-tpp adopt-plans` wrote, or an nnU-Net checkpoint of this Primus)")
        return ("-pretrained_weights MODEL/fold_0/checkpoint_final.pth (an nnU-Net v2 model trained with these "
                "plans, or an nnssl checkpoint)")

    def build(self, configuration_manager, num_input_channels: int, num_output_channels: int,
              enable_deep_supervision: bool) -> nn.Module:
        """The randomly initialised backbone for an nnU-Net configuration (no PEFT yet)."""
        if self.is_stunet:
            from nnunet_tpp.models.stunet import stunet_from_plans
            return stunet_from_plans(self.key, configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision)
        if self.is_primus:  # one output, no deep supervision (as nnU-Net's Primus trainers)
            from nnunet_tpp.models.primus import primus_from_plans
            return primus_from_plans(self.key, configuration_manager, num_input_channels, num_output_channels)
        from nnunet_tpp.models.nnunet_networks import build_from_plans
        return build_from_plans(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)

    def load(self, network: nn.Module, path: str, new_keys: set[str], check_only: bool = False) -> LoadReport:
        """Loads a pre-trained checkpoint into ``network`` (PEFT applied); raises ``CheckpointError`` naming the
        problem and the fix, leaving the network unchanged. ``check_only`` compares names and shapes only."""
        if self.is_stunet:
            from nnunet_tpp.models.stunet_checkpoint import load_stunet_checkpoint
            return load_stunet_checkpoint(network, path, new_keys=new_keys, check_only=check_only)
        from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
        return load_nnunet_checkpoint(network, path, new_keys=new_keys, check_only=check_only)


NNUNET = "nnUNet"
DEFAULT_STUNET_SIZE = "B"


def backbone_of(key: str | None) -> Backbone:
    """The backbone for a spec or recipe key (None: STU-Net-B, for plans written before backbones had a key)."""
    return Backbone(key or DEFAULT_STUNET_SIZE)
