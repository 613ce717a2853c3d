"""AdaptFormer (Chen et al., NeurIPS 2022): an "AdaptMLP" beside each block's MLP. Following the official
code (ShoufaChen/AdaptFormer, ``models/adapter.py`` and the parallel ``ffn_option`` of
``models/vit_image.py``): the branch reads the block's residual stream after attention, x, and computes
``s * up(dropout(ReLU(down(x))))`` with no LayerNorm of its own, s = 0.1, bottleneck 64, dropout 0.1,
``down`` Kaiming-uniform with zero bias and ``up`` all zeros ("lora" initialisation); its output is added to
the block output next to the MLP branch. The AdaptMLP is the block's new submodule ``adapter_parallel``: a forward
pre-hook on the module that receives the residual stream entering the MLP sub-layer (the description's
``mlp_input``: timm's ``norm2``, TinyViT's ``mlp``) computes it, a forward hook on the block adds it. Not
mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.peft.modules import BottleneckAdapter, attach, has_part, positive_int, transformers
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class AdaptFormerOptions:
    """Knobs of :class:`AdaptFormerMethod`.

    Attributes:
        bottleneck: hidden width of the AdaptMLP.
        scale: fixed factor s on the branch output.
        dropout: dropout on the hidden activations (the official blocks use 0.1).
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad bottleneck or dropout."""
        positive_int("adaptformer", "bottleneck", self.bottleneck)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PeftError(f"adaptformer: dropout must be in [0, 1), got {self.dropout}")


@register
class AdaptFormerMethod(PeftMethod):
    """Registry entry ``adaptformer`` (parallel AdaptMLP in every ViT block)."""

    name = "adaptformer"
    models = ("ViT",)
    options = AdaptFormerOptions
    mergeable = False
    adds_parameters = True
    description = "AdaptFormer: scaled bottleneck MLP in parallel to every ViT block's MLP"

    def inject(self, model: nn.Module, opts: AdaptFormerOptions) -> None:
        """Adds ``adapter_parallel`` to every block: it reads the stream entering the MLP, adds to the block output."""
        for _, net, description in transformers(model, self.name):
            like = next(net.parameters())
            for i, name in enumerate(description.blocks):
                block = net.get_submodule(name)
                adapter = BottleneckAdapter(description.widths[i], int(opts.bottleneck), act="relu",
                                            scale=float(opts.scale), dropout=float(opts.dropout))
                attach(block, "adapter_parallel", adapter.to(like.device, like.dtype), self.name)
                net.get_submodule(description.block_part(i, description.layout.mlp_input)).register_forward_pre_hook(
                    adapter.read_input_hook)
                block.register_forward_hook(adapter.add_read_hook)

    def is_target(self, name: str) -> bool:
        """The AdaptMLPs in the ``adapter_parallel`` slots."""
        return has_part(name, "adapter_parallel")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the AdaptMLP is non-linear."""
        raise PeftError("adaptformer cannot be merged: the ReLU inside the AdaptMLP makes it non-linear; run it "
                        "unmerged, or use lora / ssf / apla when a merged network is required")
