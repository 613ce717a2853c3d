"""Explicit Visual Prompting (Liu et al., CVPR 2023; NiFangBaAGe/Explicit-Visual-Prompt,
``models/mmseg/models/backbones/vit_evp.py``, class ``PromptGenerator``), on our ViT.

Two explicit features per patch, both of width c = D / scale_factor, are summed:

* embedding tune: a linear map D -> c of the frozen patch embeddings ``patch_embed(x)``, before the position
  embedding (and the class token), as the official ``forward`` feeds ``init_embeddings``. Under a masked-token
  objective (iBOT in SSA) a hidden patch's embedding is the mask token there, as the ViT sees it; under
  MAE-style dropping only the kept patches' features are used. ``embedding_input="tokens"`` feeds the patch
  tokens after the position embedding (and ``norm_pre``) instead, the variant this package used before;
* handcrafted tune: the image's high-frequency components, ``|IFFT(FFT(image) * (1 - M))|`` where M
  removes a centred square of the shifted spectrum of side ``2 * floor(sqrt(H W rate) / 2)``
  (``rate = mask_rate``), patch-embedded by a new p x p conv (in_chans -> c). Under a masked-token objective
  (iBOT in SSA) the hidden patches' pixels are zeroed before the FFT and their features set to zero, so no
  patch learns hidden pixels through this branch; under MAE-style dropping only kept patches are used.

Before every block i, the prompt ``shared_up(GELU(lightweight_i(sum)))`` (lightweight_i: c -> c per block,
shared_up: c -> D shared) is added to the patch tokens. Linear weights ~ trunc-normal(0.02) with zero
biases, conv weights ~ N(0, sqrt(2 / fan_out)) as the official code. The generator is the transformer's new
submodule ``tuner``: a forward hook on the described patch embedding reads the image and the patch embeddings,
forward pre-hooks on the blocks add the prompts (the masked / kept patches of the call come from the
transformer's ``token_state``). Not mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from functools import partial

from nnunet_tpp.peft.modules import attach, has_part, positive_int, transformers
from nnunet_tpp.peft.registry import PeftError, PeftMethod, register

EMBEDDING_INPUTS = ("patch_embed", "tokens")


@dataclass(frozen=True)
class EVPOptions:
    """Knobs of :class:`EVPMethod`.

    Attributes:
        scale_factor: D / c, the reduction of the prompt generator's width (the official ViT configs: 32).
        mask_rate: share of the spectrum (a centred square) removed as low frequency, in (0, 1).
        embedding_input: what the embedding tune reads: ``patch_embed`` (official: the patch embeddings before
            the position embedding) or ``tokens`` (the patch tokens after it).
    """

    scale_factor: int = 32
    mask_rate: float = 0.25
    embedding_input: str = "patch_embed"

    def validate(self) -> None:
        """Raises :class:`PeftError` for a bad scale factor, mask rate or embedding input."""
        positive_int("evp", "scale_factor", self.scale_factor)
        if not 0.0 < float(self.mask_rate) < 1.0:
            raise PeftError(f"evp: mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.embedding_input not in EMBEDDING_INPUTS:
            raise PeftError(f"evp: embedding_input must be one of {list(EMBEDDING_INPUTS)}, "
                            f"got {self.embedding_input!r}")


def high_frequency(image: torch.Tensor, rate: float) -> torch.Tensor:
    """``|IFFT(FFT(image) * (1 - M))|`` per channel, M the centred low-frequency square (float32)."""
    h, w = image.shape[-2:]
    half = int(math.sqrt(h * w * rate) // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(image.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(h, w, device=image.device)
    keep[max(h // 2 - half, 0):h // 2 + half, max(w // 2 - half, 0):w // 2 + half] = 0
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()


class EVPTuner(nn.Module):
    """EVP's prompt generator for one transformer."""

    def __init__(self, dim: int, depth: int, in_chans: int, patch_size: int, scale_factor: int, mask_rate: float,
                 embedding_input: str = "patch_embed", prefix: int = 1, token_state: dict | None = None):
        super().__init__()
        width = max(1, dim // scale_factor)
        self.mask_rate, self.embedding_input, self.prefix = mask_rate, embedding_input, prefix
        self.embedding_generator = nn.Linear(dim, width)
        self.handcrafted_generator = nn.Conv2d(in_chans, width, patch_size, stride=patch_size)
        self.lightweight_mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.shared_mlp = nn.Linear(width, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        conv = self.handcrafted_generator
        nn.init.normal_(conv.weight, std=math.sqrt(2.0 / (patch_size * patch_size * width)))
        nn.init.zeros_(conv.bias)
        self.token_state = token_state if token_state is not None else {}
        self.image = self.embeddings = self.feature = None

    def read_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Hook of the patch embedding: keeps the image and the patch embeddings (B, N, D) of this pass."""
        self.image, self.embeddings = args[0], output.reshape(output.shape[0], -1, output.shape[-1])

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The summed embedding and handcrafted features (B, N or K, c) of this pass; ``tokens`` is the first
        block's input."""
        conv, image = self.handcrafted_generator, self.image
        masked, keep = self.token_state.get("masked"), self.token_state.get("keep")
        if masked is not None:  # iBOT-hidden pixels must not reach any patch through the (global) FFT filter
            image = image.masked_fill(self._pixel_mask(masked, image, conv.stride[0]), 0.0)
        hand = conv(high_frequency(image, self.mask_rate).to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        if masked is not None:
            hand = hand.masked_fill(masked[..., None], 0.0)
        if self.embedding_input == "patch_embed":
            embeddings = self.embeddings
            if masked is not None:
                embeddings = torch.where(masked[..., None], self.token_state["mask_token"].to(embeddings.dtype),
                                         embeddings)
            feature = hand + self.embedding_generator(embeddings)
            return feature if keep is None else self._gather(feature, keep)
        hand = hand if keep is None else self._gather(hand, keep)
        return hand + self.embedding_generator(tokens[:, self.prefix:])

    @staticmethod
    def _gather(feature: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, N, c) -> (B, K, c) at the kept patch indices (B, K)."""
        return torch.gather(feature, 1, keep[..., None].expand(-1, -1, feature.shape[-1]))

    @staticmethod
    def _pixel_mask(masked: torch.Tensor, image: torch.Tensor, patch: int) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) pixel mask (pixels beyond the last whole patch stay visible)."""
        h, w = image.shape[-2:]
        rows, cols = h // patch, w // patch
        pixels = masked.reshape(-1, 1, rows, cols).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        return torch.nn.functional.pad(pixels, (0, w - cols * patch, 0, h - rows * patch))

    def prompt_hook(self, index: int, module: nn.Module, args: tuple) -> tuple:
        """Pre-hook of block ``index``: adds its prompt to the patch tokens."""
        x = args[0]
        if index == 0:
            self.feature = self.features(x)
        prompt = self.shared_mlp(self.lightweight_mlps[index](self.feature))
        return (torch.cat([x[:, :self.prefix], x[:, self.prefix:] + prompt.to(x.dtype)], dim=1),) + args[1:]

    def clear_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Hook of the last block: drops this pass's image, embeddings and features."""
        self.image = self.embeddings = self.feature = None


@register
class EVPMethod(PeftMethod):
    """Registry entry ``evp``."""

    name = "evp"
    models = ("ViT",)
    options = EVPOptions
    mergeable = False
    adds_parameters = True
    description = "Explicit Visual Prompting: per-block prompts from patch embeddings and high frequencies"

    def upgrade_stored_options(self, options: dict) -> dict:
        """Files written before EVP read the patch embeddings tuned the position-embedded tokens."""
        return options if "embedding_input" in options else {**options, "embedding_input": "tokens"}

    def inject(self, model: nn.Module, opts: EVPOptions) -> None:
        """Adds an :class:`EVPTuner` (``tuner``) to every transformer and hooks it to the patch embedding and blocks."""
        found = transformers(model, self.name, token_stream=True)
        volumes = [d.name for _, _, d in found if d.spatial_dims != 2]
        if volumes:
            raise PeftError(f"evp works on 2-D images (its handcrafted features are a 2-D FFT's high frequencies, "
                            f"patch-embedded by a 2-D convolution), and {volumes[0]} is a {found[0][2].spatial_dims}-D "
                            f"transformer: use lora, adapter, adaptformer, ssf, vpt, dtl, apla, partial, bitfit, "
                            f"linear_probe or full on it")
        for _, net, d in found:
            state = getattr(net, d.token_state) if d.token_state else None
            tuner = EVPTuner(d.widths[0], len(d.blocks), d.in_chans, d.patch_size, int(opts.scale_factor),
                             float(opts.mask_rate), opts.embedding_input, d.prefix_tokens, state)
            like = next(net.parameters())
            attach(net, "tuner", tuner.to(like.device, like.dtype), self.name)
            net.get_submodule(d.patch_embed).register_forward_hook(tuner.read_hook)
            for i, name in enumerate(d.blocks):
                net.get_submodule(name).register_forward_pre_hook(partial(tuner.prompt_hook, i))
            net.get_submodule(d.blocks[-1]).register_forward_hook(tuner.clear_hook)

    def is_target(self, name: str) -> bool:
        """The prompt generator (the ViT's tuner)."""
        return has_part(name, "tuner")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the prompts depend on the image."""
        raise PeftError("evp cannot be merged: its prompts are computed from each image; run it unmerged")
