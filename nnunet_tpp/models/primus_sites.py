"""Where the transformer PEFT methods attach to nnU-Net's 3-D transformer Primus (``Primus``, ``PrimusV3`` of
``dynamic_network_architectures.architectures.primus``): its transformer description.

Primus embeds a volume in 8x8x8 patches (``down_projection``), runs timm's EVA blocks over the tokens
(``eva.blocks.N``: pre-norm ``norm1`` -> ``attn`` -> LayerScale ``gamma_1`` -> residual, ``norm2`` -> ``mlp`` ->
``gamma_2`` -> residual; attention with **separate** ``attn.q_proj`` / ``attn.k_proj`` (no bias) / ``attn.v_proj``,
an inner LayerNorm ``attn.norm`` before ``attn.proj`` when built with ``scale_attn_inner`` as nnU-Net's Primus
trainers do; a **SwiGLU** MLP ``mlp.fc1_g`` / ``mlp.fc1_x`` -> SiLU gate -> ``mlp.norm`` -> ``mlp.fc2``; **rotary
position embeddings** on q and k of the patch tokens, plus a learned absolute ``eva.pos_embed``), a final
``eva.norm``, and decodes with transposed convolutions (``up_projection``, the task head: the description's
``token_head``, whose input is the token grid the masked-reconstruction pretext reads). The token stream is
``[registers, patches]``: no class token; nnU-Net builds Primus without register tokens (``num_register_tokens`` 0),
and when it has some they are EVA's prefix tokens (no rotary rotation), as here.

Where each method goes on Primus (the methods themselves are generic over descriptions, :mod:`nnunet_tpp.peft`):

* **LoRA**: ``attn.q_proj`` and ``attn.v_proj`` of every block by default (the LoRA paper adapts W_q and W_v); they
  are whole ``nn.Linear`` layers here, so Hugging Face ``peft``'s LoRA wraps them (A Kaiming-uniform, B zero, as
  the official loralib). ``targets`` also takes ``k``, ``proj``, ``fc1`` (both SwiGLU inputs), ``fc2``.
* **Adapter** (Houlsby): on the output of ``attn`` (after ``attn.proj``) and of ``mlp`` (after ``mlp.fc2``), before
  LayerScale and the residual sum, as on timm's ViT (before ``ls1`` / ``ls2``); with ``train_norms`` every LayerNorm
  trains: ``norm1``, ``norm2``, the inner ``attn.norm`` and ``mlp.norm``, and ``eva.norm``.
* **AdaptFormer**: reads the residual stream entering ``norm2`` and adds its output to the block output (beside the
  MLP branch and its LayerScale), as on timm's ViT.
* **SSF**: after the patch embedding (V1: ``down_projection.proj``; V3: the whole conv stem, whose output is a sum
  of convolutions, so an SSF there cannot fold into one layer and merging refuses), every block's LayerNorms
  (``norm1``, ``norm2``, ``attn.norm``, ``mlp.norm``), ``q_proj`` / ``k_proj`` / ``v_proj`` (the official SSF scales
  all 3D outputs of a fused ``qkv``), ``attn.proj``, both SwiGLU inputs and ``mlp.fc2``, and ``eva.norm``.
* **BitFit**: every bias (``k_proj`` has none in EVA); the decoder trains as the head.
* **VPT**: prompts inserted after the prefix (register) tokens, before block 0 (deep: replaced before every
  block), removed after the last block, before ``eva.norm``. Official VPT concatenates its prompts after the
  position embedding was added, so prompts have no position; under rotary embeddings the same holds when they are
  not rotated, so the prompts join EVA's unrotated prefix tokens (each attention's ``num_prefix_tokens`` grows by
  the prompt length). Their initialisation bound uses the 3-D patch's fan-in, channels x 8^3.
* **APLA**: a random subset of the rows of every ``attn.proj``.
* **partial**: one quarter of ``eva.blocks`` (give ``quarter``: the pre-training of an nnssl checkpoint is not
  recorded for ``auto``).
* **full** / **linear_probe**: everything / the decoder only.
* **EVP** (2-D FFT of an image) refuses a 3-D Primus; **DTL** works on the token stream as on the ViT.
"""
from __future__ import annotations

