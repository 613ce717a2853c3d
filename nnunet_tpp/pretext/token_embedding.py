"""DINO's embedding of a 3-D token network (nnU-Net's Primus): the mean of the patch tokens that enter the network's
``token_head`` (after the last block and the final norm), one vector of the token width per view. Where to read the
tokens comes from the network's transformer description (:func:`nnunet_tpp.pretext.masked_tokens.token_sites`);
nothing here knows Primus's attribute names.

As DINO on a ViT without a class token (the official ``--arch`` ViTs use the class token; DINO's ResNets and the
Primus paper's classification probes average): the average of the patch tokens. Primus only takes the input size it
was built for (its absolute position embedding has one entry per token, and EVA does not resample it), so a view of
another size -- DINO's local views -- is resized (trilinear) to that size, as the official DINO resizes every crop
(global crops to 224, local crops to 96; there the ViT interpolates its position embedding for the smaller local
crops, which EVA cannot): a local view here costs as much as a global one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.pretext.masked_tokens import TokenSites


def _head_input(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return args[0]


class TokenEmbedding(nn.Module):
    """Views -> the mean of the token grid entering the network's ``token_head`` (``(B, width)``).

    Args:
        network: the token network (its PEFT method applied).
        sites: where its tokens are (:func:`~nnunet_tpp.pretext.masked_tokens.token_sites`).
        size: the input size per axis the network was built for (its patch); other views are resized to it.
    """

    def __init__(self, network: nn.Module, sites: TokenSites, size):
        super().__init__()
        self.network, self.sites = network, sites
        self.size = tuple(int(s) for s in size)
        self.dim = sites.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, width)``; the network's output head is skipped (a forward hook, removed
        before returning)."""
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="trilinear", align_corners=False)
        handle = self.network.get_submodule(self.sites.head).register_forward_hook(_head_input)
        try:
            grid = self.network(x)
        finally:
            handle.remove()
        return grid.flatten(2).mean(-1)

    def reached(self, names) -> set[str]:
        """Of the parameter ``names`` of the network, those before its token head (all the pretext can train)."""
        return {n for n in names if not n.startswith(self.sites.head + ".")}
