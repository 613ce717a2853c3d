"""nnU-Net's own CNNs (``dynamic_network_architectures``: ``PlainConvUNet`` of the default plans,
``ResidualEncoderUNet`` of the ResEnc M/L/XL presets) as PEFT backbones.

nnU-Net builds them from the plans (``get_network_from_plans``); this module adds what PEFT needs and the classes
do not say themselves: where methods attach (:func:`describe_unet`, which :func:`nnunet_tpp.models.sites.describe`
finds in :data:`NNUNET_DESCRIBERS`), which modules are the task heads (``decoder.seg_layers``), an architecture id
for adapter files, and a residual block whose end can take the lean memory path.
"""
from __future__ import annotations

import hashlib

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn

from nnunet_tpp.models.lean_autograd import residual_join
from nnunet_tpp.models.site_types import BLOCK, HEAD, SHORTCUT, UPSAMPLE, ConvSite, NetworkSites

HEAD_PREFIXES = ("decoder.seg_layers",)


def _unit_site(name: str, unit: ConvDropoutNormReLU, block: str, index: int, role: str = BLOCK,
               with_act: bool = True) -> ConvSite:
    """The site of one conv-(dropout)-norm-nonlin unit. With dropout between conv and norm, or the nonlinearity
    before the norm, the norm does not act on the conv's output directly: no norm is recorded then."""
    mods = list(unit.all_modules)
    norm = getattr(unit, "norm", None)
    nonlin = getattr(unit, "nonlin", None)
    direct = norm is not None and len(mods) > 1 and mods[1] is norm
    act_direct = direct and nonlin is not None and len(mods) > 2 and mods[2] is nonlin and with_act
    return ConvSite(f"{name}.conv", role, block, index, f"{name}.norm" if direct else None,
                    f"{name}.nonlin" if act_direct else None)


def _k_by_k(unit: ConvDropoutNormReLU) -> bool:
    return max(unit.conv.kernel_size) > 1


def _describe_block(name: str, block: nn.Module, convs: list[ConvSite], blocks: list[str]) -> None:
    blocks.append(name)
    if isinstance(block, BasicBlockD):
        convs.append(_unit_site(f"{name}.conv1", block.conv1, name, 0))
        convs.append(_unit_site(f"{name}.conv2", block.conv2, name, 1))
    elif isinstance(block, BottleneckD):
        index = 0
        for attr in ("conv1", "conv2", "conv3"):
            unit = getattr(block, attr)
            convs.append(_unit_site(f"{name}.{attr}", unit, name, index if _k_by_k(unit) else -1))
            index += _k_by_k(unit)
    elif isinstance(block, StackedConvBlocks):
        index = 0
        for j, unit in enumerate(block.convs):
            convs.append(_unit_site(f"{name}.convs.{j}", unit, name, index if _k_by_k(unit) else -1))
            index += _k_by_k(unit)
        return
    skip = getattr(block, "skip", None)
    if isinstance(skip, nn.Sequential):
        for j, part in enumerate(skip):
            if isinstance(part, ConvDropoutNormReLU):
                convs.append(_unit_site(f"{name}.skip.{j}", part, name, -1, SHORTCUT))


def _describe_stage(name: str, stage: nn.Module, convs: list[ConvSite], blocks: list[str]) -> None:
    """A stage is a StackedConvBlocks (plain), a StackedResidualBlocks (``.blocks``) or a Sequential holding one."""
    if isinstance(stage, StackedConvBlocks):
        _describe_block(name, stage, convs, blocks)
    elif hasattr(stage, "blocks"):
        for b, block in enumerate(stage.blocks):
            _describe_block(f"{name}.blocks.{b}", block, convs, blocks)
    elif isinstance(stage, nn.Sequential):
        for i, part in enumerate(stage):
            _describe_stage(f"{name}.{i}", part, convs, blocks)


