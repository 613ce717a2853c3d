"""APLA (Sorkhei et al., 2025, "A Simple Adaptation Method for Vision Transformers"; MoeinSorkhei/APLA,
``src/apla/apla_vit.py``): only a random subset of the rows (output features) of every block's attention
output projection ``attn.proj`` trains, weights and bias entries of those rows; nothing is added to the
network, so there is no inference cost.

Here each ``attn.proj`` keeps its frozen weight and bias untouched and gets ``apla_weight`` (rows x in) and
``apla_bias`` (rows), initialised as copies of the chosen rows, which replace those rows in the forward
pass (as the official split into a trainable and a frozen part). The rows are drawn per block with a
seeded ``torch.randperm`` (official: ``randperm(dim)[:partial_size]``, partial_size 8) and kept as the
persistent buffer ``apla_index``. Merging writes the trained rows into the weight and bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.peft.modules import module_like, replace_submodule, transformers
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class APLAOptions:
    """Knobs of :class:`APLAMethod`.

    Attributes:
        rows: rows of each ``attn.proj`` weight that train (-1 or ``"all"``: the whole projection).
        seed: seed of the random row choice (the same seed gives the same rows on every machine).
        bias: train the bias entries of the chosen rows too (the official code does).
    """

    rows: int = 8
    seed: int = 0
    bias: bool = True

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad row count, seed or bias flag."""
        if not (self.rows in (-1, "all") or (isinstance(self.rows, int) and not isinstance(self.rows, bool)
                                             and self.rows >= 1)):
            raise PeftError(f"apla: rows must be a positive integer, or -1 / 'all' for the whole projection, "
                            f"got {self.rows!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PeftError(f"apla: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.bias, bool):
            raise PeftError(f"apla: bias must be true or false, got {self.bias!r}")


class APLALinear(nn.Linear):
    """A frozen ``nn.Linear`` whose rows ``apla_index`` are replaced by the trainable ``apla_weight`` (and
    ``apla_bias`` when given)."""

    apla_index: torch.Tensor
    apla_weight: nn.Parameter
    apla_bias: nn.Parameter | None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias with the trained rows in place."""
        weight = self.weight.index_copy(0, self.apla_index, self.apla_weight.to(self.weight.dtype))
        bias = self.bias
        if bias is not None and self.apla_bias is not None:
            bias = bias.index_copy(0, self.apla_index, self.apla_bias.to(bias.dtype))
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, *self.effective())

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the trained rows."""
        plain = module_like(self, nn.Linear)
        with torch.no_grad():
            weight, bias = self.effective()
            plain.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
            if bias is not None:
                plain.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        return plain


def choose_rows(dim: int, rows, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``rows`` random rows out of ``dim`` (all rows for -1 / ``"all"``)."""
    if rows in (-1, "all"):
        return torch.arange(dim)
    if rows > dim:
        raise PeftError(f"apla: rows={rows} exceeds the {dim} rows of the attention projection")
    return torch.randperm(dim, generator=generator)[:rows].sort().values


@register
class APLAMethod(PeftMethod):
    """Registry entry ``apla``."""

    name = "apla"
    models = ("ViT",)
    options = APLAOptions
    mergeable = True
    adds_parameters = False
    description = "APLA: a random subset of rows of every attention output projection (mergeable)"

    def inject(self, model: nn.Module, opts: APLAOptions) -> None:
        """Wraps every block's attention output projection (the description's ``attention_out``), picks its rows."""
        generator = torch.Generator().manual_seed(int(opts.seed))
        for _, net, description in transformers(model, self.name):
            for i in range(len(description.blocks)):
                name = description.block_part(i, description.layout.attention_out)
                proj = net.get_submodule(name)
                if type(proj) is not nn.Linear:
                    raise PeftError(f"apla: expected a plain nn.Linear as {name}, got {type(proj).__name__}")
                index = choose_rows(proj.out_features, opts.rows, generator).to(proj.weight.device)
                new = module_like(proj, APLALinear)
                new.register_buffer("apla_index", index, persistent=True)
                new.apla_weight = nn.Parameter(proj.weight.detach()[index].clone())
                train_bias = opts.bias and proj.bias is not None
                new.apla_bias = nn.Parameter(proj.bias.detach()[index].clone()) if train_bias else None
                replace_submodule(net, name, new)

    def trains(self, name: str) -> bool:
        """The copies of the chosen rows (``apla_weight`` / ``apla_bias``)."""
        return name.endswith(".apla_weight") or name.endswith(".apla_bias")

    def is_copy(self, name: str) -> bool:
        """The row copies replace rows of ``attn.proj``: the total counts those rows once."""
        return self.trains(name)

    def merge(self, model: nn.Module, opts) -> None:
        """Writes the trained rows into plain ``nn.Linear`` projections."""
        for name, module in list(model.named_modules()):
            if isinstance(module, APLALinear):
                replace_submodule(model, name, module.merged())
