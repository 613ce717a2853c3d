"""nnssl checkpoints (files in nnssl's exact format, read with weights_only=True) into Primus and ResEnc-L as nnU-Net
master's pretrained route loads them: encoder and stem only, the stem repeated over the channels and divided by
their number, the learned position embedding resized to the new patch (checked against hand-computed values)."""
import pickle

import pytest
import torch

from nnunet_tpp.models.nnssl_checkpoint import (AdaptationPlanError, read_adaptation_plan, repeat_stem_weight,
                                               resize_position_embedding)
from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
from nnunet_tpp.models.primus import NNSSL_PRESETS, PrimusSpec, build_primus
from nnunet_tpp.models.stunet_checkpoint import CheckpointError
from tests.nnssl_files import primus_checkpoint, resenc_checkpoint

TINY = PrimusSpec("tiny", "V1", 192, 4, 4, drop_path_rate=0.2)


def test_position_embedding_resize_matches_hand_computed_trilinear_values():
    # a 2x2x2 grid of tokens whose value is 10*x + 3*y + z (x slowest), 2 channels (the second: minus the first)
    grid = torch.tensor([[10.0 * x + 3 * y + z for x in range(2) for y in range(2) for z in range(2)]])
    pos = torch.stack([grid, -grid], dim=-1)  # (1, 8, 2)
    out = resize_position_embedding(pos, (2, 2, 2), (4, 2, 2))
    # align_corners=False, 2 -> 4 along x: sample points -0.25, 0.25, 0.75, 1.25 clamp to 0, 0.25, 0.75, 1
    expected = torch.tensor([[10.0 * x + 3 * y + z for x in (0, 0.25, 0.75, 1) for y in range(2) for z in range(2)]])
    assert out.shape == (1, 16, 2)
    assert torch.allclose(out[..., 0], expected) and torch.allclose(out[..., 1], -expected)
    down = resize_position_embedding(pos, (2, 2, 2), (1, 2, 2))  # 2 -> 1: the mean of both x
    assert torch.allclose(down[0, :, 0], torch.tensor([5.0 + 3 * y + z for y in range(2) for z in range(2)]))
    assert torch.equal(resize_position_embedding(pos, (2, 2, 2), (2, 2, 2)), pos)
    with pytest.raises(ValueError, match="not a 2x2x3 grid"):
        resize_position_embedding(pos, (2, 2, 3), (2, 2, 2))


def test_stem_repeat_divides_by_the_channel_count():
    weight = torch.arange(6.0).reshape(2, 1, 1, 1, 3)
    out = repeat_stem_weight(weight, 3)
    assert out.shape == (2, 3, 1, 1, 3) and torch.equal(out[:, 2], weight[:, 0] / 3)
    with pytest.raises(ValueError, match="only a 1-channel stem"):
        repeat_stem_weight(out, 2)


