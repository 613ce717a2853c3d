"""Visual Prompt Tuning (Jia et al., ECCV 2022; KMnist/vpt, ``src/models/vit_prompt/vit.py``).

``length`` learnable prompt tokens (width D) are inserted right after the prefix tokens (class token and
registers), before block 0. VPT-Shallow keeps them through the network; VPT-Deep replaces them with a new
set before every later block (so there are ``depth x length x D`` prompt parameters). The prompts are
expanded over the batch and then pass through dropout, so every sample gets its own dropout mask (the official
``incorporate_prompt`` / ``forward_deep_prompt``); they are initialised uniformly in [-v, v] with
``v = sqrt(6 / (3 p^2 + D))`` (the official Xavier-style bound for a p x p patch of 3 channels). They are
removed after the last block (before the final norm), so heads see ``[prefix, patches]`` only (tapped outputs of
earlier blocks still carry them between the prefix and the patch tokens). The prompts are the transformer's new
submodule ``tuner``; forward pre-hooks on the described blocks insert / replace them, a forward hook on the last
block removes them. Not mergeable.

Under rotary position embeddings (nnU-Net's Primus: EVA blocks), the prompts are not rotated: they join the
transformer's unrotated prefix tokens (the description's ``rotary_prefix`` attention layers count them in
``num_prefix_tokens``), the counterpart of the official prompts, which are concatenated after the position
embedding was added and so carry no position. On a 3-D transformer the initialisation bound uses the description's
``prompt_fan_in`` (Primus: channels x 8^3) in place of the official RGB patch's 3 p^2.

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

from functools import partial

from nnunet_tpp.peft.modules import attach, has_part, positive_int, transformers
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


class VPTTuner(nn.Module):
    """The prompt tokens of one transformer: ``prompts`` is (layers, length, D), layers = depth (deep) or 1."""

    def __init__(self, layers: int, length: int, dim: int, fan_in: int, dropout: float, prefix: int):
        super().__init__()
        bound = math.sqrt(6.0 / (fan_in + dim))
        self.prompts = nn.Parameter(torch.empty(layers, length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.length, self.prefix = length, prefix

    def _prompt(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s prompts for the batch of ``x``: expanded first, then dropout (a mask per sample)."""
        return self.dropout(self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1))

    def insert_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Pre-hook of the first block: inserts the first prompts after the prefix tokens."""
        x, p = args[0], self.prefix
        return (torch.cat([x[:, :p], self._prompt(0, x), x[:, p:]], dim=1),) + args[1:]

    def replace_hook(self, index: int, module: nn.Module, args: tuple) -> tuple:
        """Pre-hook of a later block (VPT-Deep): replaces the previous prompts by this block's own."""
        x, p = args[0], self.prefix
        return (torch.cat([x[:, :p], self._prompt(index, x), x[:, p + self.length:]], dim=1),) + args[1:]

    def strip_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Hook of the last block: removes the prompt tokens."""
        return torch.cat([output[:, :self.prefix], output[:, self.prefix + self.length:]], dim=1)


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
        """Adds a :class:`VPTTuner` (``tuner``) to every transformer and hooks it to the blocks."""
        for _, net, description in transformers(model, self.name, token_stream=True):
            depth = len(description.blocks)
            fan_in = description.prompt_fan_in or 3 * description.patch_size ** 2
            tuner = VPTTuner(depth if opts.deep else 1, int(opts.length), description.widths[0], fan_in,
                             float(opts.dropout), description.prefix_tokens)
            for name in description.rotary_prefix:  # prompts carry no position: leave them unrotated
                attention = net.get_submodule(name)
                attention.num_prefix_tokens = int(attention.num_prefix_tokens) + int(opts.length)
            like = next(net.parameters())
            attach(net, "tuner", tuner.to(like.device, like.dtype), self.name)
            blocks = [net.get_submodule(name) for name in description.blocks]
            blocks[0].register_forward_pre_hook(tuner.insert_hook)
            for i in range(1, tuner.prompts.shape[0]):
                blocks[i].register_forward_pre_hook(partial(tuner.replace_hook, i))
            blocks[-1].register_forward_hook(tuner.strip_hook)

    def is_target(self, name: str) -> bool:
        """The prompt tokens (the ViT's tuner)."""
        return has_part(name, "tuner")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: prompt tokens change the sequence the attention sees."""
        raise PeftError("vpt cannot be merged: its prompt tokens take part in every attention; run it unmerged")
