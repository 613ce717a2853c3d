"""The ViT backbone: timm's layers, token layout, image-size handling, layer scale, timm parameter names, MedCoSS
flags."""
import pytest
import timm.layers
import timm.models.vision_transformer as timm_vit
import torch
from torch import nn

from nnunet_tpp.models.vit import ViTConfig, VisionTransformer, build_vit, resample_patch_pos_embed

TINY = ViTConfig(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=4, num_heads=3)


def _vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return build_vit(TINY, **overrides).eval()


def test_every_layer_is_timms():
    """No attention, block or patch embedding of our own: the model is timm's VisionTransformer, its parts timm's."""
    model = _vit(layer_scale=1e-5, num_register_tokens=1, pre_norm=True)
    assert isinstance(model, timm_vit.VisionTransformer)
    assert type(model.patch_embed) is timm.layers.PatchEmbed
    for block in model.blocks:
        assert type(block) is timm_vit.Block and type(block.attn) is timm.layers.Attention
        assert type(block.mlp) is timm.layers.Mlp and type(block.ls1) is timm.layers.LayerScale
    own = {type(m).__module__ for m in model.modules()} - {"torch.nn.modules.linear", "torch.nn.modules.normalization",
                                                            "torch.nn.modules.conv", "torch.nn.modules.dropout",
                                                            "torch.nn.modules.activation", "torch.nn.modules.container"}
    assert {m for m in own if not m.startswith("timm.")} == {"nnunet_tpp.models.vit"}  # the class itself only
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-6


@pytest.mark.parametrize("registers", [0, 4])
def test_token_shapes(registers):
    model = _vit(num_register_tokens=registers)
    tokens = model(torch.randn(2, 3, 32, 32))
    assert model.num_prefix_tokens == 1 + registers
    assert tokens.shape == (2, 1 + registers + 64, 48)


def test_taps_return_block_outputs():
    model = _vit()
    tokens, tapped = model.forward_features(torch.randn(1, 3, 32, 32), taps=(1, 3))
    assert len(tapped) == 2 and all(t.shape == tokens.shape for t in tapped)


def test_pos_embed_resampling_keeps_same_grid_and_handles_other_sizes():
    model = _vit(num_register_tokens=2)
    assert model.no_embed_class  # registers: timm's DINOv2-with-registers layout, no class-token position
    pos = model.pos_embed
    assert torch.equal(resample_patch_pos_embed(pos, (8, 8)), pos)
    assert torch.equal(model.patch_pos_embed((8, 8)), pos)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    bigger = model(torch.randn(2, 3, 48, 40))
    assert bigger.shape == (2, 3 + 12 * 10, 48)
    assert torch.isfinite(bigger).all()
    assert resample_patch_pos_embed(pos, (12, 10)).shape == (1, 120, 48)


def test_fixed_image_size_rejects_other_sizes():
    model = _vit(dynamic_img_size=False)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 65, 48)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 3, 48, 48))


def test_bad_inputs_raise_clear_errors():
    model = _vit()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="not divisible"):
        build_vit(TINY, num_heads=5)


def test_layer_scale_parameters_and_init():
    model = _vit(layer_scale=1e-5)
    names = dict(model.named_parameters())
    for i in range(TINY.depth):
        for ls in ("ls1", "ls2"):
            gamma = names[f"blocks.{i}.{ls}.gamma"]
            assert gamma.shape == (48,) and torch.all(gamma == 1e-5)
    assert not any("gamma" in k for k in _vit().state_dict())


def test_state_dict_uses_timm_names():
    keys = set(_vit(num_register_tokens=4, layer_scale=1e-5).state_dict())
    for name in ("cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                 "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "blocks.3.norm2.bias", "blocks.3.mlp.fc1.weight",
                 "blocks.3.mlp.fc2.bias", "blocks.3.ls2.gamma", "norm.weight", "norm.bias"):
        assert name in keys
    sd = _vit().state_dict()
    assert sd["pos_embed"].shape == (1, 65, 48)
    assert sd["blocks.0.attn.qkv.weight"].shape == (144, 48)


def test_no_class_position_and_pre_norm():
    model = _vit(cls_pos_embed=False, pre_norm=True)
    assert model.pos_embed.shape == (1, 64, 48)
    assert "norm_pre.weight" in model.state_dict()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 65, 48)


def test_pre_norm_on_patches_only_leaves_class_token_untouched():
    model = _vit(cls_pos_embed=False, pre_norm=True, pre_norm_prefix=False, num_register_tokens=1)
    tokens = model.embed(torch.randn(2, 3, 32, 32))
    assert torch.equal(tokens[:, 0], model.cls_token[0].expand(2, -1))
    assert torch.equal(tokens[:, 1], model.reg_token[0].expand(2, -1))
    patches = tokens[:, 2:]
    assert torch.allclose(patches.mean(-1), torch.zeros(2, 64), atol=1e-5)  # LayerNorm at its initial affine
    full = _vit(cls_pos_embed=False, pre_norm=True).embed(torch.randn(2, 3, 32, 32))
    assert torch.allclose(full[:, 0].mean(-1), torch.zeros(2), atol=1e-5)  # default: every token normalised


def test_without_final_norm_the_output_is_the_last_block():
    model = _vit(final_norm=False)
    assert not any(k.startswith("norm.") for k in model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    tokens, tapped = model.forward_features(x, taps=(3,))
    assert torch.equal(tokens, tapped[0])
    default_tokens, default_tapped = _vit().forward_features(x, taps=(3,))
    assert not torch.equal(default_tokens, default_tapped[0])
