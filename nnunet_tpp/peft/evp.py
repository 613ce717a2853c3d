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
biases, conv weights ~ N(0, sqrt(2 / fan_out)) as the official code. Not mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.models.vit import TokenTuner
from nnunet_tpp.peft.modules import find_vits, has_part, positive_int, set_slot
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


class EVPTuner(TokenTuner):
    """EVP's prompt generator for one ViT."""

    wants_patch_embed = True

    def __init__(self, dim: int, depth: int, in_chans: int, patch_size: int, scale_factor: int, mask_rate: float,
                 embedding_input: str = "patch_embed"):
        super().__init__()
        width = max(1, dim // scale_factor)
        self.mask_rate = mask_rate
        self.embedding_input = embedding_input
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

    def start(self, x: torch.Tensor, image: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Computes the summed embedding and handcrafted features (B, N, c) for the later hooks."""
        conv = self.handcrafted_generator
        masked = state.get("masked")
        if masked is not None:  # iBOT-hidden pixels must not reach any patch through the (global) FFT filter
            image = image.masked_fill(self._pixel_mask(masked, image, conv.stride[0]), 0.0)
        hand = conv(high_frequency(image, self.mask_rate).to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        if masked is not None:
            hand = hand.masked_fill(masked[..., None], 0.0)
        keep = state.get("keep")
        if self.embedding_input == "patch_embed":
            if "patch_embed" not in state:
                raise RuntimeError("EVP needs the ViT's patch embeddings (state['patch_embed']): run it through "
                                   "VisionTransformer.forward_features")
            feature = hand + self.embedding_generator(state["patch_embed"])
            state["evp"] = feature if keep is None else self._gather(feature, keep)
        else:
            hand = hand if keep is None else self._gather(hand, keep)
            state["evp"] = hand + self.embedding_generator(x[:, prefix:])
        return x

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

    def before_block(self, index: int, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Adds block ``index``'s prompt to the patch tokens."""
        prompt = self.shared_mlp(self.lightweight_mlps[index](state["evp"]))
        return torch.cat([x[:, :prefix], x[:, prefix:] + prompt.to(x.dtype)], dim=1)


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
        """Installs an :class:`EVPTuner` in every ViT."""
        for _, vit in find_vits(model, self.name):
            c = vit.config
            tuner = EVPTuner(c.embed_dim, c.depth, c.in_chans, c.patch_size, int(opts.scale_factor),
                             float(opts.mask_rate), opts.embedding_input)
            set_slot(vit, "tuner", tuner.to(vit.pos_embed.device, vit.pos_embed.dtype), self.name)

    def is_target(self, name: str) -> bool:
        """The prompt generator (the ViT's tuner)."""
        return has_part(name, "tuner")

    def merge(self, model: nn.Module, opts) -> None:
        """Always raises: the prompts depend on the image."""
        raise PeftError("evp cannot be merged: its prompts are computed from each image; run it unmerged")
