"""Adapter (Houlsby et al., ICML 2019): a bottleneck ``up(GELU(down(h)))`` with a skip connection,
``h + adapter(h)``, inserted twice in every transformer block: on the output of the attention branch and
on the output of the MLP branch, before each is added to the residual stream (the ViT's
``Block.adapter_attn`` / ``Block.adapter_mlp`` slots).

``down`` (D -> m) keeps the default Linear initialisation, ``up`` (m -> D) starts at zero, so the adapted
network starts as the pre-trained one (Houlsby et al. use a near-identity initialisation for the same
reason). Not mergeable (the GELU makes it non-linear).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.peft.modules import BottleneckAdapter, find_vits, has_part, positive_int, set_slot
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

POSITIONS = {"attn": "adapter_attn", "mlp": "adapter_mlp"}


@dataclass(frozen=True)
class AdapterOptions:
    """Knobs of :class:`AdapterMethod`.

    Attributes:
        bottleneck: m, the hidden width of each adapter.
        positions: where the adapters go: ``attn`` (after the attention branch) and/or ``mlp``.
        dropout: dropout on the adapter's hidden activations.
    """

    bottleneck: int = 64
    positions: tuple[str, ...] = ("attn", "mlp")
    dropout: float = 0.0

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad bottleneck, position or dropout."""
        positive_int("adapter", "bottleneck", self.bottleneck)
        bad = sorted(set(self.positions) - set(POSITIONS))
        if bad or not self.positions:
            raise PeftError(f"adapter: positions must be a non-empty subset of {sorted(POSITIONS)}, "
                            f"got {list(self.positions)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PeftError(f"adapter: dropout must be in [0, 1), got {self.dropout}")


@register
class AdapterMethod(PeftMethod):
    """Registry entry ``adapter`` (sequential bottleneck adapters in every ViT block)."""

    name = "adapter"
    models = ("ViT",)
    options = AdapterOptions
    mergeable = False
    adds_parameters = True
    description = "Houlsby bottleneck adapters after attention and MLP of every ViT block"

    def inject(self, model: nn.Module, opts: AdapterOptions) -> None:
        """Fills the ``adapter_attn`` / ``adapter_mlp`` slots of every block."""
        for _, vit in find_vits(model, self.name):
            like = vit.pos_embed
            for block in vit.blocks:
                for position in dict.fromkeys(opts.positions):
                    adapter = BottleneckAdapter(vit.embed_dim, int(opts.bottleneck), act="gelu",
                                                dropout=float(opts.dropout)).to(like.device, like.dtype)
                    set_slot(block, POSITIONS[position], adapter, self.name)

    def is_target(self, name: str) -> bool:
        """The adapters in the ``adapter_attn`` / ``adapter_mlp`` slots."""
        return has_part(name, "adapter_attn") or has_part(name, "adapter_mlp")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the adapter is non-linear."""
        raise PeftError("adapter cannot be merged: the GELU inside the bottleneck makes it non-linear; run it "
                        "unmerged, or use lora / ssf / apla when a merged network is required")
