"""The ViT checkpoint loader's mechanics: containers, prefixes, heads and extras kept aside, the errors that name
the fix, the class-token position and grid fitted to the model, unsafe files refused. (Each foreign format against
its owner's code: test_vit_formats.py; against the hand-written ViT: test_vit_parity.py.)"""
import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.models.vit import ViTConfig, VisionTransformer, build_vit, resample_patch_pos_embed
from nnunet_tpp.models.vit_checkpoint import (ViTCheckpointError, detect_format, load_vit_checkpoint,
                                              mae_decoder_state_dict, medcoss_config, save_vit_checkpoint,
                                              vit_state_dict_from_file)

TINY = ViTConfig(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=4, num_heads=3)
SPATIAL = "video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight"
TEMPORAL = "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight"


def _source(cfg: ViTConfig = TINY, seed: int = 0, **overrides) -> VisionTransformer:
    """A model whose every parameter is perturbed, so that a wrong mapping changes the output."""
    torch.manual_seed(seed)
    model = build_vit(cfg, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _fresh(cfg: ViTConfig = TINY, **overrides) -> VisionTransformer:
    torch.manual_seed(123)
    return build_vit(cfg, **overrides).eval()


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def _same_function(a: nn.Module, b: nn.Module, size: int = 32) -> bool:
    x = _image(size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def _mae_decoder(dim: int = 48, dec: int = 32) -> dict:
    return {"mask_token": torch.randn(1, 1, dec), "decoder_embed.weight": torch.randn(dec, dim),
            "decoder_pos_embed": torch.randn(1, 65, dec), "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dec, dec),
            "decoder_norm.weight": torch.ones(dec), "decoder_pred.weight": torch.randn(48, dec)}


def test_timm_mae_checkpoint_loads_and_returns_the_decoder(tmp_path):
    src = _source()
    decoder = _mae_decoder()
    payload = {**src.state_dict(), **decoder, "head.weight": torch.randn(10, 48), "head.bias": torch.zeros(10)}
    path = tmp_path / "mae.pth"
    torch.save({"model": payload, "epoch": 399, "args": argparse.Namespace(model="mae_vit_base", mask_ratio=0.75)},
               path)
    model = _fresh()
    report = load_vit_checkpoint(model, path)
    assert _same_function(src, model)
    assert report.format == "timm" and report.container == "model"
    assert report.skipped == ["head.bias", "head.weight"]
    assert set(report.extra) == set(decoder) and report.interpolated is None
    assert len(report.loaded) == len(model.state_dict())
    got = mae_decoder_state_dict(path)
    assert set(got) == set(decoder) and all(torch.equal(got[k], decoder[k]) for k in decoder)
    text = str(report)
    assert "loaded" in text and "head.weight" in text and "decoder_embed.weight" in text


def test_dino_checkpoint_prefers_the_teacher(tmp_path):
    teacher, student = _source(seed=0), _source(seed=1)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                            "head.mlp.0.weight": torch.randn(64, 48), "head.last_layer.weight_g": torch.ones(256, 1)},
                "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, path)
    model = _fresh()
    report = load_vit_checkpoint(model, path, fmt="dino")
    assert _same_function(teacher, model) and not _same_function(student, model)
    assert report.container == "teacher"
    assert report.skipped == ["head.last_layer.weight_g", "head.mlp.0.weight"]


def _to_dinov2(model: VisionTransformer, chunks: int) -> dict:
    """DINOv2's layout: its position table has a class-token row (a model with registers has none: the row's value
    is taken out of the class token, which the loader folds back)."""
    per_chunk = model.config.depth // chunks
    out = {}
    for key, value in model.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(.+)", key)
        if m and chunks > 1:
            key = f"blocks.{int(m.group(1)) // per_chunk}.{m.group(1)}.{m.group(2)}"
        out["register_tokens" if key == "reg_token" else key] = value
    if model.no_embed_class:
        row = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(3))
        out["pos_embed"] = torch.cat([row, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - row
    out["mask_token"] = torch.zeros(1, model.config.embed_dim)
    return out


@pytest.mark.parametrize("chunks", [1, 2])
def test_dinov2_registers_layer_scale_and_chunked_blocks(tmp_path, chunks):
    src = _source(num_register_tokens=2, layer_scale=1e-5)
    state = _to_dinov2(src, chunks)
    assert ("blocks.1.2.norm1.weight" in state) == (chunks == 2)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    model = _fresh(num_register_tokens=2, layer_scale=1e-5)
    report = load_vit_checkpoint(model, path)
    assert report.format == "dinov2" and report.container == ""
    assert _same_function(src, model)
    assert set(report.extra) == {"mask_token"}
    assert any("registers loaded by timm's checkpoint_filter_fn" in n for n in report.notes)


def test_dinov2_checkpoint_with_registers_into_a_model_without(tmp_path):
    path = tmp_path / "reg.pth"
    torch.save(_to_dinov2(_source(num_register_tokens=4, layer_scale=1e-5), 1), path)
    model = _fresh(layer_scale=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ViTCheckpointError) as err:
        load_vit_checkpoint(model, path)
    text = str(err.value)
    assert "unexpected 1 keys: reg_token" in text and "4 register tokens" in text
    assert "num_register_tokens=4" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left unchanged


def test_layer_scale_mismatch_names_the_fix(tmp_path):
    path = tmp_path / "ls.pth"
    torch.save(_source(layer_scale=1e-5).state_dict(), path)
    with pytest.raises(ViTCheckpointError, match="layer_scale set"):
        load_vit_checkpoint(_fresh(), path)


def _to_medcoss(model: VisionTransformer, table_side: int) -> dict:
    """Our MedCoSS-mode model in MedCoSS's names, with a larger spatial table whose first rows hold the
    positions (minus temporal row 0) and MedCoSS's non-backbone parts."""
    block = {"norm1": "norm1", "norm2": "norm2", "attn.qkv.weight": "self_attn.in_proj_weight",
             "attn.qkv.bias": "self_attn.in_proj_bias", "attn.proj": "self_attn.out_proj", "mlp.fc1": "linear1",
             "mlp.fc2": "linear2", "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}
    top = {"cls_token": "cls_token", "patch_embed.proj": "video_embed.embeddings",
           "norm_pre": "video_embed.embeddings_norm"}
    out = {}
    for key, value in model.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(.+)", key)
        if m:
            name = next(v + m.group(2)[len(k):] for k, v in block.items() if m.group(2).startswith(k))
            out[f"fused_encoder.layers.{m.group(1)}.{name}"] = value
        elif key != "pos_embed":
            out[next(v + key[len(k):] for k, v in top.items() if key.startswith(k))] = value
    d, pos = model.config.embed_dim, model.state_dict()["pos_embed"][0]
    temporal = torch.randn(8, d)
    out[TEMPORAL] = temporal
    out[SPATIAL] = torch.cat([pos - temporal[0], torch.randn(table_side ** 2 - pos.shape[0], d)])
    out.update({"video_embed.embeddings_3D.weight": torch.randn(d, 1, 4, 4, 4), "mask_token": torch.randn(1, 1, 32),
                "decoder_embed.weight": torch.randn(32, d), "decoder_pos_embed_2D": torch.randn(1, 65, 32),
                "token_embed.embeddings.weight": torch.randn(100, d), "mlm_head.bias": torch.zeros(100)})
    return out


def _medcoss_reference(state: dict, image: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """MedCoSS's 2D encoder forward written from its description, on MedCoSS-named tensors."""
    x = F.conv2d(image, state["video_embed.embeddings.weight"], state["video_embed.embeddings.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    d = x.shape[-1]
    x = x + state[SPATIAL][:x.shape[1]] + state[TEMPORAL][0]
    x = F.layer_norm(x, (d,), state["video_embed.embeddings_norm.weight"], state["video_embed.embeddings_norm.bias"],
                     1e-5)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    i = 0
    while f"fused_encoder.layers.{i}.norm1.weight" in state:
        p = {k.split(f"layers.{i}.", 1)[1]: v for k, v in state.items() if k.startswith(f"fused_encoder.layers.{i}.")}
        attn = nn.MultiheadAttention(d, heads, batch_first=True)
        attn.load_state_dict({k[len("self_attn."):]: v for k, v in p.items() if k.startswith("self_attn.")})
        h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], 1e-5)
        x = x + p["gamma_1"] * attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], 1e-5)
        x = x + p["gamma_2"] * F.linear(F.gelu(F.linear(h, p["linear1.weight"], p["linear1.bias"])),
                                        p["linear2.weight"], p["linear2.bias"])
        i += 1
    return x


MEDCOSS_TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)


def test_medcoss_checkpoint_matches_medcoss_forward(tmp_path):
    cfg = medcoss_config(**MEDCOSS_TINY)
    assert (cfg.cls_pos_embed, cfg.pre_norm, cfg.pre_norm_prefix, cfg.final_norm, cfg.eps) == (False, True, False,
                                                                                                False, 1e-5)
    src = _source(cfg)
    state = _to_medcoss(src, table_side=16)
    path = tmp_path / "medcoss.pth"
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(input_size=224)}, path)
    model = _fresh(cfg)
    report = load_vit_checkpoint(model, path, medcoss_grid=8)
    assert report.format == "medcoss" and report.container == "model"
    assert (report.pretraining, report.resampling, model.pretraining) == ("medcoss", "mae", "medcoss")
    assert _same_function(src, model)
    from nnunet_tpp import peft
    from nnunet_tpp.models.vit_heads import ViTClassifier
    partial = peft.apply(ViTClassifier(model, 2), "partial")  # quarter auto: the 3rd after MedCoSS (restorative)
    assert partial.peft_config.trained_modules == ("backbone.blocks.2",)
    with torch.no_grad():
        assert torch.allclose(model(_image()), _medcoss_reference(state, _image(), heads=3, patch=4), atol=1e-5)
    assert {"mask_token", "decoder_embed.weight", "video_embed.embeddings_3D.weight", "token_embed.embeddings.weight",
            "mlm_head.bias"} <= set(report.extra)
    assert set(mae_decoder_state_dict(path)) == {"mask_token", "decoder_embed.weight", "decoder_pos_embed_2D"}
    backbone, fmt = vit_state_dict_from_file(path, "medcoss", medcoss_grid=8)
    assert fmt == "medcoss" and backbone["patch_embed.proj.weight"].shape == (48, 3, 4, 4)
    assert backbone["pos_embed"].shape == (1, 64, 48)


