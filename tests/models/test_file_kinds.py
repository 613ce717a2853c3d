"""nnunet_tpp.models.file_kinds: every kind of file is named as such, nothing unsafe is unpickled, and no message
suggests weights_only=False (issue 15)."""
import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from nnunet_tpp.models import file_kinds as fk
from nnunet_tpp import peft
from nnunet_tpp.models.stunet import build_stunet
from nnunet_tpp.models.stunet_checkpoint import CheckpointError, load_stunet_checkpoint, read_checkpoint
from tests.conftest import CT_IMAGE, require


def _hashes(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every kind, written the way the real writers write them."""
    from nnunet_tpp.pretext.stage import save_target_parameters
    d = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    net = build_stunet("S", 1, 3)
    published = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"epoch": 1000, "state_dict": {"module." + k: v for k, v in published.items()},
                "plot_stuff": ([np.float64(0.5)], [np.array([0.8, 0.7])])}, d / "STUNet_S.model")
    torch.save({"network_weights": published, "trainer_name": "STUNetTrainer_S"}, d / "STUNet_S.pth")
    torch.save(published, d / "stunet_state_dict.pt")
    peft.apply(net, "conv_adapter")
    peft.save(net, d / "peft_weights.pth", extra={"trainer_name": "ConvAdapterTrainer_S"})
    save_target_parameters(net, str(d / "tpp_target_parameters.pth"))
    plans = {"configurations": {"3d_fullres": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}}}}
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(4, 1, 3, 3, 3)},
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0},
                "trainer_name": "nnUNetTrainer", "current_epoch": 3}, d / "nnunet_checkpoint_final.pth")
    torch.save(torch.nn.Linear(3, 2).state_dict(), d / "linear.pt")
    torch.save({"student": {}, "teacher": {}, "epoch": 2, "losses": [1.0]}, d / "tpp_state.pth")
    torch.save({"weights": _Exploit(d / "pwned")}, d / "evil.pth")
    with open(d / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    (d / "notes.txt").write_text("STUNet_S.model is in the other folder\n")
    (d / "empty.pth").write_bytes(b"")
    with zipfile.ZipFile(d / "archive.zip", "w") as z:
        z.writestr("readme.txt", "x")
    (d / "ct.nii.gz").write_bytes(require(CT_IMAGE).read_bytes())  # the real CT
    torch.save(torch.zeros(3), d / "tensor.pt")
    return d


KINDS = {
    "STUNet_S.model": (fk.STUNET, "an STU-Net-S checkpoint (nnU-Net v1 .model: state_dict)"),
    "STUNet_S.pth": (fk.STUNET, "an STU-Net-S checkpoint (nnU-Net v2 .pth: network_weights, trainer STUNetTrainer_S)"),
    "stunet_state_dict.pt": (fk.STUNET, "an STU-Net-S checkpoint (a plain state dict)"),
    "peft_weights.pth": (fk.ADAPTER, "an nnunet_tpp adapter file (nnunet_tpp.peft/"),
    "tpp_target_parameters.pth": (fk.TARGET_PARAMETERS, "an nnunet_tpp target-parameter file (nnunet_tpp.tpp/"),
    "nnunet_checkpoint_final.pth": (fk.NNUNET_CHECKPOINT, "an nnU-Net v2 training checkpoint of another network "
                                                          "(PlainConvUNet, trainer nnUNetTrainer)"),
    "linear.pt": (fk.STATE_DICT, "a plain state dict of another network, not an STU-Net (keys like bias, weight)"),
    "tpp_state.pth": (fk.NNUNET_TPP_OTHER, "a resumable pretext-stage state of nnunet_tpp"),
    "evil.pth": (fk.REFUSED, "pickled objects outside the allow-list of a weights file (posix.system)"),
    "plain.pkl": (fk.NOT_TORCH, "a plain Python pickle, not written by torch.save"),
    "notes.txt": (fk.NOT_TORCH, "a text file"),
    "empty.pth": (fk.NOT_TORCH, "an empty file"),
    "archive.zip": (fk.NOT_TORCH, "a ZIP archive that is not a PyTorch checkpoint"),
    "ct.nii.gz": (fk.NOT_TORCH, "a gzip-compressed NIfTI image"),
    "tensor.pt": (fk.OTHER, "a single tensor of shape (3,), not a checkpoint dictionary"),
    "missing.model": (fk.MISSING, "a path that does not exist"),
}


def test_every_kind_is_named_and_nothing_unsafe_runs(files):
    before = _hashes(files)
    for name, (kind, description) in KINDS.items():
        found = fk.identify(files / name)
        assert (found.kind, name) == (kind, name) and description in found.description, (name, found)
    assert fk.identify(files).kind == fk.MISSING and "folder" in fk.identify(files).description
    assert not (files / "pwned").exists()
    assert _hashes(files) == before


def test_format_prefixes_match_the_writers():
    from nnunet_tpp.peft.api import FILE_FORMAT
    from nnunet_tpp.pretext.stage import TARGET_FORMAT
    assert FILE_FORMAT.startswith(fk.ADAPTER_FORMAT_PREFIX) and TARGET_FORMAT.startswith(fk.TARGET_FORMAT_PREFIX)


def test_no_message_suggests_turning_the_safe_reader_off(files):
    for name in KINDS:
        found = fk.identify(files / name)
        for expected in (fk.STUNET, fk.TARGET_PARAMETERS, fk.ADAPTER):
            message = fk.wrong_kind_message(found, expected, "-pretrained_weights")
            assert "weights_only" not in message and "safe_globals" not in message, message
            assert str(files / name) in message or name in message


BACKBONE_REFUSALS = [
    ("tpp_target_parameters.pth", "is an nnunet_tpp target-parameter file (nnunet_tpp.tpp/1: conv_adapter"),
    ("tpp_target_parameters.pth", "not a backbone checkpoint: pass it with NNUNET_TPP_TARGET_PARAMETERS="),
    ("peft_weights.pth", "is an nnunet_tpp adapter file"),
    ("peft_weights.pth", "not a backbone checkpoint: it holds only the fine-tuned conv_adapter weights"),
    ("peft_weights.pth", "nnunet-tpp restore"),
    ("tpp_state.pth", "a resumable pretext-stage state"),
    ("evil.pth", "it was not unpickled"),
    ("ct.nii.gz", "is not a readable PyTorch checkpoint: it is a gzip-compressed NIfTI image"),
]


def test_the_backbone_loader_names_a_file_of_another_kind(files, tiny_stunet):
    before = _hashes(files)
    net = tiny_stunet()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    for name, message in BACKBONE_REFUSALS:
        with pytest.raises(CheckpointError) as err:
            load_stunet_checkpoint(net, files / name)
        assert message in str(err.value) and "weights_only" not in str(err.value), (name, str(err.value))
        with pytest.raises(CheckpointError):
            read_checkpoint(files / name)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert _hashes(files) == before and not (files / "pwned").exists()


def test_load_expected_returns_the_right_kind_and_refuses_the_others(files):
    payload = fk.load_expected(files / "tpp_target_parameters.pth", fk.TARGET_PARAMETERS, fk.TARGET_ENV)
    assert payload["format"].startswith(fk.TARGET_FORMAT_PREFIX) and payload["target_parameters"]
    with pytest.raises(fk.FileKindError, match=r"\(given as NNUNET_TPP_TARGET_PARAMETERS\) is an STU-Net-S "
                                               r"checkpoint .* not a target-parameter file: pass it with "
                                               r"-pretrained_weights"):
        fk.load_expected(files / "STUNet_S.model", fk.TARGET_PARAMETERS, fk.TARGET_ENV)
    with pytest.raises(fk.FileKindError, match="not a target-parameter file: it holds the fine-tuned weights"):
        fk.load_expected(files / "peft_weights.pth", fk.TARGET_PARAMETERS, fk.TARGET_ENV)
    with pytest.raises(fk.FileKindError, match="target-parameter file not found"):
        fk.load_expected(files / "missing.pth", fk.TARGET_PARAMETERS, fk.TARGET_ENV)
    with pytest.raises(fk.FileKindError, match="PlainConvUNet, trainer nnUNetTrainer.*ConvAdapterTrainer_nnUNet"):
        fk.load_expected(files / "nnunet_checkpoint_final.pth", fk.STUNET, "-pretrained_weights")
    sd = fk.load_expected(files / "STUNet_S.pth", fk.STUNET, mmap=True)["network_weights"]
    assert sd["conv_blocks_context.0.0.conv1.weight"].shape[0] == 16  # STU-Net-S


def test_a_published_checkpoint_still_loads_through_the_checked_reader(files, tiny_stunet):
    report = load_stunet_checkpoint(tiny_stunet(), files / "STUNet_S.model")
    assert report.source_format == "nnU-Net v1" and report.architecture == "STU-Net-S"


def test_a_vit_checkpoint_with_args_is_named_as_a_vit(tmp_path):
    import argparse
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(6, 2), "pos_embed": torch.zeros(1, 2, 2)},
                "args": argparse.Namespace(model="vit_base")}, tmp_path / "mae.pth")
    found = fk.identify(tmp_path / "mae.pth")
    assert found.kind == fk.STATE_DICT and "a ViT" in found.description
    with pytest.raises(CheckpointError, match="allow-list"):  # the STU-Net loader allows numpy values only
        read_checkpoint(tmp_path / "mae.pth")


def test_load_torch_file_names_the_problem(files):
    assert fk.load_torch_file(files / "tpp_state.pth", "a pretext state")["epoch"] == 2
    with pytest.raises(fk.FileKindError, match="is a text file, not the pretext stage's resumable state"):
        fk.load_torch_file(files / "notes.txt", "the pretext stage's resumable state")
    with pytest.raises(fk.FileKindError, match=r"\(posix.system\); it was not unpickled") as err:
        fk.load_torch_file(files / "evil.pth", "a state")
    assert "weights_only" not in str(err.value) and not (files / "pwned").exists()
