import os

import numpy as np
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import build_stunet
from nnunet_tpp.models.stunet_checkpoint import CheckpointError, load_stunet_checkpoint


def _published_v1(path, net, prefix="module."):
    """Writes a file shaped like a published nnU-Net v1 .model checkpoint (105-class heads, numpy scalars)."""
    sd = {prefix + k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"epoch": 1000, "state_dict": sd, "optimizer_state_dict": None, "amp_grad_scaler": {"scale": 1.0},
                "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [np.float32(0.1)], [np.array([0.8, 0.7])]),
                "best_stuff": (10, np.float64(0.3), np.float64(0.2), 5)}, path)


def test_v1_model_file_loads_every_backbone_tensor_and_skips_heads(tmp_path, tiny_stunet):
    published = build_stunet("S", 1, 105)
    _published_v1(tmp_path / "STUNet_S.model", published)
    net = tiny_stunet("S", classes=3)
    peft.apply(net, "conv_adapter")
    report = load_stunet_checkpoint(net, tmp_path / "STUNet_S.model", set(peft.target_parameters(net)))
    assert report.source_format == "nnU-Net v1" and report.architecture == "STU-Net-S"
    ours = net.state_dict()
    backbone = [k for k in published.state_dict() if not k.startswith("seg_outputs")]
    assert sorted(report.loaded) == sorted(backbone)
    for key in backbone:
        assert torch.equal(ours[key], published.state_dict()[key])
    assert all(k.startswith("seg_outputs") for k in report.skipped) and len(report.skipped) == 10
    assert set(report.initialised) == set(peft.target_parameters(net)) | {
        k for k in ours if k.startswith("seg_outputs")}
    assert "loaded" in str(report) and "skipped 10" in str(report)


def test_v2_pth_with_compile_prefix_and_multichannel_input(tmp_path, tiny_stunet):
    published = build_stunet("S", 1, 105)
    torch.save({"network_weights": {"_orig_mod." + k: v for k, v in published.state_dict().items()},
                "trainer_name": "x"}, tmp_path / "ckpt.pth")
    net = tiny_stunet("S", channels=2)
    report = load_stunet_checkpoint(net, tmp_path / "ckpt.pth")
    first = published.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    assert torch.equal(net.state_dict()["conv_blocks_context.0.0.conv1.weight"], first.repeat(1, 2, 1, 1, 1))
    assert "conv_blocks_context.0.0.conv1.weight" in report.repeated_input_channels


def test_checkpoint_of_another_size_names_both(tmp_path, tiny_stunet):
    torch.save({"network_weights": build_stunet("S", 1, 2).state_dict()}, tmp_path / "s.pth")
    with torch.device("meta"):
        net_b = build_stunet("B", 1, 2)
    with pytest.raises(CheckpointError, match=r"STU-Net-S, but this network is STU-Net-B.*_S"):
        load_stunet_checkpoint(net_b, tmp_path / "s.pth")


def test_other_architecture_and_non_checkpoints_are_rejected(tmp_path, tiny_stunet):
    net = tiny_stunet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)}},
               tmp_path / "plain_unet.pth")
    with pytest.raises(CheckpointError, match="not an STU-Net"):
        load_stunet_checkpoint(net, tmp_path / "plain_unet.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_stunet_checkpoint(net, tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not found"):
        load_stunet_checkpoint(net, tmp_path / "missing.model")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_arbitrary_pickled_objects_are_never_executed(tmp_path, tiny_stunet):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"state_dict": build_stunet("S", 1, 2).state_dict(), "extra": exploit}, tmp_path / "evil.model")
    with pytest.raises(CheckpointError, match="allow-list"):
        load_stunet_checkpoint(tiny_stunet(), tmp_path / "evil.model")
    assert not marker.exists()


def test_missing_backbone_tensor_is_listed(tmp_path, tiny_stunet):
    sd = build_stunet("S", 1, 2).state_dict()
    del sd["conv_blocks_localization.2.0.conv2.weight"]
    torch.save({"network_weights": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing conv_blocks_localization.2.0.conv2.weight"):
        load_stunet_checkpoint(tiny_stunet(), tmp_path / "partial.pth")
