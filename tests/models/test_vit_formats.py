"""Every ViT checkpoint format against its owner's code (an independent reference, not our idea of the format).

* timm (supervised), MAE, DINO, DINOv2 (with and without registers): the file is laid out as its owner writes it
  (timm's own model's ``state_dict``; MAE's ``{"model": encoder + decoder}``; DINO's training checkpoint with
  ``teacher`` / ``student``; DINOv2's hub layout, its tensors made here by name and shape, not from our model) and
  loaded twice: through the owner's path into timm's own model (``timm.create_model(..., pretrained=True,
  pretrained_cfg_overlay=dict(file=...))``, which runs timm's ``checkpoint_filter_fn`` for that model; for MAE, the
  ``load_state_dict(strict=False)`` of MAE's ``main_finetune.py`` into timm's ViT), and through ours. Both compute
  the same tokens.
* MedCoSS: the key list and shapes of its published ``Unified_Model`` (``data/medcoss_keys.json``, read off
  yeerwen/MedCoSS) map onto exactly the tensors of ``medcoss_config()``'s ViT-B/16. (That the mapped model computes
  MedCoSS's own forward pass was checked once against MedCoSS's code, which cannot ship with the tests: 7e-7 at
  ViT-B/16, 224 px.)
* No independent reference exists for DINOv2's chunked training layout (``blocks.<chunk>.<i>``) and for the DINO /
  DINOv2 position-embedding resampling rules (timm resamples its own way): they are checked against the hand-written
  ViT (test_vit_parity.py) and against their formulas (test_vit_pretraining.py).
"""
import argparse
import copy
import json
from pathlib import Path

import pytest
import timm
import torch

from nnunet_tpp.models.vit import ViTConfig, build_vit
from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint, medcoss_config
from nnunet_tpp.models.vit_medcoss import MEDCOSS_PRETRAIN_GRID, convert_medcoss

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DATA = Path(__file__).parent / "data"


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _timm_loaded(name: str, path: Path, file_classes: int = 0, **kwargs) -> torch.nn.Module:
    """timm's own model of ``name``, loaded from ``path`` by timm's own pretrained-weights path."""
    overlay = dict(file=str(path), custom_load=False, num_classes=file_classes)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                             **{**TINY, **kwargs}).eval()


def _ours(path: Path, fmt: str, **config) -> torch.nn.Module:
    model = build_vit(ViTConfig(in_chans=3, **{**TINY, **config}))
    load_vit_checkpoint(model, path, fmt=fmt)
    return model.eval()


def _same_tokens(ours: torch.nn.Module, reference: torch.nn.Module, size: int = 16) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = ours(x), reference.forward_features(x)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    other = _random(copy.deepcopy(reference), 99)  # the same model with other weights differs: the test can fail
    with torch.no_grad():
        assert not torch.allclose(a, other.forward_features(x), atol=1e-3)


@pytest.mark.parametrize("size", [16, 24])
def test_timm_supervised_checkpoint(tmp_path, size):
    """A timm model's own state dict, with its 5-class head; at 24 px both resample the position embedding (timm's
    ``resample_abs_pos_embed``, the rule for checkpoints of unknown pre-training)."""
    source = _random(timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY), 0)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    reference = _timm_loaded("vit_tiny_patch16_224", path, file_classes=5, img_size=size)
    _same_tokens(_ours(path, "timm", img_size=size), reference, size)