from torch import nn

from nnunet_tpp.models.transformer_sites import BlockLayout, TransformerDescription, register_transformer

PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
V3_PATCH = 8  # PrimusV3's residual stem always embeds 8x8x8 patches


class PrimusDescriptionError(ValueError):
    """A Primus whose blocks the description does not know (a fused q/k/v projection)."""


def _patch(net: nn.Module) -> tuple[int, str, int]:
    """(patch side, the layer after which the embedding is complete, input channels)."""
    embed = net.down_projection
    first = next(m for m in embed.modules() if isinstance(m, nn.Conv3d))
    proj = getattr(embed, "proj", None)
    if isinstance(proj, nn.Conv3d):
        sides = set(proj.kernel_size)
        if len(sides) != 1:
            raise PrimusDescriptionError(f"a Primus with anisotropic patches {proj.kernel_size} is not described "
                                         f"(the PEFT methods assume cubic patches)")
        return proj.kernel_size[0], "down_projection.proj", proj.in_channels
    return V3_PATCH, "down_projection", first.in_channels


@register_transformer(PRIMUS_CLASS)
def describe_primus(net: nn.Module) -> TransformerDescription:
    """nnU-Net's Primus (and its subclasses ``PrimusV3`` ...): blocks ``eva.blocks.N`` of one width, no class token.

    Returns:
        The description (names relative to the Primus).
    Raises:
        PrimusDescriptionError: its EVA attention fuses q, k and v (Primus never does).
    """
    blocks = net.eva.blocks
    depth, first = len(blocks), blocks[0]
    if getattr(first.attn, "qkv", None) is not None:
        raise PrimusDescriptionError("this Primus's EVA attention fuses q/k/v (qkv_fused); nnunet_tpp describes "
                                     "Primus with separate q_proj / k_proj / v_proj, as dynamic_network_architectures "
                                     "builds it")
    swiglu = hasattr(first.mlp, "fc1_g")
    inner = tuple(n for n in ("attn.norm", "mlp.norm") if isinstance(first.get_submodule(n), nn.LayerNorm)) \
        if swiglu else tuple(n for n in ("attn.norm",) if isinstance(first.get_submodule(n), nn.LayerNorm))
    layout = BlockLayout(attention="attn", attention_out="attn.proj", qkv=None, q="attn.q_proj", k="attn.k_proj",
                         v="attn.v_proj", mlp="mlp", mlp_in=("mlp.fc1_g", "mlp.fc1_x") if swiglu else ("mlp.fc1",),
                         mlp_out="mlp.fc2", norms=("norm1", "norm2", *inner), mlp_input="norm2")
    dim, heads = net.eva.blocks[0].norm1.normalized_shape[0], first.attn.num_heads
    side, embed_out, channels = _patch(net)
    rotary = tuple(f"eva.blocks.{i}.attn" for i in range(depth)) if net.eva.rope is not None else ()
    return TransformerDescription(
        name=type(net).__name__, blocks=tuple(f"eva.blocks.{i}" for i in range(depth)), widths=(dim,) * depth,
        heads=(heads,) * depth, layout=layout, qkv_layout="stacked", qk_dims=(dim // heads,) * depth,
        v_dims=(dim // heads,) * depth, patch_embed="down_projection", patch_embed_out=embed_out,
        outer_norms=("eva.norm",), prefix_tokens=int(net.eva.num_prefix_tokens), token_stream=True,
        patch_size=side, in_chans=channels, spatial_dims=3, prompt_fan_in=channels * side ** 3,
        rotary_prefix=rotary, token_head="up_projection")
