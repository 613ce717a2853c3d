"""Primus as a backbone: the presets build exactly what nnU-Net's own Primus trainers (and nnU-Net master's nnssl
route) build; the plans say which Primus; patches that Primus cannot take are refused with the fix."""
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_tpp import peft
from nnunet_tpp.models.primus import (NNSSL_PRESETS, TRAINER_PRESETS, PrimusError, build_primus, check_patch,
                                      spec_for_backbone, spec_from_architecture)

PATCH = (64, 64, 32)


def _config(architecture=None, patch=PATCH) -> ConfigurationManager:
    return ConfigurationManager({"patch_size": list(patch), "architecture": architecture or {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": {},
        "_kw_requires_import": []}})


def _layout(net):
    """Tensor names and shapes, and each block's stochastic depth."""
    return ({k: tuple(v.shape) for k, v in net.state_dict().items()},
            [getattr(b.drop_path1, "drop_prob", 0.0) for b in net.eva.blocks])


@pytest.mark.parametrize("key,trainer", [*((f"Primus_{s}", f"nnUNet_Primus_{s}_Trainer") for s in "SBML"),
                                         *((f"PrimusV3_{s}", f"nnUNet_PrimusV3{s}_Trainer") for s in "SBML")])
def test_trainer_presets_are_nnunets_primus_trainers_networks(key, trainer):
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers
    with torch.device("meta"):
        theirs = getattr(primus_trainers, trainer).build_network_architecture(None, _config(), 1, 3, False)
        ours = build_primus(TRAINER_PRESETS[key], 1, 3, PATCH)
    assert isinstance(theirs, type(ours)) and _layout(ours) == _layout(theirs)
    assert ours.head_prefixes == ("up_projection",) and ours.patch_size == PATCH


@pytest.mark.parametrize("name", sorted(NNSSL_PRESETS))
def test_nnssl_preset_names_build_what_nnunet_master_builds_for_them(name):
    from dynamic_network_architectures.architectures import primus
    with torch.device("meta"):  # master: get_network_from_name -> the preset class with its defaults
        theirs = getattr(primus, name)(input_channels=1, output_channels=3, patch_embed_size=(8, 8, 8),
                                       input_shape=PATCH)
        ours = build_primus(spec_from_architecture({"network_class_name": name, "arch_kwargs": None}), 1, 3, PATCH)
    assert _layout(ours) == _layout(theirs)


def test_layer_scale_and_head_of_a_built_primus():
    torch.manual_seed(0)
    net = build_primus(TRAINER_PRESETS["Primus_S"], 1, 3, (16, 16, 16))
    assert torch.all(net.eva.blocks[0].gamma_1 == 0.1)  # nnU-Net's init_values=0.1
    assert net.label_layer_prefixes == ("up_projection.decode.2",)
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    probe = peft.apply(build_primus(TRAINER_PRESETS["Primus_S"], 1, 3, (16, 16, 16)), "linear_probe")
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in probe.named_parameters() if n.startswith("up_projection.")}


def test_the_plans_say_which_primus():
    explicit = {"network_class_name": "PrimusX", "arch_kwargs": {
        "embed_dim": 192, "patch_embed_size": [8, 8, 8], "encoder_eva_depth": 4, "encoder_eva_numheads": 4,
        "scale_attn_inner": True, "init_values": [0.1]}}
    spec = spec_for_backbone("Primus", _config(explicit))
    assert (spec.embed_dim, spec.depth, spec.heads, spec.init_values, spec.drop_path_rate) == (192, 4, 4, 0.1, 0.2)
    planned_m = _config({"network_class_name": "PrimusM", "arch_kwargs": None})
    assert spec_for_backbone("Primus_M", planned_m).drop_path_rate == 0.0  # master's fine-tuning of nnssl plans
    assert spec_for_backbone("Primus_M", _config()).drop_path_rate == 0.2  # nnU-Net's Primus-M trainer
    with pytest.raises(PrimusError, match="describe Primus-M .* use the trainer with suffix _Primus_M"):
        spec_for_backbone("Primus_S", planned_m)
    with pytest.raises(PrimusError, match="these plans describe .*PlainConvUNet; adopt an nnssl Primus"):
        spec_for_backbone("Primus", _config())
    with pytest.raises(PrimusError, match="lacks \\['init_values'\\]"):
        spec_from_architecture({"network_class_name": "PrimusX", "arch_kwargs": {
            k: v for k, v in explicit["arch_kwargs"].items() if k != "init_values"}})


def test_patches_primus_cannot_take_are_refused_with_a_fitting_one():
    assert check_patch([32, 32, 16]) == (32, 32, 16)
    with pytest.raises(PrimusError, match="patch \\[60, 64, 20\\] .* divisible by 8 .* e.g. \\[64, 64, 24\\]"):
        check_patch([60, 64, 20])
    with pytest.raises(PrimusError, match="rotary embedding .*\\(got 42.6667\\)"):
        build_primus(TRAINER_PRESETS["Primus_S"].__class__("x", "V1", 192, 4, 3), 1, 3, (16, 16, 16))
