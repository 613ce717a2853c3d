"""Masked reconstruction on a 3-D vision transformer (nnU-Net's Primus): the masked patches' tokens are replaced by a
learned mask token after the patch embedding, the transformer (frozen, with its PEFT target parameters) runs over all
tokens, and a new output layer turns the final token grid back into voxels; the loss is the masked-voxel MSE of
:func:`nnunet_tpp.pretext.masked.masked_mse`. Used by the masked stage (:mod:`nnunet_tpp.pretext.masked`) for every
network whose transformer description names a ``token_head`` (:mod:`nnunet_tpp.models.transformer_sites`); nothing
here knows Primus's attribute names.

Followed: nnssl's masked image modelling for Primus, MIC-DKFZ/nnssl
``src/nnssl/training/nnsslTrainer/masked_image_modeling/SimMIMEvaTrainer.py`` with its network
``src/nnssl/architectures/evaSimMIM_module.py`` (``EvaSimMIM``). **As nnssl**: the mask is drawn per token (blocks of
the patch-embedding size, 8^3, :mod:`nnunet_tpp.pretext.masked_views`), 75 % of the tokens masked; a masked token's
embedding (after the patch embedding, before the position embedding) is replaced by one learned mask token
(initialised normal with std 1e-6); every token goes through the whole transformer; the output layer is a fresh
``PatchDecode`` of ``dynamic_network_architectures`` (transposed convolutions, LayerNorm, GELU) to the input's channels;
loss on the masked voxels only; AdamW (betas 0.9 / 0.98, weight decay 5e-2 on every trained parameter) at lr 3e-4,
a linear warm-up (nnssl: 50 of 1000 epochs, here the same share of the stage's epochs), then polynomial decay,
gradient norm clipped at 1 (:meth:`nnunet_tpp.pretext.masked.MaskedConfig.for_network`).

**Not as nnssl** (each an option): only the target parameters, the mask token and the output layer train, the
backbone is frozen (TPP); the output layer is a new one beside Primus's own ``up_projection`` (which is the
segmentation head the fine-tuning trains; ``token_output: linear`` gives the lighter SimMIM-paper head, one linear map
per token to its voxels); the masked voxels are also set to 0 in the input (as the CNN stage): for a V1 patch
embedding (one convolution per patch) this changes nothing, since the masked tokens are replaced whole, and for
PrimusV3's convolutional stem it keeps masked voxels from leaking into neighbouring visible tokens. nnssl's other
Primus recipe, ``BaseEvaMAETrainer`` (``evaMAE_module.py``: the encoder sees only the visible tokens, a 2-block EVA
decoder fills in mask tokens), is not offered: the target parameters could reach masked voxels only through that
decoder, which would train as the head and could learn the objective alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.pretext.dino import PretextSettingsError

TOKEN_OUTPUTS = ("patch_decode", "linear")


@dataclass(frozen=True)
class TokenSites:
    """Where the masked stage enters a token network (names relative to the network).

    Attributes:
        embed: the patch embedding; its output is the token grid ``(B, width, *grid)``.
        head: the module whose input is the final token grid (the stage replaces its output).
        patch: voxels per token along each axis.
        width: the token width.
        in_chans: the image channels.
    """

    embed: str
    head: str
    patch: int
    width: int
    in_chans: int


def token_sites(network: nn.Module) -> TokenSites | None:
    """The :class:`TokenSites` of a network described as a 3-D token transformer with a ``token_head`` (Primus);
    None for any other network (a CNN U-Net)."""
    from nnunet_tpp.models.transformer_sites import description_of
    d = description_of(network)
    if d is None or d.token_head is None or d.spatial_dims != 3:
        return None
    return TokenSites(d.patch_embed, d.token_head, int(d.patch_size), int(d.widths[-1]), int(d.in_chans))


def token_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """A voxel mask ``(B, 1, *spatial)`` (1 visible, 0 masked) at the token grid ``(B, 1, *grid)``; raises
    :class:`PretextSettingsError` when a token is partly masked (the blocks must be multiples of the patch)."""
    if any(s % patch for s in mask.shape[2:]):
        raise PretextSettingsError(f"a view of {list(mask.shape[2:])} voxels is not a multiple of the network's "
                                   f"{patch}-voxel patches")
    b, c = mask.shape[:2]
    grid = [s // patch for s in mask.shape[2:]]
    blocks = mask.reshape(b, c, grid[0], patch, grid[1], patch, grid[2], patch)
    low, high = blocks.amin(dim=(3, 5, 7)), blocks.amax(dim=(3, 5, 7))
    if not torch.equal(low, high):
        raise PretextSettingsError(f"the mask blocks do not cover whole {patch}-voxel tokens: give a mask block size "
                                   f"that is a multiple of {patch} (pretext_mask_block)")
    return low


class VoxelShuffleHead(nn.Module):
    """One linear map per token to its ``patch^3`` voxels of ``channels`` (the SimMIM paper's linear head; a 1x1x1
    convolution and a 3-D pixel shuffle)."""

    def __init__(self, width: int, channels: int, patch: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.proj = nn.Conv3d(width, channels * patch ** 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, width, *grid)`` -> ``(B, channels, *grid * patch)``."""
        b, _, d, h, w = x.shape
        p = self.patch
        y = self.proj(x).reshape(b, self.channels, p, p, p, d, h, w)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.channels, d * p, h * p, w * p)


