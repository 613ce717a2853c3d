"""Visual Prompt Tuning (Jia et al., ECCV 2022; KMnist/vpt, ``src/models/vit_prompt/vit.py``).

``length`` learnable prompt tokens (width D) are inserted right after the prefix tokens (class token and
registers), before block 0. VPT-Shallow keeps them through the network; VPT-Deep replaces them with a new
set before every later block (so there are ``depth x length x D`` prompt parameters). The prompts are
expanded over the batch and then pass through dropout, so every sample gets its own dropout mask (the official
``incorporate_prompt`` / ``forward_deep_prompt``); they are initialised uniformly in [-v, v] with
``v = sqrt(6 / (3 p^2 + D))`` (the official Xavier-style bound for a p x p patch of 3 channels). They are
removed before the final norm, and from the tapped block outputs, so heads see ``[prefix, patches]`` only.
Not mergeable.

Defaults: **10 deep prompts** (VPT-Deep), dropout 0. This differs from the official default configuration
(``src/configs/config.py`` with ``configs/base-prompt.yaml``: ``NUM_TOKENS`` 5, ``DEEP`` False, i.e. VPT-Shallow
with 5 prompts, ``DROPOUT`` 0.0); the paper tunes the prompt length per dataset (1 to 200) and reports
VPT-Deep as the stronger variant. ``--method-option length=5 --method-option deep=false`` gives the official
default configuration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.models.vit import TokenTuner
from nnunet_tpp.peft.modules import find_vits, has_part, positive_int, set_slot
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register


@dataclass(frozen=True)
class VPTOptions:
    """Knobs of :class:`VPTMethod`.

    Attributes:
        length: prompt tokens per layer (ours 10; the official default configuration 5).
        deep: VPT-Deep (new prompts before every block) instead of VPT-Shallow (before block 0 only); ours True,
            the official default configuration False.
        dropout: dropout on the prompt tokens, drawn per sample (official default 0.0).
    """

    length: int = 10
    deep: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad length, deep flag or dropout."""
        positive_int("vpt", "length", self.length)
        if not isinstance(self.deep, bool):
            raise PeftError(f"vpt: deep must be true or false, got {self.deep!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PeftError(f"vpt: dropout must be in [0, 1), got {self.dropout}")


class VPTTuner(TokenTuner):
    """The prompt tokens of one ViT: ``prompts`` is (layers, length, D), layers = depth (deep) or 1."""

    def __init__(self, layers: int, length: int, dim: int, patch_size: int, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        self.prompts = nn.Parameter(torch.empty(layers, length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.length = length

    def _prompt(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s prompts for the batch of ``x``: expanded first, then dropout (a mask per sample)."""
        return self.dropout(self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1))

    def start(self, x: torch.Tensor, image: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Inserts the first prompts after the prefix tokens."""
        return torch.cat([x[:, :prefix], self._prompt(0, x), x[:, prefix:]], dim=1)

    def before_block(self, index: int, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """VPT-Deep: replaces the previous prompts by this block's own."""
        if index == 0 or index >= self.prompts.shape[0]:
            return x
        return torch.cat([x[:, :prefix], self._prompt(index, x), x[:, prefix + self.length:]], dim=1)

    def strip(self, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Removes the prompt tokens."""
        return torch.cat([x[:, :prefix], x[:, prefix + self.length:]], dim=1)


@register
class VPTMethod(PeftMethod):
    """Registry entry ``vpt``."""

    name = "vpt"
    models = ("ViT",)
    options = VPTOptions
    mergeable = False
    adds_parameters = True
    description = "Visual Prompt Tuning: learnable prompt tokens (shallow or deep)"

    def inject(self, model: nn.Module, opts: VPTOptions) -> None:
        """Installs a :class:`VPTTuner` in every ViT."""
        for _, vit in find_vits(model, self.name):
            layers = vit.config.depth if opts.deep else 1
            tuner = VPTTuner(layers, int(opts.length), vit.embed_dim, vit.config.patch_size, float(opts.dropout))
            set_slot(vit, "tuner", tuner.to(vit.pos_embed.device, vit.pos_embed.dtype), self.name)

    def is_target(self, name: str) -> bool:
        """The prompt tokens (the ViT's tuner)."""
        return has_part(name, "tuner")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: prompt tokens change the sequence the attention sees."""
        raise PeftError("vpt cannot be merged: its prompt tokens take part in every attention; run it unmerged")
