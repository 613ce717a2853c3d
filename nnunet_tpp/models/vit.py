"""A plain Vision Transformer with timm-style parameter names (written here: timm cannot be imported).

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``reg_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``), so MAE / DINO / DINOv2 checkpoints load with few renames (:mod:`nnunet_tpp.models.vit_checkpoint`).

Token order: ``[cls, registers..., patches]``. The position embedding covers the class token and the
patches (``cls_pos_embed=True``, timm/MAE/DINO) or the patches only (``cls_pos_embed=False``, MedCoSS);
register tokens never get a position. ``pre_norm`` adds a LayerNorm after the position embedding
(``norm_pre``, MedCoSS), over all tokens or (``pre_norm_prefix=False``, MedCoSS) over the patch tokens only;
``final_norm=False`` drops the output LayerNorm (MedCoSS).

PEFT methods extend the network through documented slots instead of editing its code:

* ``Block.adapter_attn`` / ``Block.adapter_mlp``: a module applied to the attention / MLP branch output,
  ``h + adapter(h)`` (sequential adapters, Houlsby);
* ``Block.adapter_parallel``: a module of the block's residual input added beside the MLP branch
  (AdaptFormer);
* ``VisionTransformer.tuner``: a :class:`TokenTuner` that sees the token stream around every block
  (VPT prompts, EVP, DTL's side network).

Two facts about a loaded backbone live on the model as data (set by
:func:`~nnunet_tpp.models.vit_checkpoint.load_vit_checkpoint`): ``pretraining``, the name of its
self-supervised pre-training (a key of :data:`PRETRAININGS`, or None when unknown: random initialisation or a
supervised checkpoint), which ``partial``'s ``quarter: auto`` reads; and ``pos_resampling``, the
:class:`PosResampling` rule of the checkpoint's own code, used whenever the position embedding is resampled
to another grid (at load and for other image sizes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.models.vit_pretraining import (PRETRAININGS, RESAMPLING, PosResampling,  # noqa: F401
                                               Pretraining, resample_patch_pos_embed)


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
        cls_pos_embed: whether the class token has a position (False: MedCoSS).
        pre_norm: LayerNorm after the position embedding (MedCoSS).
        pre_norm_prefix: whether ``norm_pre`` normalises the class and register tokens too (True, timm); False
            normalises the patch tokens only (MedCoSS normalises the patch embeddings before the class token
            joins them).
        final_norm: LayerNorm ``norm`` on the output tokens (True); False makes ``norm`` an identity (MedCoSS's
            encoder has no output norm).
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


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided conv (``proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (DINOv2, CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability ``p`` while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block with the PEFT slots described in the module docstring."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, layer_scale: float | None,
                 drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.adapter_attn: nn.Module | None = None
        self.adapter_mlp: nn.Module | None = None
        self.adapter_parallel: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm1(x))
        if self.adapter_attn is not None:
            h = h + self.adapter_attn(h)
        x = x + self.drop_path(self.ls1(h))
        h = self.mlp(self.norm2(x))
        if self.adapter_mlp is not None:
            h = h + self.adapter_mlp(h)
        out = x + self.drop_path(self.ls2(h))
        if self.adapter_parallel is not None:
            out = out + self.adapter_parallel(x)
        return out


class TokenTuner(nn.Module):
    """Base class of a PEFT module that works on the token stream around the blocks (set as
    ``VisionTransformer.tuner``). Every hook defaults to "change nothing".

    ``state`` is a dict a tuner may use to carry values from :meth:`start` to the later hooks of the
    same forward pass (never across passes). A tuner that sets ``wants_patch_embed = True`` finds the patch
    embeddings before the position embedding in ``state["patch_embed"]`` (see
    :meth:`VisionTransformer.embed`).
    """

    wants_patch_embed: bool = False

    def start(self, x: torch.Tensor, image: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Called once with the embedded tokens (after position embedding) and the input image."""
        return x

    def before_block(self, index: int, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Called before block ``index``."""
        return x

    def after_block(self, index: int, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Called after block ``index``."""
        return x

    def strip(self, x: torch.Tensor, prefix: int, state: dict) -> torch.Tensor:
        """Removes tokens the tuner added (prompts), leaving ``[prefix tokens, patches]``."""
        return x


class VisionTransformer(nn.Module):
    """The ViT backbone: image -> tokens. Heads live outside (:mod:`nnunet_tpp.models.vit_heads`).

    Attributes:
        config: the :class:`ViTConfig`.
        num_prefix_tokens: class token + register tokens.
        tuner: the :class:`TokenTuner` a PEFT method installed, or None.
        pretraining: the name of the backbone's self-supervised pre-training (:data:`PRETRAININGS`), or None
            (random initialisation or unknown); set by the checkpoint loader.
        pos_resampling: the :class:`PosResampling` rule for other grids (MAE's until a checkpoint sets its own).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, config.num_register_tokens, d)) \
            if config.num_register_tokens else None
        self.num_prefix_tokens = 1 + config.num_register_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2 + int(config.cls_pos_embed), d))
        self.norm_pre = nn.LayerNorm(d, eps=config.eps) if config.pre_norm else nn.Identity()
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, config.qkv_bias, config.layer_scale, r, config.eps)
            for r in rates)
        self.norm = nn.LayerNorm(d, eps=config.eps) if config.final_norm else nn.Identity()
        self.tuner: TokenTuner | None = None
        self.pretraining: str | None = None
        self.pos_resampling: PosResampling = RESAMPLING["mae"]
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def grid_for(self, image: torch.Tensor) -> tuple[int, int]:
        """Patches per side of ``image`` (B, C, H, W); raises ValueError for sizes the model cannot take."""
        if image.ndim != 4 or image.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images of shape (B, {self.config.in_chans}, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        if (h // p, w // p) != (self.config.grid,) * 2 and not self.config.dynamic_img_size:
            raise ValueError(f"this ViT was built for {self.config.img_size}x{self.config.img_size} images and "
                             f"dynamic_img_size is off; got {h}x{w}. Resize the images or enable dynamic_img_size")
        return h // p, w // p

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The patch part of the position embedding, resampled to ``grid`` by ``pos_resampling`` when needed:
        (1, N, D)."""
        pos = self.pos_embed[:, int(self.config.cls_pos_embed):]
        return resample_patch_pos_embed(pos, grid, self.pos_resampling)

    def embed(self, image: torch.Tensor, masked: torch.Tensor | None = None, mask_token: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
        """Image -> ``[cls, registers, patches]`` tokens with position embedding (and ``norm_pre``, over
        every token or, with ``pre_norm_prefix=False``, over the patch tokens only).

        Args:
            masked: optional (B, N) bool; those patches' embeddings are replaced by ``mask_token`` (1, 1, D)
                before the position embedding (iBOT / DINOv2 masked-token training).
            keep: optional (B, K) long indices of the patches to keep, the others dropped after the position
                embedding (MAE's encoder sees only the visible patches).
            state: optional dict that receives ``"patch_embed"``: the patch embeddings (B, N, D) of every patch
                before the position embedding (masked ones already replaced by ``mask_token``), for tuners
                that read them (EVP).
        Returns:
            (B, prefix + N or K, D) tokens.
        """
        grid = self.grid_for(image)
        x = self.patch_embed(image)
        if masked is not None:
            x = torch.where(masked[..., None], mask_token.to(x.dtype), x)
        if state is not None:
            state["patch_embed"] = x
        x = x + self.patch_pos_embed(grid)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = self.cls_token
        if self.config.cls_pos_embed:
            cls = cls + self.pos_embed[:, :1]
        parts = [cls.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(x.shape[0], -1, -1))
        if not self.config.pre_norm_prefix:
            return torch.cat(parts + [self.norm_pre(x)], dim=1)
        return self.norm_pre(torch.cat(parts + [x], dim=1))

    def forward_features(self, image: torch.Tensor, taps: tuple[int, ...] = (), masked: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None, keep: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the transformer.

        Args:
            image: (B, C, H, W).
            taps: 0-based block indices whose outputs are returned too (e.g. (2, 5, 8, 11) for UNETR skips).
            masked, mask_token, keep: see :meth:`embed`. A tuner finds them in ``state["keep"]`` and
                ``state["masked"]`` (None when unused) so that per-patch additions can follow the kept patches
                and leave masked ones alone, and (when it ``wants_patch_embed``) the patch embeddings before
                the position embedding in ``state["patch_embed"]`` (B, N, D).
        Returns:
            ``(tokens, tapped)``: the final normalised tokens (B, prefix + N, D) and the raw outputs of the
            tapped blocks, each (B, prefix + N, D), both without any tokens a tuner added.
        """
        state: dict = {"keep": keep, "masked": masked}
        prefix, tuner, tapped = self.num_prefix_tokens, self.tuner, []
        x = self.embed(image, masked, mask_token, keep, state=state if getattr(tuner, "wants_patch_embed", False)
                       else None)
        if tuner is not None:
            x = tuner.start(x, image, prefix, state)
        for i, block in enumerate(self.blocks):
            if tuner is not None:
                x = tuner.before_block(i, x, prefix, state)
            x = block(x)
            if tuner is not None:
                x = tuner.after_block(i, x, prefix, state)
            if i in taps:
                tapped.append(tuner.strip(x, prefix, state) if tuner is not None else x)
        if tuner is not None:
            x = tuner.strip(x, prefix, state)
        return self.norm(x), tapped

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> final normalised tokens (B, prefix + N, D)."""
        return self.forward_features(image)[0]


def build_vit(arch: str | ViTConfig = "vit_base", **overrides) -> VisionTransformer:
    """A randomly initialised :class:`VisionTransformer` of a named architecture (or a config)."""
    cfg = vit_config(arch, **overrides) if isinstance(arch, str) else replace(arch, **overrides)
    return VisionTransformer(cfg)


def config_dict(model: VisionTransformer) -> dict:
    """The model's config as a plain dict (for checkpoints and metrics files)."""
    return asdict(model.config)