def test_a_primus_takes_encoder_and_stem_and_resizes_the_position_embedding(tmp_path):
    path, mae = primus_checkpoint(tmp_path / "checkpoint_final.pth", patch=(32, 32, 32), seed=3)
    assert torch.load(path, weights_only=True)["init_args"]["device"] == torch.device("cpu")  # nnssl's exact dict
    source = mae.state_dict()
    torch.manual_seed(0)
    net = build_primus(TINY, 2, 3, (32, 32, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_nnunet_checkpoint(net, path)
    state = net.state_dict()
    for key, value in source.items():
        if key.startswith("eva.") and key != "eva.pos_embed":
            assert torch.equal(state[key], value), key
    assert torch.equal(state["down_projection.proj.bias"], source["down_projection.proj.bias"])
    weight = source["down_projection.proj.weight"]
    assert torch.equal(state["down_projection.proj.weight"], torch.cat([weight / 2, weight / 2], dim=1))
    # the 4x4x4 grid of the pre-training patch, resized to the 4x4x2 grid of (32, 32, 16): along z, 4 -> 2 averages
    # neighbouring pairs (align_corners=False samples at 0.5 and 2.5)
    old = source["eva.pos_embed"].reshape(4, 4, 4, 192)
    expected = ((old[:, :, 0::2] + old[:, :, 1::2]) / 2).reshape(1, 32, 192)
    assert torch.allclose(state["eva.pos_embed"], expected, atol=1e-6)
    assert report.resized == {"eva.pos_embed": ((4, 4, 4), (4, 4, 2))} and "resized" in str(report)
    assert report.new_modules == ["up_projection"] and report.channels == 2
    assert all(torch.equal(state[k], before[k]) for k in state if k.startswith("up_projection."))
    assert torch.equal(state["mask_token"], before["mask_token"])  # the MAE's own mask token is not Primus's
    assert any(k.startswith("decoder.") for k in report.skipped) and "mask_token" in report.skipped
    image = torch.randn(1, 1, 32, 32, 16)  # one image in both channels gives the pre-trained embedding
    assert torch.allclose(net.down_projection(image.repeat(1, 2, 1, 1, 1)), mae.down_projection(image), atol=1e-5)


def test_other_primus_sizes_and_architectures_are_refused_unchanged(tmp_path):
    path, _ = primus_checkpoint(tmp_path / "primus.pth")
    other = build_primus(PrimusSpec("other", "V1", 96, 4, 2), 1, 3, (32, 32, 32))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="holds a Primus \\(192 dims, depth 4, 4 heads\\) encoder, but these plans "
                                              "build other \\(96 dims"):
        load_nnunet_checkpoint(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    from tests.models.test_nnunet_checkpoint import resenc
    with pytest.raises(CheckpointError, match="nnssl checkpoint of a PrimusX encoder .* these plans build a "
                                              "ResidualEncoderUNet.*adopt-plans"):
        load_nnunet_checkpoint(resenc(), path)
    resenc_file, _ = resenc_checkpoint(tmp_path / "resenc.pth")
    with pytest.raises(CheckpointError, match="ResidualEncoderUNet encoder .* these plans build a Primus"):
        load_nnunet_checkpoint(build_primus(TINY, 1, 3, (32, 32, 32)), resenc_file)


def test_incomplete_adaptation_plans_are_named():
    checkpoint = {"network_weights": {}, "nnssl_adaptation_plan": {"key_to_encoder": "eva", "key_to_stem": "x",
                                                                   "architecture_plans": {}}}
    with pytest.raises(AdaptationPlanError, match="lacks \\['pretrain_plan', 'pretrain_num_input_channels', "
                                                  "'recommended_downstream_patchsize', 'keys_to_in_proj', "
                                                  "'architecture_plans.arch_class_name', 'pretrain_plan.configurations'"):
        read_adaptation_plan(checkpoint, "x.pth")
    with pytest.raises(AdaptationPlanError, match="no nnssl_adaptation_plan"):
        read_adaptation_plan({"network_weights": {}}, "x.pth")


def test_real_sizes_fit_checked_on_the_meta_device(tmp_path):
    """Primus-M and ResEnc-L as nnssl publishes them (shape-only files) fit the networks our plans build, also at a
    CPU-sized patch (position embedding 20^3 -> 8x8x4 tokens)."""
    from nnunet_tpp.adopt_nnssl import RESENC_L
    from nnunet_tpp.models.nnunet_networks import build_from_plans
    path, _ = primus_checkpoint(tmp_path / "primus_m.pth", 864, 16, 12, (160, 160, 160), (160, 160, 160), "PrimusM",
                                meta=True)
    for patch in ((160, 160, 160), (64, 64, 32)):
        with torch.device("meta"):
            net = build_primus(NNSSL_PRESETS["PrimusM"], 1, 4, patch)
        report = load_nnunet_checkpoint(net, path, check_only=True)
        assert report.new_modules == ["up_projection"]
        assert report.resized == ({} if patch[0] == 160 else {"eva.pos_embed": ((20, 20, 20), (8, 8, 4))})
    path, _ = resenc_checkpoint(tmp_path / "resenc_l.pth", preset="ResEncL", meta=True)

    class Config:  # what build_from_plans reads of nnU-Net's ConfigurationManager
        network_arch_class_name = RESENC_L["network_class_name"]
        network_arch_init_kwargs = RESENC_L["arch_kwargs"]
        network_arch_init_kwargs_req_import = RESENC_L["_kw_requires_import"]
    with torch.device("meta"):
        net = build_from_plans(Config(), 2, 4)
    report = load_nnunet_checkpoint(net, path, check_only=True)
    assert report.new_modules == ["decoder"] and report.repeated_input_channels == ["encoder.stem.convs.0.conv.weight"]
    assert not [k for k in report.skipped if k.startswith("encoder.")]  # every encoder tensor found its place


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_an_nnssl_file_with_foreign_objects_is_refused_unread(tmp_path, capsys):
    path, _ = primus_checkpoint(tmp_path / "ok.pth")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["init_args"]["pretrain_json"] = Payload()
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load_nnunet_checkpoint(build_primus(TINY, 1, 3, (32, 32, 32)), tmp_path / "evil.pth")
    with open(tmp_path / "evil_legacy.pth", "wb") as f:
        pickle.dump(checkpoint, f)
    with pytest.raises(CheckpointError):
        load_nnunet_checkpoint(build_primus(TINY, 1, 3, (32, 32, 32)), tmp_path / "evil_legacy.pth")
    assert "pwned" not in capsys.readouterr().out
