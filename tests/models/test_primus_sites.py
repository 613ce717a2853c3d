"""Primus's transformer description names the modules dynamic_network_architectures builds: EVA blocks with separate
q/k/v projections, a SwiGLU MLP with its inner norm, rotary attention layers, the patch embedding of V1 and V3, and
register tokens as prefix tokens."""
import pytest
from torch import nn

from nnunet_tpp.models.primus_sites import describe_primus
from nnunet_tpp.models.transformer_sites import description_of


def primus(version: str = "V1", registers: int = 0, depth: int = 2) -> nn.Module:
    """A small Primus (24 dims, 4 heads: EVA's 3-D rotary embedding needs 24 / 4 / 1.5 divisible by 4) at 16^3."""
    from dynamic_network_architectures.architectures.primus import Primus, PrimusV3
    kwargs = dict(init_values=0.1, scale_attn_inner=True)
    if version == "V3":
        return PrimusV3(1, 24, (8, 8, 8), 3, depth, 4, (16, 16, 16), **kwargs)
    return Primus(1, 24, (8, 8, 8), 3, depth, 4, (16, 16, 16), num_register_tokens=registers, **kwargs)


def test_primus_blocks_and_their_parts():
    net = primus(depth=3)
    d = description_of(net)
    assert d is not None and d.blocks == ("eva.blocks.0", "eva.blocks.1", "eva.blocks.2")
    assert d.widths == (24,) * 3 and d.heads == (4,) * 3 and d.layout.qkv is None
    for i in range(3):
        for part in (d.layout.q, d.layout.k, d.layout.v, d.layout.attention_out, *d.layout.mlp_in, d.layout.mlp_out):
            assert type(net.get_submodule(d.block_part(i, part))) is nn.Linear, part
        for norm in d.layout.norms:
            assert type(net.get_submodule(d.block_part(i, norm))) is nn.LayerNorm, norm
    assert d.layout.mlp_in == ("mlp.fc1_g", "mlp.fc1_x") and set(d.layout.norms) == {
        "norm1", "norm2", "attn.norm", "mlp.norm"}
    assert d.rotary_prefix == tuple(f"eva.blocks.{i}.attn" for i in range(3))
    assert d.prefix_tokens == 0 and d.token_stream and d.spatial_dims == 3 and d.outer_norms == ("eva.norm",)
    assert d.patch_embed_out == "down_projection.proj" and d.patch_size == 8 and d.prompt_fan_in == 512


def test_without_the_inner_attention_norm_it_is_not_listed():
    from dynamic_network_architectures.architectures.primus import Primus
    d = describe_primus(Primus(1, 24, (8, 8, 8), 3, 1, 4, (16, 16, 16)))
    assert "attn.norm" not in d.layout.norms and "mlp.norm" in d.layout.norms


def test_register_tokens_are_the_prefix_and_v3_embeds_with_its_stem():
    assert description_of(primus(registers=2)).prefix_tokens == 2
    d = description_of(primus("V3"))
    assert d.patch_embed_out == "down_projection" and d.patch_size == 8 and d.in_chans == 1
    assert d.name == "PrimusV3"


def test_a_fused_qkv_is_refused():
    from nnunet_tpp.models.primus_sites import PrimusDescriptionError
    net = primus()
    net.eva.blocks[0].attn.qkv = nn.Linear(24, 72)
    with pytest.raises(PrimusDescriptionError, match="separate q_proj"):
        describe_primus(net)
