"""STU-Net (Huang et al., 2023) with the published parameter names, sizes S/B/L/H.

The module tree (``conv_blocks_context``, ``upsample_layers``, ``conv_blocks_localization``,
``seg_outputs``) reproduces the published state-dict layout key for key, so published checkpoints load
without renaming (see :mod:`nnunet_tpp.models.stunet_checkpoint`). No weight depends on the plan's
strides or patch size: downsampling is a strided conv, upsampling is nearest interpolation + 1x1x1 conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nnunet_tpp.models.lean_autograd import residual_join
from nnunet_tpp.models.sites import BLOCK, HEAD, SHORTCUT, UPSAMPLE, ConvSite, NetworkSites

NUM_POOLS = 5


@dataclass(frozen=True)
class STUNetSize:
    """Width and depth of one published STU-Net size."""

    name: str
    base_width: int
    depth: int

    @property
    def dims(self) -> list[int]:
        return [self.base_width * m for m in (1, 2, 4, 8, 16, 16)]


#: A key every STU-Net state dict has (the first convolution of the encoder).
STUNET_MARKER = "conv_blocks_context.0.0.conv1.weight"

SIZES: dict[str, STUNetSize] = {
    "S": STUNetSize("S", 16, 1),
    "B": STUNetSize("B", 32, 1),
    "L": STUNetSize("L", 64, 2),
    "H": STUNetSize("H", 96, 3),
}


def describe_stunet(state_dict: dict[str, torch.Tensor]) -> str:
    """Names the STU-Net size of a state dict (e.g. ``"STU-Net-B"``), or describes what it is instead."""
    if STUNET_MARKER not in state_dict:
        sample = ", ".join(sorted(state_dict)[:3])
        return f"not an STU-Net (keys like {sample})"
    width = state_dict[STUNET_MARKER].shape[0]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("conv_blocks_context.0.")})
    for spec in SIZES.values():
        if spec.base_width == width and spec.depth == depth:
            return f"STU-Net-{spec.name}"
    return f"an STU-Net of unpublished size (width {width}, depth {depth})"


class InstanceNorm(nn.InstanceNorm3d):
    """``InstanceNorm3d(affine=True)``. With ``fast_cpu_kernels`` it is computed as a group norm with one
    channel per group (the same formula; PyTorch's group-norm kernels keep channels-last tensors
    channels-last instead of copying them)."""

    fast_cpu_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_cpu_kernels and x.device.type == "cpu":
            return nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


class ResidualBlock(nn.Module):
    """conv-IN-LeakyReLU-conv-IN, plus a (1x1x1 conv) shortcut, then LeakyReLU."""

    lean_residual_join = True  # its end goes through nnunet_tpp.models.lean_autograd.residual_join

    def __init__(self, in_ch: int, out_ch: int, stride: Sequence[int] | int = 1, shortcut_conv: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm1 = InstanceNorm(out_ch, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.norm2 = InstanceNorm(out_ch, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(in_ch, out_ch, 1, stride=stride) if shortcut_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        return residual_join(self.norm2, self.act2, self.conv2(y), x, self.conv3)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by the pool size and a 1x1x1 conv to the skip's width.

    The published network upsamples first; a 1x1x1 conv commutes with nearest-neighbour replication, so the conv
    runs first, at the low resolution: the same output (to float rounding) for a fraction of the work and memory.
    """

    def __init__(self, in_ch: int, out_ch: int, scale: Sequence[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(x), scale_factor=self.scale, mode="nearest")


class _DecoderFlags(nn.Module):
    """Holds ``deep_supervision``, which nnU-Net toggles through ``network.decoder``."""

    def __init__(self, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision


def _stage(in_ch: int, out_ch: int, depth: int, stride) -> nn.Sequential:
    blocks = [ResidualBlock(in_ch, out_ch, stride, shortcut_conv=True)]
    blocks += [ResidualBlock(out_ch, out_ch) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class STUNet(nn.Module):
    """STU-Net: a residual U-Net with 6 stages and 5 poolings.

    Args:
        input_channels: image channels.
        num_classes: output channels of each segmentation head.
        depth: residual blocks per stage (6 values).
        dims: channels per stage (6 values).
        pool_op_kernel_sizes: 5 pool sizes (stride of each downsampling stage).
        enable_deep_supervision: when True ``forward`` returns a list of logits, highest resolution
            first; otherwise the full-resolution logits.
        fast_cpu_kernels: on CPU, run channels-last with group-norm kernels (about 2x faster training steps
            with oneDNN; results differ from the reference implementation by float rounding, ~1e-4).
            Off by default, so the network reproduces the published forward pass exactly.
    """

    head_prefixes = ("seg_outputs",)

    def __init__(self, input_channels: int, num_classes: int, depth: Sequence[int], dims: Sequence[int],
                 pool_op_kernel_sizes: Sequence[Sequence[int]], enable_deep_supervision: bool = True,
                 size_name: str | None = None, fast_cpu_kernels: bool = False):
        super().__init__()
        if len(dims) != NUM_POOLS + 1 or len(depth) != NUM_POOLS + 1 or len(pool_op_kernel_sizes) != NUM_POOLS:
            raise ValueError(f"STU-Net needs 6 stages and 5 pool sizes, got dims={list(dims)}, "
                             f"depth={list(depth)}, pools={list(pool_op_kernel_sizes)}")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.size_name = size_name
        self.pool_op_kernel_sizes = [list(p) for p in pool_op_kernel_sizes]
        self.decoder = _DecoderFlags(enable_deep_supervision)

        strides = [1] + self.pool_op_kernel_sizes
        self.conv_blocks_context = nn.ModuleList(
            _stage(input_channels if d == 0 else dims[d - 1], dims[d], depth[d], strides[d])
            for d in range(NUM_POOLS + 1))
        self.upsample_layers = nn.ModuleList(
            NearestUpsample(dims[-1 - u], dims[-2 - u], self.pool_op_kernel_sizes[-1 - u]) for u in range(NUM_POOLS))
        self.conv_blocks_localization = nn.ModuleList(
            _stage(2 * dims[-2 - u], dims[-2 - u], depth[-2 - u], 1) for u in range(NUM_POOLS))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(NUM_POOLS))
        self.fast_cpu_kernels = fast_cpu_kernels
        for module in self.modules():
            if isinstance(module, InstanceNorm):
                module.fast_cpu_kernels = fast_cpu_kernels

    @property
    def encoder_channels(self) -> list[int]:
        """Channels of each encoder stage's output (what :meth:`encode` returns)."""
        return [stage[-1].conv2.out_channels for stage in self.conv_blocks_context]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns the output of each encoder stage, highest resolution first (6 tensors)."""
        if self.fast_cpu_kernels and x.device.type == "cpu":
            self._use_channels_last()
            x = x.contiguous(memory_format=torch.channels_last_3d)
        features = []
        for stage in self.conv_blocks_context:
            x = stage(x)
            features.append(x)
        return features

    def _use_channels_last(self) -> None:
        """On CPU, oneDNN's 3-D convolutions (grouped ones most of all) are several times faster with
        channels-last weights and activations. Converts the weights once per change of the module tree
        (PEFT layers added later are converted too); values are unchanged."""
        count = sum(1 for _ in self.parameters())
        if getattr(self, "_channels_last_params", None) != count:
            self.to(memory_format=torch.channels_last_3d)
            self._channels_last_params = count

    def peft_sites(self) -> NetworkSites:
        """Where PEFT methods attach (see :mod:`nnunet_tpp.models.sites`): in every residual block ``conv1``
        (followed by ``norm1`` and ``act1``), ``conv2`` (followed by ``norm2``, then the residual sum) and the
        shortcut ``conv3``; the upsampling 1x1x1 convolutions; the heads."""
        convs, blocks = [], []

        def add_stage(prefix: str, stage: nn.Sequential) -> None:
            for b, block in enumerate(stage):
                name = f"{prefix}.{b}"
                blocks.append(name)
                convs.append(ConvSite(f"{name}.conv1", BLOCK, name, 0, f"{name}.norm1", f"{name}.act1"))
                convs.append(ConvSite(f"{name}.conv2", BLOCK, name, 1, f"{name}.norm2", None))
                if block.conv3 is not None:
                    convs.append(ConvSite(f"{name}.conv3", SHORTCUT, name))

        for d, stage in enumerate(self.conv_blocks_context):
            add_stage(f"conv_blocks_context.{d}", stage)
        for u, stage in enumerate(self.conv_blocks_localization):
            convs.append(ConvSite(f"upsample_layers.{u}.conv", UPSAMPLE))
            add_stage(f"conv_blocks_localization.{u}", stage)
            convs.append(ConvSite(f"seg_outputs.{u}", HEAD))
        return NetworkSites(tuple(convs), tuple(blocks),
                            tuple(f"conv_blocks_context.{d}" for d in range(len(self.conv_blocks_context))))

    def forward(self, x: torch.Tensor):
        features = self.encode(x)
        x = features[-1]
        logits = []
        for u in range(NUM_POOLS):
            x = self.upsample_layers[u](x)
            x = self.conv_blocks_localization[u](torch.cat((x, features[-2 - u]), dim=1))
            if self.decoder.deep_supervision or u == NUM_POOLS - 1:
                logits.append(self.seg_outputs[u](x))
        if self.decoder.deep_supervision:
            return logits[::-1]
        return logits[-1]


def plan_pool_sizes(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Maps an nnU-Net plan's pool sizes to STU-Net's five: drop the first (identity) entry, then cut or pad
    with [1, 1, 1] to five."""
    pools = [list(p) for p in pool_op_kernel_sizes[1:]][:NUM_POOLS]
    while len(pools) < NUM_POOLS:
        pools.append([1, 1, 1])
    return pools


def build_stunet(size: str, input_channels: int, num_classes: int,
                 pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None,
                 enable_deep_supervision: bool = True, fast_cpu_kernels: bool = False) -> STUNet:
    """Builds a published STU-Net size.

    Args:
        size: one of ``S``, ``B``, ``L``, ``H``.
        input_channels, num_classes: network input and output channels.
        pool_op_kernel_sizes: STU-Net's five pool sizes (see :func:`plan_pool_sizes`); default: the
            published pre-training ones.
        enable_deep_supervision, fast_cpu_kernels: see :class:`STUNet`.
    Returns:
        A randomly initialised :class:`STUNet`.
    """
    key = size.upper()
    if key not in SIZES:
        raise ValueError(f"unknown STU-Net size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[key]
    pools = pool_op_kernel_sizes or [[2, 2, 2]] * 4 + [[1, 1, 2]]
    return STUNet(input_channels, num_classes, [spec.depth] * 6, spec.dims, pools, enable_deep_supervision,
                  size_name=key, fast_cpu_kernels=fast_cpu_kernels)


def stunet_from_plans(size: str, configuration_manager, num_input_channels: int, num_output_channels: int,
                      enable_deep_supervision: bool = True, fast_cpu_kernels: bool = True) -> STUNet:
    """Builds STU-Net for an nnU-Net configuration (pool sizes from the plan, kernels always 3x3x3)."""
    pools = plan_pool_sizes(configuration_manager.pool_op_kernel_sizes)
    return build_stunet(size, num_input_channels, num_output_channels, pools, enable_deep_supervision,
                        fast_cpu_kernels)
