"""Position-embedding resampling as each checkpoint's own code does it, each checked against its formula
written here with plain ``F.interpolate`` calls (MAE ``interpolate_pos_embed``, timm ``resample_abs_pos_embed``,
DINO / DINOv2 ``interpolate_pos_encoding``), at load and for inputs of other sizes."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_tpp.models.vit import ViTConfig, build_vit, resample_patch_pos_embed
from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint, save_vit_checkpoint
from nnunet_tpp.models.vit_pretraining import PRETRAININGS, RESAMPLING, pretraining_kind

M, D = 8, 24  # checkpoint grid and width


def grid_image(pos: torch.Tensor) -> torch.Tensor:
    return pos.reshape(1, M, M, D).permute(0, 3, 1, 2)


def flat(img: torch.Tensor) -> torch.Tensor:
    return img.permute(0, 2, 3, 1).reshape(1, -1, D)


# the reference formulas, one per code base, for a new grid (rows, cols)
FORMULAS = {
    "mae": lambda img, g: F.interpolate(img, size=g, mode="bicubic", align_corners=False),
    "timm": lambda img, g: F.interpolate(img, size=g, mode="bicubic", antialias=True),
    "dino": lambda img, g: F.interpolate(img, scale_factor=((g[0] + 0.1) / M, (g[1] + 0.1) / M), mode="bicubic"),
    "dinov2": lambda img, g: F.interpolate(img, mode="bicubic", antialias=False,
                                           scale_factor=(float(g[0] + 0.1) / M, float(g[1] + 0.1) / M)),
    "dinov2_reg": lambda img, g: F.interpolate(img, mode="bicubic", antialias=True, size=g),
}


@pytest.mark.parametrize("rule", sorted(RESAMPLING))
@pytest.mark.parametrize("grid", [(12, 12), (5, 5), (12, 10)])
def test_each_rule_is_its_code_bases_formula(rule, grid):
    pos = torch.randn(1, M * M, D, generator=torch.Generator().manual_seed(0))
    expected = flat(FORMULAS[rule](grid_image(pos), grid))
    assert torch.equal(resample_patch_pos_embed(pos, grid, rule), expected)
    assert resample_patch_pos_embed(pos, (M, M), rule) is pos  # the same grid is never resampled


def test_the_rules_differ():
    """The differences the rules exist for (a test that cannot tell them apart would pass for any)."""
    pos = torch.randn(1, M * M, D, generator=torch.Generator().manual_seed(1))
    out = {rule: resample_patch_pos_embed(pos, (12, 12), rule) for rule in ("mae", "timm", "dino")}
    for a, b in (("mae", "timm"), ("mae", "dino"), ("timm", "dino")):
        assert (out[a] - out[b]).norm() / out[a].norm() > 1e-3, (a, b)


def _checkpoint(tmp_path, fmt: str, registers: int = 0):
    cfg = ViTConfig(img_size=M * 4, patch_size=4, in_chans=3, embed_dim=D, depth=2, num_heads=3,
                    num_register_tokens=registers)
    torch.manual_seed(0)
    src = build_vit(cfg)
    with torch.no_grad():
        src.pos_embed.normal_()
    path = tmp_path / f"{fmt}.pth"
    state = src.state_dict()
    if fmt == "dinov2":  # DINOv2's own names; its position table always has a class-token row
        state = {("register_tokens" if k == "reg_token" else k): v for k, v in state.items()}
        if registers:
            state["pos_embed"] = torch.cat([torch.zeros(1, 1, D), state["pos_embed"]], dim=1)
    torch.save(state, path)
    return cfg, src, path


@pytest.mark.parametrize("fmt,registers,rule", [("mae", 0, "mae"), ("dino", 0, "dino"), ("path_dino", 0, "timm"),
                                                ("timm", 0, "timm"), ("auto", 0, "timm"), ("dinov2", 0, "dinov2"),
                                                ("dinov2", 4, "dinov2_reg")])
def test_the_loader_resamples_as_the_checkpoints_code_and_keeps_the_rule(tmp_path, fmt, registers, rule):
    cfg, src, path = _checkpoint(tmp_path, fmt, registers)
    model = build_vit(cfg, img_size=12 * 4)
    report = load_vit_checkpoint(model, path, fmt=fmt)
    assert report.resampling == rule and model.pos_resampling == RESAMPLING[rule]
    first = 0 if src.no_embed_class else 1  # a model with registers has no class-token position (timm's layout)
    patches = src.pos_embed[:, first:].detach()
    assert torch.equal(model.pos_embed[:, first:].detach(), flat(FORMULAS[rule](grid_image(patches), (12, 12))))
    assert torch.equal(model.pos_embed[:, :first], src.pos_embed[:, :first])
    # other input sizes (dynamic image size) use the same rule, from the loaded grid
    same = build_vit(cfg)
    load_vit_checkpoint(same, path, fmt=fmt)
    assert torch.equal(same.patch_pos_embed((10, 6)).detach(), flat(FORMULAS[rule](grid_image(patches), (10, 6))))
    assert report.pretraining == (None if fmt in ("timm", "auto") else fmt)
    if report.pretraining:
        assert pretraining_kind(report.pretraining) == PRETRAININGS[fmt].kind


def test_a_forced_rule_and_a_recorded_pre_training(tmp_path):
    cfg, src, path = _checkpoint(tmp_path, "timm")
    model = build_vit(cfg, img_size=12 * 4)
    assert load_vit_checkpoint(model, path, pos_resampling="mae").resampling == "mae"
    patches = src.pos_embed[:, 1:].detach()
    assert torch.equal(model.pos_embed[:, 1:].detach(), flat(FORMULAS["mae"](grid_image(patches), (12, 12))))
    with pytest.raises(ValueError, match="unknown pos_resampling"):
        load_vit_checkpoint(build_vit(cfg), path, pos_resampling="nearest")
    ours = tmp_path / "ours.pth"
    save_vit_checkpoint(src, ours, pretraining="mae")  # e.g. the upstream MAE pre-training
    again = build_vit(cfg)
    assert load_vit_checkpoint(again, ours).pretraining == "mae" and again.pretraining == "mae"
    with pytest.raises(ValueError, match="unknown pretraining"):
        save_vit_checkpoint(src, ours, pretraining="simclr")
    assert build_vit(cfg).pretraining is None and build_vit(cfg).pos_resampling.name == "mae"  # random init