def test_medcoss_checkpoint_needs_the_medcoss_model(tmp_path):
    path = tmp_path / "medcoss.pth"
    torch.save({"model": _to_medcoss(_source(medcoss_config(**MEDCOSS_TINY)), table_side=8)}, path)
    with pytest.raises(ViTCheckpointError) as err:
        load_vit_checkpoint(_fresh(), path)
    text = str(err.value)
    assert "norm_pre.weight" in text and "medcoss_config()" in text and "final_norm=False" in text


def test_timm_checkpoint_into_a_model_without_class_position(tmp_path):
    src = _source()
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    model = _fresh(cls_pos_embed=False)
    report = load_vit_checkpoint(model, path, fmt="timm")
    assert _same_function(src, model)
    assert any("folded into cls_token" in n for n in report.notes)


def test_other_embed_dim_lists_shape_mismatches(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_source(embed_dim=60).state_dict(), path)
    with pytest.raises(ViTCheckpointError) as err:
        load_vit_checkpoint(_fresh(), path)
    text = str(err.value)
    assert "shape mismatches" in text and "cls_token: checkpoint (1, 1, 60) vs model (1, 1, 48)" in text
    assert "more)" in text and "embed_dim is 60" in text


def test_other_position_grid(tmp_path):
    src = _source()
    path = tmp_path / "small.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(ViTCheckpointError) as err:
        load_vit_checkpoint(_fresh(img_size=48), path, interpolate_pos=False)
    assert "checkpoint 8x8 patches, model 12x12" in str(err.value) and "interpolate_pos=True" in str(err.value)
    model = _fresh(img_size=48)
    report = load_vit_checkpoint(model, path)
    assert report.interpolated == "8x8 -> 12x12"
    assert (report.pretraining, report.resampling) == (None, "timm")  # a plain timm state dict: timm's rule
    expected = resample_patch_pos_embed(src.pos_embed[:, 1:].detach(), (12, 12), "timm")
    assert torch.allclose(model.pos_embed[:, 1:], expected)
    assert torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])
    with torch.no_grad():
        assert model(_image(48)).shape == (2, 1 + 144, 48)


