"""Adapter (Houlsby et al., ICML 2019; official code google-research/adapter-bert): a bottleneck
``up(GELU(down(h)))`` with a skip connection, ``h + adapter(h)``, inserted twice in every transformer block: on
the output of the attention branch and on the output of the MLP branch, before each is added to the residual
stream (adapter-bert's ``feedforward_adapter`` after each dense output, before the residual sum). The adapters are
the blocks' new submodules ``adapter_attn`` / ``adapter_mlp``, applied by forward hooks on the attention and MLP
sub-layers that the model's description names (:mod:`nnunet_tpp.models.transformer_sites`).

What trains, by default as the official code (``optimization.py`` trains the ``adapters``, ``layer_norm`` and
``head`` variable collections): the adapters, **every LayerNorm of the backbone** (``norm1`` / ``norm2`` of every
block, ``norm_pre`` and the output ``norm`` where the ViT has them; the norms the description names) and the task
head. ``train_norms=False``
freezes the LayerNorms (adapters + head only, this package's behaviour before it followed the official code).
Only the adapters are the method's target parameters (what TPP pre-trains); the LayerNorms train in
fine-tuning.

Initialisation, by default as ``feedforward_adapter``: both projection weights from a normal distribution of
std ``init_scale`` = 1e-3 truncated at two standard deviations (TensorFlow's ``truncated_normal_initializer``),
both biases zero, so a new adapter is close to, not exactly, the identity. ``init="zero_up"`` gives the
variant this package used before: ``down`` with PyTorch's Linear initialisation (Kaiming-uniform), ``up`` all
zero, so the adapted network starts exactly as the pre-trained one. Not mergeable (the GELU makes it
non-linear).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_tpp.peft.modules import BottleneckAdapter, attach, has_part, positive_int, qualified, transformers
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

POSITIONS = {"attn": "adapter_attn", "mlp": "adapter_mlp"}
INITS = ("houlsby", "zero_up")


@dataclass(frozen=True)
class AdapterOptions:
    """Knobs of :class:`AdapterMethod` (defaults: the official adapter-bert code).

    Attributes:
        bottleneck: m, the hidden width of each adapter (adapter-bert's ``hidden_size`` default 64).
        positions: where the adapters go: ``attn`` (after the attention branch) and/or ``mlp``.
        dropout: dropout on the adapter's hidden activations (the official adapter has none: 0).
        train_norms: also train every LayerNorm of the backbone (official: True).
        init: ``houlsby`` (official: truncated normal of std ``init_scale`` for both weights, zero biases) or
            ``zero_up`` (Kaiming-uniform ``down``, all-zero ``up``: starts exactly as the backbone).
        init_scale: the standard deviation of the ``houlsby`` initialisation (official 1e-3).
    """

    bottleneck: int = 64
    positions: tuple[str, ...] = ("attn", "mlp")
    dropout: float = 0.0
    train_norms: bool = True
    init: str = "houlsby"
    init_scale: float = 1e-3

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad bottleneck, position, dropout, flag or initialisation."""
        positive_int("adapter", "bottleneck", self.bottleneck)
        bad = sorted(set(self.positions) - set(POSITIONS))
        if bad or not self.positions:
            raise PeftError(f"adapter: positions must be a non-empty subset of {sorted(POSITIONS)}, "
                            f"got {list(self.positions)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PeftError(f"adapter: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.train_norms, bool):
            raise PeftError(f"adapter: train_norms must be true or false, got {self.train_norms!r}")
        if self.init not in INITS:
            raise PeftError(f"adapter: init must be one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) \
                or not float(self.init_scale) > 0:
            raise PeftError(f"adapter: init_scale must be a positive number, got {self.init_scale!r}")


def houlsby_init(adapter: BottleneckAdapter, scale: float) -> None:
    """adapter-bert's initialisation in place: both weights ~ N(0, scale) truncated at +-2 scale, biases 0."""
    for linear in (adapter.down, adapter.up):
        nn.init.trunc_normal_(linear.weight, std=scale, a=-2.0 * scale, b=2.0 * scale)
        nn.init.zeros_(linear.bias)


@register
class AdapterMethod(PeftMethod):
    """Registry entry ``adapter`` (sequential bottleneck adapters in every ViT block)."""

    name = "adapter"
    models = ("ViT",)
    options = AdapterOptions
    mergeable = False
    adds_parameters = True
    description = "Houlsby bottleneck adapters after attention and MLP of every ViT block, + LayerNorms"

    def upgrade_stored_options(self, options: dict) -> dict:
        """Files written before the adapter followed adapter-bert froze the LayerNorms and started ``up`` at zero."""
        if "train_norms" not in options:
            options = {**options, "train_norms": False, "init": "zero_up"}
        return options

    def inject(self, model: nn.Module, opts: AdapterOptions) -> None:
        """Adds ``adapter_attn`` / ``adapter_mlp`` to every block, hooked to its attention / MLP output."""
        for _, net, description in transformers(model, self.name):
            like = next(net.parameters())
            for i, name in enumerate(description.blocks):
                block = net.get_submodule(name)
                for position in dict.fromkeys(opts.positions):
                    adapter = BottleneckAdapter(description.widths[i], int(opts.bottleneck), act="gelu",
                                                dropout=float(opts.dropout))
                    if opts.init == "houlsby":
                        houlsby_init(adapter, float(opts.init_scale))
                    attach(block, POSITIONS[position], adapter.to(like.device, like.dtype), self.name)
                    sub_layer = description.layout.attention if position == "attn" else description.layout.mlp
                    net.get_submodule(description.block_part(i, sub_layer)).register_forward_hook(
                        adapter.residual_hook)

    def is_target(self, name: str) -> bool:
        """The adapters (``adapter_attn`` / ``adapter_mlp``)."""
        return has_part(name, "adapter_attn") or has_part(name, "adapter_mlp")

    def trained_modules(self, model: nn.Module, opts: AdapterOptions) -> tuple[str, ...]:
        """With ``train_norms``: every norm the description names (each block's and the outer ones), e.g.
        ``backbone.blocks.0.norm1``."""
        if not opts.train_norms:
            return ()
        names = []
        for prefix, _, description in transformers(model, self.name):
            names += [qualified(prefix, description.block_part(i, norm)) for i in range(len(description.blocks))
                      for norm in description.layout.norms]
            names += [qualified(prefix, norm) for norm in description.outer_norms]
        return tuple(names)

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the adapter is non-linear."""
        raise PeftError("adapter cannot be merged: the GELU inside the bottleneck makes it non-linear; run it "
                        "unmerged, or use lora / ssf / apla when a merged network is required")
