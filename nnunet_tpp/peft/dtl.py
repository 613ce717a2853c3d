"""Disentangled Transfer Learning (Fu et al., AAAI 2024; heekhero/DTL, ``models/vision_transformer.py``).

A compact side network (CSN) of low-rank linear maps, one per block: before block i it reads the block's
input tokens z_i and accumulates ``h += B_i A_i z_i`` (A_i: D -> r, Kaiming-uniform; B_i: r -> D, zero).
From block M on, after block i, the activated side output ``swish(h) = h * sigmoid(beta * h)`` is added
to the backbone's tokens (all of them, class token included), which then feed the next block. Defaults as
the official ViT-B scripts (``train_dtl.sh``): r = 2, beta = 100, LoRA before blocks 0-11 and adding after
blocks 6-11, i.e. M = depth / 2. DTL+'s depth-wise fusion conv is not included. The side network is the
transformer's new submodule ``tuner``, run by forward pre-hooks (read) and forward hooks (add) on the described
blocks. Not mergeable.
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
class DTLOptions:
    """Knobs of :class:`DTLMethod`.

    Attributes:
        rank: r, the rank of each block's side map.
        start_block: M, the 0-based block after which the side output starts to be added (None: depth // 2).
        beta: the swish activation's sharpness.
    """

    rank: int = 2
    start_block: int | None = None
    beta: float = 100.0

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad rank or start block."""
        positive_int("dtl", "rank", self.rank)
        if self.start_block is not None and (isinstance(self.start_block, bool) or not isinstance(
                self.start_block, int) or self.start_block < 0):
            raise PeftError(f"dtl: start_block must be a block index >= 0 or null, got {self.start_block!r}")


class DTLTuner(nn.Module):
    """The compact side network of one transformer: ``down[i]`` (D -> r) and ``up[i]`` (r -> D) per block."""

    def __init__(self, dim: int, depth: int, rank: int, start_block: int, beta: float):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(dim, rank, bias=False) for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(rank, dim, bias=False) for _ in range(depth))
        for down, up in zip(self.down, self.up):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        self.start_block, self.beta = start_block, beta
        self.side: torch.Tensor | None = None

    def read_hook(self, index: int, module: nn.Module, args: tuple) -> None:
        """Pre-hook of block ``index``: adds the low-rank map of the block's input to the side state."""
        side = self.up[index](self.down[index](args[0]))
        self.side = side if index == 0 else self.side + side

    def add_hook(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Hook of block ``index`` >= M: adds the activated side output to the block's output."""
        h = self.side
        if index == len(self.down) - 1:
            self.side = None
        return output + (h * torch.sigmoid(self.beta * h)).to(output.dtype)


@register
class DTLMethod(PeftMethod):
    """Registry entry ``dtl``."""

    name = "dtl"
    models = ("ViT",)
    options = DTLOptions
    mergeable = False
    adds_parameters = True
    description = "Disentangled Transfer Learning: low-rank side network added back from block M on"

    def inject(self, model: nn.Module, opts: DTLOptions) -> None:
        """Adds a :class:`DTLTuner` (``tuner``) to every transformer and hooks it to the blocks."""
        for _, net, description in transformers(model, self.name, token_stream=True):
            depth = len(description.blocks)
            start = depth // 2 if opts.start_block is None else int(opts.start_block)
            if start >= depth:
                raise PeftError(f"dtl: start_block {start} is not a block of this depth-{depth} ViT")
            tuner = DTLTuner(description.widths[0], depth, int(opts.rank), start, float(opts.beta))
            like = next(net.parameters())
            attach(net, "tuner", tuner.to(like.device, like.dtype), self.name)
            for i, name in enumerate(description.blocks):
                block = net.get_submodule(name)
                block.register_forward_pre_hook(partial(tuner.read_hook, i))
                if i >= start:
                    block.register_forward_hook(partial(tuner.add_hook, i))

    def is_target(self, name: str) -> bool:
        """The side network (the ViT's tuner)."""
        return has_part(name, "tuner")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the side network is a separate path with a non-linearity."""
        raise PeftError("dtl cannot be merged: its side network adds a non-linear path; run it unmerged")
