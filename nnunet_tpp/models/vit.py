"""The 2-D branch's Vision Transformer: timm's ``VisionTransformer`` built from a small config, plus what the
package's stages need on top of timm's forward pass (MAE's kept patches, iBOT's masked patches, tapped blocks).

Every layer is timm's (``PatchEmbed``, ``Block`` with ``Attention``, ``Mlp`` and ``LayerScale``, the LayerNorms), so
parameter names are timm's: ``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``, ``norm_pre``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``.

Token order: ``[cls, registers..., patches]``. :class:`ViTConfig` maps onto timm's options: ``cls_pos_embed=False``
(MedCoSS) is timm's ``no_embed_class``; a model with register tokens is always built ``no_embed_class`` (as timm's
DINOv2-with-registers models), and a checkpoint's class-token position is folded into ``cls_token`` on loading,
which is exact. One layout has no timm option: MedCoSS normalises the patch tokens after the position embedding and
before the class token joins them (``pre_norm_prefix=False``), where timm's ``norm_pre`` normalises every token;
:meth:`VisionTransformer.embed` assembles the tokens for both (``norm_pre`` is timm's LayerNorm either way; timm's
own ``pre_norm`` flag is not used because it also drops the patch embedding's bias, as CLIP does).

Two facts about a loaded backbone live on the model as data (set by
:func:`~nnunet_tpp.models.vit_checkpoint.load_vit_checkpoint`): ``pretraining`` (a key of
:data:`~nnunet_tpp.models.vit_pretraining.PRETRAININGS` or None), which ``partial``'s ``quarter: auto`` reads, and
``pos_resampling``, the rule of the checkpoint's own code used whenever the position embedding meets another grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from nnunet_tpp.models.vit_pretraining import (PRETRAININGS, RESAMPLING, PosResampling,  # noqa: F401
                                               resample_patch_pos_embed)


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a :class:`VisionTransformer`.

    Attributes:
        img_size: the training image side (pixels); the position embedding has ``(img_size/patch)^2`` patches.
        patch_size: side of a square patch.
        in_chans: image channels (1 grey, 3 RGB).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual transformer sizes.
        layer_scale: initial value of the per-channel layer scale (DINOv2: 1e-5), or None for none.
        num_register_tokens: extra learned tokens after the class token (DINOv2 with registers).
        cls_pos_embed: whether the class token has a position (False: MedCoSS; always False with registers).
        pre_norm: LayerNorm ``norm_pre`` after the position embedding (MedCoSS).
        pre_norm_prefix: whether ``norm_pre`` normalises the class and register tokens too (True); False normalises
            the patch tokens only, before the class token joins them (MedCoSS).
        final_norm: LayerNorm ``norm`` on the output tokens (True); False makes it an identity (MedCoSS).
        dynamic_img_size: interpolate the position embedding when an input has another size; when False
            such an input raises an error.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        eps: LayerNorm epsilon.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale: float | None = None
    num_register_tokens: int = 0
    cls_pos_embed: bool = True
    pre_norm: bool = False
    dynamic_img_size: bool = True
    drop_path_rate: float = 0.0
    eps: float = 1e-6
    pre_norm_prefix: bool = True
    final_norm: bool = True

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    def validate(self) -> None:
        """Raises ValueError for sizes that cannot build a ViT."""
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


ARCHS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
}


def vit_config(arch: str, **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of a named architecture (``vit_tiny``, ``vit_small``, ``vit_base``,
    ``vit_large``; all patch 16 unless overridden) with ``overrides`` applied."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT architecture {arch!r}; known: {', '.join(ARCHS)}")
    cfg = replace(ARCHS[arch], **overrides)
    cfg.validate()
    return cfg


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT (no classifier: heads live in :mod:`nnunet_tpp.models.vit_heads`) built from a :class:`ViTConfig`.

    Attributes:
        config: the :class:`ViTConfig`.
        pretraining: the backbone's self-supervised pre-training, or None; set by the checkpoint loader.
        pos_resampling: the :class:`PosResampling` rule for other grids (MAE's until a checkpoint sets its own).
        token_state: during :meth:`forward_features`, the ``masked``, ``mask_token`` and ``keep`` arguments of the
            call (empty otherwise), for PEFT modules that must follow them (EVP).
    """

    def __init__(self, config: ViTConfig):
        config.validate()
        super().__init__(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                         num_classes=0, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
                         mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, init_values=config.layer_scale,
                         no_embed_class=not config.cls_pos_embed or config.num_register_tokens > 0,
                         reg_tokens=config.num_register_tokens, final_norm=config.final_norm,
                         dynamic_img_size=config.dynamic_img_size, drop_path_rate=config.drop_path_rate,
                         norm_layer=partial(nn.LayerNorm, eps=config.eps))
        if config.pre_norm:
            self.norm_pre = nn.LayerNorm(config.embed_dim, eps=config.eps)
        self.config = config
        self.pretraining: str | None = None
        self.pos_resampling: PosResampling = RESAMPLING["mae"]
        self.token_state: dict = {}

    def grid_for(self, image: torch.Tensor) -> tuple[int, int]:
        """Patches per side of ``image`` (B, C, H, W); raises ValueError for sizes the model cannot take."""
        c = self.config
        if image.ndim != 4 or image.shape[1] != c.in_chans:
            raise ValueError(f"expected images of shape (B, {c.in_chans}, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {c.patch_size}")
        if (h // c.patch_size, w // c.patch_size) != (c.grid,) * 2 and not c.dynamic_img_size:
            raise ValueError(f"this ViT was built for {c.img_size}x{c.img_size} images and dynamic_img_size is "
                             f"off; got {h}x{w}. Resize the images or enable dynamic_img_size")
        return h // c.patch_size, w // c.patch_size

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The patch part of the position embedding, resampled to ``grid`` by ``pos_resampling``: (1, N, D)."""
        pos = self.pos_embed[:, 0 if self.no_embed_class else self.num_prefix_tokens:]
        return resample_patch_pos_embed(pos, grid, self.pos_resampling)

    def embed(self, image: torch.Tensor, masked: torch.Tensor | None = None, mask_token: torch.Tensor | None = None,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> ``[cls, registers, patches]`` tokens with position embedding and ``norm_pre``.

        Args:
            masked: optional (B, N) bool; those patches' embeddings are replaced by ``mask_token`` (1, 1, D)
                before the position embedding (iBOT / DINOv2 masked-token training).
            keep: optional (B, K) long indices of the patches to keep after the position embedding (MAE's
                encoder sees only the visible patches).
        Returns:
            (B, prefix + N or K, D) tokens.
        """
        grid = self.grid_for(image)
        x = self.patch_embed(image).reshape(image.shape[0], grid[0] * grid[1], self.embed_dim)
        if masked is not None:
            x = torch.where(masked[..., None], mask_token.to(x.dtype), x)
        x = x + self.patch_pos_embed(grid)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = self.cls_token if self.no_embed_class else self.cls_token + self.pos_embed[:, :1]
        prefix = [cls.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if not self.config.pre_norm_prefix:
            return torch.cat(prefix + [self.norm_pre(x)], dim=1)
        return self.norm_pre(torch.cat(prefix + [x], dim=1))

    def forward_features(self, image: torch.Tensor, taps: tuple[int, ...] = (), masked: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None, keep: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the transformer (timm's blocks, one by one).

        Args:
            image: (B, C, H, W).
            taps: 0-based block indices whose outputs are returned too (e.g. (2, 5, 8, 11) for UNETR skips).
            masked, mask_token, keep: see :meth:`embed` (also in ``token_state`` during the call).
        Returns:
            ``(tokens, tapped)``: the final normalised tokens (B, prefix + N, D) and the outputs of the tapped blocks
            as the blocks give them (tokens a PEFT method inserted after the prefix included; the patch tokens are
            always the last ones).
        """
        self.token_state.update(masked=masked, mask_token=mask_token, keep=keep)
        try:
            x = self.embed(image, masked, mask_token, keep)
            tapped = []
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in taps:
                    tapped.append(x)
            return self.norm(x), tapped
        finally:
            self.token_state.clear()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> final normalised tokens (B, prefix + N, D)."""
        return self.forward_features(image)[0]


def build_vit(arch: str | ViTConfig = "vit_base", **overrides) -> VisionTransformer:
    """A randomly initialised :class:`VisionTransformer` (timm's initialisation) of a named architecture or a
    config, with ``overrides`` applied."""
    cfg = vit_config(arch, **overrides) if isinstance(arch, str) else replace(arch, **overrides)
    return VisionTransformer(cfg)


def config_dict(model: VisionTransformer) -> dict:
    """The model's config as a plain dict (for checkpoints and metrics files)."""
    return asdict(model.config)
