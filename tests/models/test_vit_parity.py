"""The timm-based ViT reproduces the hand-written ViT it replaced, to float32 rounding, for every checkpoint kind the
package reads (timm, MAE with its decoder, DINO, DINOv2 with registers / layer scale / chunked blocks, MedCoSS) and
every adapter and target-parameter file of the ViT PEFT methods. The fixtures in ``data/vit_parity/`` were written
by the hand-written ViT at commit 23ad07d (its ``make_fixtures.py``): a tiny config, the checkpoint file as its owner
lays it out, a fixed input and the old model's outputs (final tokens, tapped blocks, MAE-kept and iBOT-masked
patches, task outputs before and after merging)."""
from pathlib import Path

import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.vit import ViTConfig, build_vit
from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint, mae_decoder_state_dict
from nnunet_tpp.models.vit_heads import ViTClassifier, ViTSegmenter
from nnunet_tpp.pretext.mae import MAEDecoder

DATA = Path(__file__).parent / "data" / "vit_parity"
FORMATS = ("timm", "mae", "dino", "dinov2", "medcoss")


def fixture(name: str) -> dict:
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 rounding (oneDNN rounds differently across CPUs): 1e-5 of the reference's range."""
    return torch.allclose(a, b, rtol=0, atol=1e-5 * max(float(b.abs().max()), 1.0))


def loaded(case: dict, file: dict, tmp_path: Path):
    path = tmp_path / "checkpoint.pth"
    torch.save(file, path)
    model = build_vit(ViTConfig(**case["config"]))
    report = load_vit_checkpoint(model, path, fmt=case["fmt"], **case["load_args"])
    return model.eval(), report


def cases():
    for name in FORMATS:
        for i, _ in enumerate(fixture(name)["cases"]):
            yield name, i
    yield "dinov2", "chunked"


@pytest.mark.parametrize("name,index", list(cases()))
def test_every_checkpoint_kind_gives_the_old_outputs(tmp_path, name, index):
    data = fixture(name)
    case = data["chunked_case"] if index == "chunked" else data["cases"][index]
    model, report = loaded(case, data["chunked_file"] if index == "chunked" else data["file"], tmp_path)
    assert (model.pretraining, report.resampling) == (case["pretraining"], case["resampling"])
    x = case["input"]
    with torch.no_grad():
        tokens, tapped = model.forward_features(x, taps=(1, 3))
        kept = model.forward_features(x, keep=case["keep"])[0]
        hidden = model.forward_features(x, masked=case["masked"], mask_token=case["mask_token"])[0]
    assert close(tokens, case["tokens"]) and all(close(a, b) for a, b in zip(tapped, case["tapped"]))
    assert close(kept, case["kept_tokens"]) and close(hidden, case["masked_tokens"])


def test_the_mae_decoder_gives_the_old_prediction(tmp_path):
    data = fixture("mae")
    path = tmp_path / "mae.pth"
    torch.save(data["file"], path)
    decoder = MAEDecoder.from_state_dict(mae_decoder_state_dict(path), 16, 4, 3, num_prefix_tokens=1,
                                         num_heads=data["decoder"]["num_heads"]).eval()
    with torch.no_grad():
        prediction = decoder(data["decoder"]["latent"], data["decoder"]["restore"])
    assert close(prediction, data["decoder"]["prediction"])


METHODS = fixture("methods")


def _task_model(case: dict):
    vit = build_vit("vit_tiny", **METHODS["config"])
    vit.load_state_dict(METHODS["backbone"])
    net = ViTClassifier(vit, 3) if case["task"] == "cls" else ViTSegmenter(vit, 2, feature_size=4)
    return peft.apply(net, case["method"], **case["options"])


@pytest.mark.parametrize("index", range(len(METHODS["cases"])),
                         ids=[f"{c['key']}-{c['task']}" for c in METHODS["cases"]])
def test_old_adapter_files_load_and_give_the_old_outputs(tmp_path, index):
    """Adapter files of the previous version (``blocks.N.adapter_attn...``, ``backbone.tuner...``, our own LoRA's
    ``lora_A.weight`` where Hugging Face peft's layers now hold ``lora_A.default.weight``) load, and the model computes
    what the old one computed, merged or not."""
    case = METHODS["cases"][index]
    net = _task_model(case)
    path = tmp_path / "adapter.pth"
    torch.save(case["adapter_file"], path)
    peft.load(net, path)
    net.eval()
    x = METHODS["input"]
    with torch.no_grad():
        assert close(net(x), case["output"])
        if case["merged_output"] is not None:
            assert close(peft.merge(net)(x), case["merged_output"])


@pytest.mark.parametrize("index", [i for i, c in enumerate(METHODS["cases"]) if c["target_file"] is not None],
                         ids=[f"{c['key']}-{c['task']}" for c in METHODS["cases"] if c["target_file"] is not None])
def test_old_target_parameter_files_load(tmp_path, index):
    """TPP target-parameter files of the previous version load the way train2d reads them (names mapped)."""
    from nnunet_tpp.pretext.stage import copy_target_parameters
    case = METHODS["cases"][index]
    net = _task_model(case)
    names = peft.current_names(net, case["target_file"]["target_parameters"])
    copy_target_parameters(net, names, "old file")
    targets = peft.target_parameters(net)
    old = case["adapter_file"]["state_dict"]
    for name, value in case["target_file"]["target_parameters"].items():
        assert torch.equal(targets[peft.current_names(net, {name: value}).popitem()[0]], old[name])
