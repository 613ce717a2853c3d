"""The description of a convolutional network as data: its convolutions (:class:`ConvSite`), blocks and encoder
stages (:class:`NetworkSites`). A network's describer builds one; :mod:`nnunet_tpp.models.sites` finds the
describer of a model and selects from the description.
"""
from __future__ import annotations

from dataclasses import dataclass

BLOCK, SHORTCUT, UPSAMPLE, HEAD = "block", "shortcut", "upsample", "head"
ROLES = (BLOCK, SHORTCUT, UPSAMPLE, HEAD)


@dataclass(frozen=True)
class ConvSite:
    """One convolution of a network.

    Attributes:
        name: qualified module name of the ``nn.Conv*`` / ``nn.ConvTranspose*``.
        role: ``block`` (a convolution in a block's main path), ``shortcut`` (a block's projection),
            ``upsample`` (a decoder upsampling convolution) or ``head`` (a segmentation output).
        block: qualified name of the enclosing block (None for upsampling layers and heads).
        index: position among the block's main-path convolutions with a kernel larger than 1 (the block's
            first k x k convolution has index 0; 1 x 1 convolutions of a bottleneck have index -1).
        norm: qualified name of the normalisation applied directly to this convolution's output, or None.
        act: qualified name of the nonlinearity applied directly to that normalisation's output, or None (e.g.
            when the residual sum comes first).
    """

    name: str
    role: str
    block: str | None = None
    index: int = -1
    norm: str | None = None
    act: str | None = None


@dataclass(frozen=True)
class NetworkSites:
    """The description of one network.

    Attributes:
        convs: every convolution, in forward order.
        blocks: qualified names of the blocks (residual blocks, plain conv stages) in forward order: the units
            that activation checkpointing may recompute.
        encoder_stages: qualified names of the encoder's stages, highest resolution first (their outputs are what
            the TPP pretext stage pools).
    """

    convs: tuple[ConvSite, ...]
    blocks: tuple[str, ...] = ()
    encoder_stages: tuple[str, ...] = ()

    def select(self, role: str | None = None, block_index: int | None = None) -> list[ConvSite]:
        """The sites of ``role`` (all roles when None), only the block's ``block_index``-th k x k conv when given."""
        return [s for s in self.convs if (role is None or s.role == role)
                and (block_index is None or s.index == block_index)]

    def by_name(self) -> dict[str, ConvSite]:
        """``{conv name: site}``."""
        return {s.name: s for s in self.convs}