def output_layer(kind: str, sites: TokenSites) -> nn.Module:
    """The reconstruction layer: ``patch_decode`` (nnssl's ``PatchDecode``, initialised as nnssl: He with
    ``neg_slope`` 1e-2) or ``linear`` (:class:`VoxelShuffleHead`)."""
    if kind not in TOKEN_OUTPUTS:
        raise PretextSettingsError(f"token_output must be one of {', '.join(TOKEN_OUTPUTS)}, got {kind!r}")
    if kind == "linear":
        return VoxelShuffleHead(sites.width, sites.in_chans, sites.patch)
    from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd, PatchDecode
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    layer = PatchDecode((sites.patch,) * 3, sites.width, sites.in_chans, norm=LayerNormNd, activation=nn.GELU)
    layer.apply(InitWeights_He(1e-2))
    return layer


class TokenReconstruction(nn.Module):
    """A token network, a learned mask token and an output layer: inside :meth:`attached` the network's forward
    replaces the masked tokens after the patch embedding (forward hook) and returns the output layer applied to the
    token grid entering its ``token_head``; outside it the network is untouched.

    Args:
        network: the network (its PEFT method applied).
        sites: where to enter it (:func:`token_sites`).
        token_output: the output layer (:func:`output_layer`).
    """

    def __init__(self, network: nn.Module, sites: TokenSites, token_output: str = "patch_decode"):
        super().__init__()
        self.network, self.sites = network, sites
        self.mask_token = nn.Parameter(torch.empty(1, sites.width, 1, 1, 1))
        nn.init.normal_(self.mask_token, std=1e-6)
        self.output = output_layer(token_output, sites)
        self._mask: torch.Tensor | None = None

    def _swap(self, module, args, tokens: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("TokenReconstruction: call it with a mask")
        keep = self._mask.to(tokens.dtype)
        return tokens * keep + self.mask_token.to(tokens.dtype) * (1 - keep)

    @contextmanager
    def attached(self):
        """Routes the network through the mask token and the output layer (forward hooks) for the block."""
        handles = [self.network.get_submodule(self.sites.embed).register_forward_hook(self._swap),
                   self.network.get_submodule(self.sites.head).register_forward_hook(
                       lambda module, args, out: self.output(args[0]))]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction ``(B, C_in, *spatial)`` of ``x`` with the tokens that ``mask`` (``(B, 1, *spatial)``,
        1 visible, 0 masked, whole tokens) hides replaced by the mask token (call inside :meth:`attached`)."""
        if mask is None:
            raise PretextSettingsError("the masked reconstruction of a token network needs the mask")
        self._mask = token_mask(mask, self.sites.patch)
        try:
            return self.network(x)
        finally:
            self._mask = None