def test_save_and_load_round_trip_with_decoder(tmp_path):
    src = _source(num_register_tokens=1)
    decoder = _mae_decoder()
    path = tmp_path / "ours.pth"
    save_vit_checkpoint(src, path, extra=decoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth"]
    model = _fresh(num_register_tokens=1)
    report = load_vit_checkpoint(model, path)
    assert _same_function(src, model)
    assert set(report.extra) == set(decoder)
    assert torch.load(path, weights_only=True)["vit_config"]["num_register_tokens"] == 1
    with pytest.raises(ValueError, match="clash"):
        save_vit_checkpoint(src, path, extra={"cls_token": torch.zeros(1)})


EXECUTED = []


def _mark():
    EXECUTED.append(True)
    return "pwned"


class Payload:
    def __reduce__(self):
        return _mark, ()


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _source().state_dict(), "extra": Payload()}, path)
    with pytest.raises(ViTCheckpointError, match="allow-list"):
        load_vit_checkpoint(_fresh(), path)
    assert EXECUTED == []


def test_unusable_files_and_formats(tmp_path):
    with pytest.raises(ViTCheckpointError, match="not found"):
        load_vit_checkpoint(_fresh(), tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_vit_checkpoint(_fresh(), text)
    path = tmp_path / "timm.pth"
    torch.save(_source().state_dict(), path)
    with pytest.raises(ViTCheckpointError, match="requested as medcoss but its keys are timm"):
        load_vit_checkpoint(_fresh(), path, fmt="medcoss")
    with pytest.raises(ViTCheckpointError, match="unknown ViT checkpoint format"):
        load_vit_checkpoint(_fresh(), path, fmt="clip")
    unet = tmp_path / "unet.pth"
    torch.save({"state_dict": {"conv_blocks_context.0.0.conv1.weight": torch.zeros(2, 1, 3, 3, 3)}}, unet)
    with pytest.raises(ViTCheckpointError, match="not a ViT checkpoint"):
        load_vit_checkpoint(_fresh(), unet)


def test_detect_format():
    assert detect_format({"cls_token": torch.zeros(1, 1, 4)}) == "timm"
    assert detect_format({"cls_token": torch.zeros(1, 1, 4), "mask_token": torch.zeros(1, 4)}) == "dinov2"
    assert detect_format({"cls_token": torch.zeros(1, 1, 4), "mask_token": torch.zeros(1, 1, 4)}) == "timm"
    assert detect_format({"fused_encoder.layers.0.gamma_1": torch.zeros(4)}) == "medcoss"