def describe_unet(net: nn.Module) -> NetworkSites:
    """Sites of a dynamic_network_architectures U-Net: the encoder's stem and stages (plain conv stages or
    residual blocks), the decoder's stages, its transposed-conv upsampling and its segmentation layers."""
    convs: list[ConvSite] = []
    blocks: list[str] = []
    stem = getattr(net.encoder, "stem", None)
    if stem is not None:
        _describe_stage("encoder.stem", stem, convs, blocks)
    for i, stage in enumerate(net.encoder.stages):
        _describe_stage(f"encoder.stages.{i}", stage, convs, blocks)
    decoder = net.decoder
    for s, stage in enumerate(decoder.stages):
        convs.append(ConvSite(f"decoder.transpconvs.{s}", UPSAMPLE))
        _describe_stage(f"decoder.stages.{s}", stage, convs, blocks)
        convs.append(ConvSite(f"decoder.seg_layers.{s}", HEAD))
    return NetworkSites(tuple(convs), tuple(blocks), tuple(f"encoder.stages.{i}" for i in range(len(net.encoder.stages))))


#: The describer of each nnU-Net network class (what :func:`nnunet_tpp.models.sites.describe` looks up).
NNUNET_DESCRIBERS = {PlainConvUNet: describe_unet, ResidualEncoderUNet: describe_unet}


class LeanTailBasicBlockD(BasicBlockD):
    """nnU-Net's ``BasicBlockD`` whose end (norm, residual sum, nonlinearity) goes through
    :func:`nnunet_tpp.models.lean_autograd.residual_join`: the same computation, and a lean backward when memory
    paths are on.
    Only for blocks without stochastic depth and squeeze-excitation."""

    lean_residual_join = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        y = self.conv1(x)
        unit = self.conv2
        pre_norm = unit.conv(y)
        if getattr(unit, "dropout", None) is not None:
            pre_norm = unit.dropout(pre_norm)
        return residual_join(unit.norm, self.nonlin2, pre_norm, residual)


def prepare_unet(net: nn.Module) -> nn.Module:
    """Readies a freshly built nnU-Net U-Net for PEFT in place: task heads, architecture id, lean residual tails.

    Returns:
        ``net``.
    """
    net.head_prefixes = HEAD_PREFIXES
    for module in net.modules():
        if (type(module) is BasicBlockD and not module.apply_stochastic_depth and not module.apply_se
                and isinstance(module.nonlin2, nn.Module) and list(module.conv2.all_modules)[-1] is module.conv2.norm):
            module.__class__ = LeanTailBasicBlockD
    net.architecture_id = architecture_id(net)
    return net


def architecture_id(net: nn.Module, head_prefixes: tuple[str, ...] = HEAD_PREFIXES) -> str:
    """``<class>-<hash>``: the class and a short hash of every backbone tensor's name and shape (the modules under
    ``head_prefixes`` excluded, since a new label set changes them), e.g. ``ResidualEncoderUNet-3f2a9c1d``."""
    digest = hashlib.blake2b(digest_size=4)
    for name, tensor in net.state_dict().items():
        if not any(name.startswith(p + ".") for p in head_prefixes):
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return f"{type(net).__name__}-{digest.hexdigest()}"


def build_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool = True) -> nn.Module:
    """The network an nnU-Net configuration describes, built by nnU-Net's own ``get_network_from_plans`` (with its
    weight initialisation), readied for PEFT (:func:`prepare_unet`).

    Raises:
        ValueError: the plans describe an architecture other than PlainConvUNet / ResidualEncoderUNet.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    name = configuration_manager.network_arch_class_name
    if name.split(".")[-1] not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ValueError(f"the plans describe {name}; the _nnUNet trainers adapt PlainConvUNet (default plans) and "
                         f"ResidualEncoderUNet (ResEnc presets)")
    net = get_network_from_plans(name, configuration_manager.network_arch_init_kwargs,
                                 configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                 num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)
    return prepare_unet(net)