def test_mae_pre_training_checkpoint(tmp_path):
    """MAE's ``main_pretrain.py`` file: ``{"model": MaskedAutoencoderViT.state_dict(), "optimizer", "epoch",
    "scaler", "args"}``; MAE's fine-tuning loads ``checkpoint["model"]`` with ``strict=False`` into timm's ViT."""
    encoder = _random(timm.create_model("vit_base_patch16_224.mae", **TINY), 1)
    decoder_dim = 16
    block = timm.models.vision_transformer.Block(decoder_dim, 2, 4.0, qkv_bias=True)
    decoder = {"mask_token": torch.randn(1, 1, decoder_dim), "decoder_embed.weight": torch.randn(decoder_dim, 32),
               "decoder_embed.bias": torch.randn(decoder_dim), "decoder_pos_embed": torch.randn(1, 17, decoder_dim),
               **{f"decoder_blocks.0.{k}": v for k, v in block.state_dict().items()},
               "decoder_norm.weight": torch.ones(decoder_dim), "decoder_norm.bias": torch.zeros(decoder_dim),
               "decoder_pred.weight": torch.randn(4 * 4 * 3, decoder_dim), "decoder_pred.bias": torch.zeros(48)}
    path = tmp_path / "mae.pth"
    torch.save({"model": {**encoder.state_dict(), **decoder}, "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)}, path)
    reference = timm.create_model("vit_base_patch16_224.mae", **TINY).eval()
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, weights_only=True)
    result = reference.load_state_dict(checkpoint["model"], strict=False)
    assert result.missing_keys == [] and set(result.unexpected_keys) == set(decoder)
    ours = _ours(path, "mae")
    assert ours.pretraining == "mae"
    _same_tokens(ours, reference)


def test_dino_training_checkpoint(tmp_path):
    """DINO's ``main_dino.py`` checkpoint (``student`` under DDP's ``module.``, ``teacher`` = backbone + head); the
    released weights are the teacher's backbone, which timm's ``.dino`` models load."""
    teacher = _random(timm.create_model("vit_small_patch16_224.dino", **TINY), 2)
    student = _random(timm.create_model("vit_small_patch16_224.dino", **TINY), 3)
    head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer.weight_g": torch.ones(128, 1)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, path)
    released = tmp_path / "dino_pretrain.pth"
    torch.save(teacher.state_dict(), released)
    ours = _ours(path, "auto")
    assert ours.pretraining == "dino"
    _same_tokens(ours, _timm_loaded("vit_small_patch16_224.dino", released))


def _dinov2_hub_file(registers: int, dim: int = 32, depth: int = 2, grid: int = 4, patch: int = 4) -> dict:
    """DINOv2's ``DinoVisionTransformer.state_dict()`` (the hub's ``*_pretrain.pth``), made by name and shape."""
    g = torch.Generator().manual_seed(4)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
             "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
             "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        state["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        state.update({f"blocks.{i}.norm1.weight": 1 + r(dim), f"blocks.{i}.norm1.bias": r(dim),
                      f"blocks.{i}.attn.qkv.weight": r(3 * dim, dim), f"blocks.{i}.attn.qkv.bias": r(3 * dim),
                      f"blocks.{i}.attn.proj.weight": r(dim, dim), f"blocks.{i}.attn.proj.bias": r(dim),
                      f"blocks.{i}.ls1.gamma": r(dim), f"blocks.{i}.norm2.weight": 1 + r(dim),
                      f"blocks.{i}.norm2.bias": r(dim), f"blocks.{i}.mlp.fc1.weight": r(4 * dim, dim),
                      f"blocks.{i}.mlp.fc1.bias": r(4 * dim), f"blocks.{i}.mlp.fc2.weight": r(dim, 4 * dim),
                      f"blocks.{i}.mlp.fc2.bias": r(dim), f"blocks.{i}.ls2.gamma": r(dim)})
    return state


@pytest.mark.parametrize("registers,name", [(0, "vit_small_patch14_dinov2"), (4, "vit_small_patch14_reg4_dinov2")])
def test_dinov2_hub_checkpoint(tmp_path, registers, name):
    path = tmp_path / "dinov2.pth"
    torch.save(_dinov2_hub_file(registers), path)
    ours = _ours(path, "auto", layer_scale=1e-5, num_register_tokens=registers)
    assert ours.pretraining == "dinov2"
    _same_tokens(ours, _timm_loaded(name, path))


def test_medcoss_published_keys_map_onto_the_medcoss_vit():
    """Every tensor of MedCoSS's published model either becomes exactly one tensor of ``medcoss_config()``'s ViT
    (same shape; every ViT tensor covered) or is kept aside (decoder, text and 3-D parts); the 2-D position table of
    its 512 px default has 1024 rows, of which the 14 x 14 of its 224 px pre-training are used."""
    published = json.loads((DATA / "medcoss_keys.json").read_text())["keys"]
    state = {k: torch.empty(shape, device="meta") for k, shape in published.items()}
    backbone, heads, extra = convert_medcoss(state, [], MEDCOSS_PRETRAIN_GRID, ("head.",))
    with torch.device("meta"):
        model = build_vit(medcoss_config())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in backbone.items()} == expected
    positions = {k for k in published if "embeddings_st_pos_2D" in k}
    assert published["video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight"] == [1024, 768]
    assert heads == [] and set(extra) | positions | {k for k in published if k.startswith("fused_encoder.")} | {
        "cls_token", "video_embed.embeddings.weight", "video_embed.embeddings.bias",
        "video_embed.embeddings_norm.weight", "video_embed.embeddings_norm.bias"} == set(published)
    assert {"decoder_pred_2D.weight", "mlm_head.decoder.weight", "video_embed.embeddings_3D.weight"} <= set(extra)
