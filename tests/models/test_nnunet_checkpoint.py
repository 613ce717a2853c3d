"""Loading nnU-Net v2 and nnssl checkpoints into the plans' network: safe reading, one error listing every
mismatch with the fix, heads skipped, the stem adapted to other channel counts, foreign checkpoints named."""
import pickle

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_tpp import peft
from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
from nnunet_tpp.models.nnunet_networks import prepare_unet
from nnunet_tpp.models.stunet_checkpoint import CheckpointError

COMMON = dict(conv_op=torch.nn.Conv3d, kernel_sizes=3, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
              nonlin_kwargs={"inplace": True}, deep_supervision=True)


def plain(channels=1, classes=3, features=(8, 16, 32), seed=0):
    torch.manual_seed(seed)
    net = PlainConvUNet(input_channels=channels, num_classes=classes, n_stages=3, features_per_stage=features,
                        strides=(1, 2, 2), n_conv_per_stage=2, n_conv_per_stage_decoder=1, **COMMON)
    return prepare_unet(net)


def resenc(channels=1, classes=3, seed=0):
    torch.manual_seed(seed)
    net = ResidualEncoderUNet(input_channels=channels, num_classes=classes, n_stages=3, features_per_stage=(8, 16, 32),
                              strides=(1, 2, 2), n_blocks_per_stage=(1, 2, 2), n_conv_per_stage_decoder=(1, 1),
                              **COMMON)
    return prepare_unet(net)


def _nnunet_file(path, net, network_class="PlainConvUNet", prefix=""):
    plans = {"configurations": {"3d_fullres": {"architecture": {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{network_class}"}}}}
    torch.save({"network_weights": {prefix + k: v for k, v in net.state_dict().items()},
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": {}},
                "trainer_name": "nnUNetTrainer", "current_epoch": 3, "logging": {"train_losses": [1.0, 0.5]},
                "optimizer_state": None, "_best_ema": None}, path)
    return path


def test_every_backbone_tensor_loads_and_heads_and_adapters_stay_new(tmp_path):
    source = plain(classes=5, seed=1)
    path = _nnunet_file(tmp_path / "checkpoint_final.pth", source, prefix="_orig_mod.")
    net = peft.apply(plain(classes=2), "conv_adapter")
    report = load_nnunet_checkpoint(net, path, set(peft.target_parameters(net)))
    for key, value in source.state_dict().items():
        if ".seg_layers." not in key:
            assert torch.equal(net.state_dict()[key], value), key
    assert any(".seg_layers." in k for k in report.skipped) and any(".adapter." in k for k in report.initialised)
    assert not report.new_modules


def test_every_mismatch_is_listed_with_the_fix_and_the_network_is_untouched(tmp_path):
    path = _nnunet_file(tmp_path / "other.pth", plain(features=(8, 16, 24)))
    net = peft.apply(plain(), "conv_adapter")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_nnunet_checkpoint(net, path, set(peft.target_parameters(net)))
    text = str(err.value)
    assert "mis-shaped" in text and "checkpoint (24, " in text and "adopt-plans" in text
    assert "nnUNetv2_move_plans_between_datasets" in text
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_other_architecture_and_stunet_checkpoints_are_named(tmp_path):
    from nnunet_tpp.models.stunet import build_stunet
    resenc_file = _nnunet_file(tmp_path / "resenc.pth", resenc(), network_class="ResidualEncoderUNet")
    with pytest.raises(CheckpointError, match="holds a ResidualEncoderUNet .* these plans build a PlainConvUNet"):
        load_nnunet_checkpoint(plain(), resenc_file)
    torch.save({"state_dict": build_stunet("S", 1, 3).state_dict()}, tmp_path / "stunet.model")
    with pytest.raises(CheckpointError, match="is an STU-Net-S checkpoint.*ConvAdapterTrainer_S"):
        load_nnunet_checkpoint(plain(), tmp_path / "stunet.model")


def test_a_one_channel_model_is_adapted_to_more_channels_keeping_the_output_scale(tmp_path):
    source = plain(channels=1)
    path = _nnunet_file(tmp_path / "ckpt.pth", source)
    net = plain(channels=2)
    report = load_nnunet_checkpoint(net, path)
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert report.repeated_input_channels == [first] and "divided by 2" in str(report)
    weight = source.state_dict()[first]
    assert torch.equal(net.state_dict()[first], torch.cat([weight / 2, weight / 2], dim=1))
    image = torch.randn(1, 1, 8, 8, 8)  # the same image in both channels: the pre-trained first layer's output
    conv = net.encoder.stages[0][0].convs[0].conv
    assert torch.allclose(conv(image.repeat(1, 2, 1, 1, 1)), source.encoder.stages[0][0].convs[0].conv(image),
                          atol=1e-6)


def test_nnssl_checkpoints_load_the_encoder_and_train_a_new_decoder(tmp_path):
    from tests.nnssl_files import resenc_checkpoint
    path, pretrained = resenc_checkpoint(tmp_path / "checkpoint_final.pth", seed=4)
    weights = pretrained.state_dict()
    net = peft.apply(resenc(seed=9), "conv_adapter")
    report = load_nnunet_checkpoint(net, path, set(peft.target_parameters(net)))
    assert report.new_modules == ["decoder"] and "nnssl" in report.source_format
    for key, value in weights.items():
        if key.startswith("encoder."):
            assert torch.equal(net.state_dict()[key], value), key
    assert not torch.equal(net.state_dict()["decoder.stages.0.convs.0.conv.weight"],
                           weights["decoder.stages.0.convs.0.conv.weight"])
    assert any(k.startswith("decoder.stages") for k in report.skipped)
    assert any(".adapter." in k for k in report.initialised)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickles_and_non_checkpoints_are_refused_unread(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"network_weights": {}, "x": Payload()}, f)
    torch.save({"network_weights": {}, "x": Payload()}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError) as err:
            load_nnunet_checkpoint(plain(), tmp_path / name)
        assert "weights_only=False" not in str(err.value)
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_nnunet_checkpoint(plain(), tmp_path / "notes.txt")
