"""``nnunet-tpp adopt-plans NNSSL_CHECKPOINT``: plans from the checkpoint's adaptation plan as nnU-Net master's
``nnUNetv2_preprocess_like_nnssl`` writes them (architecture, spacing, normalisation, patch, pretrain_info), a patch
override checked against the architecture, and every refusal before anything is written."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.adopt_nnssl import RESENC_L, adopt, adopt_nnssl_plans
from nnunet_tpp.adopt_plans import AdoptPlansError
from nnunet_tpp.cli import main
from tests.nnssl_files import primus_checkpoint, resenc_checkpoint


def _tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def _base_plans():
    """The parts of nnU-Net's own plans that nnU-Net master's route keeps."""
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [48, 64, 64], "median_image_size_in_voxels": [40, 70, 90],
              "spacing": [1.25, 1.25, 1.25], "normalization_schemes": ["ZScoreNormalization"] * 2,
              "use_mask_for_norm": [False, False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_probabilities":
                  "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
              "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": {}, "_kw_requires_import": []}}
    return {"dataset_name": "Dataset710_Target", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "original_median_spacing_after_transp": [1.25] * 3, "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {"2d": dict(config), "3d_fullres": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


@pytest.fixture(scope="module")
def nnssl_file(tmp_path_factory):
    """A small nnssl Primus checkpoint (pre-trained at 32^3, recommending 48^3), written once."""
    folder = tmp_path_factory.mktemp("nnssl")
    return primus_checkpoint(folder / "checkpoint_final.pth", patch=(32, 32, 32), recommended=(48, 48, 48))[0]


@pytest.fixture
def world(tmp_path, monkeypatch, nnssl_file):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    target = raw / "Dataset710_Target"
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for channel in ("0000", "0001"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.normal(size=(16, 16, 16)).astype(np.float32)),
                        str(target / "imagesTr" / f"c1_{channel}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 16), np.uint8)), str(target / "labelsTr" / "c1.nii.gz"))
    (target / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {
        "background": 0, "organ": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
    (pre / "Dataset710_Target").mkdir(parents=True)
    (pre / "Dataset710_Target" / "nnUNetPlans.json").write_text(json.dumps(_base_plans()))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return nnssl_file, raw, pre / "Dataset710_Target"


def test_primus_plans_follow_the_adaptation_plan(world):
    checkpoint, raw, pre = world
    out = adopt_nnssl_plans(checkpoint, "710", run_preprocessing=False, echo=lambda m: None)
    assert out == pre / "nnsslPlans_PrimusX_BaseEvaMAETrainer.json"
    plans = json.loads(out.read_text())
    assert list(plans["configurations"]) == ["3d_fullres"] and plans["plans_name"] == out.stem
    config = plans["configurations"]["3d_fullres"]
    assert config["spacing"] == [2.5, 2.5, 2.5]  # like_pretrained: the pre-training spacing
    assert config["patch_size"] == [48, 48, 48] and config["batch_size"] == 2  # the recommended downstream patch
    assert config["normalization_schemes"] == ["ZScoreNormalization"] * 2 and config["data_identifier"] == \
        f"{out.stem}_3d_fullres"
    assert config["architecture"]["network_class_name"] == "PrimusX"
    assert config["architecture"]["arch_kwargs"]["embed_dim"] == 192
    info = plans["pretrain_info"]
    assert info["checkpoint_path"] == str(checkpoint) and info["pt_used_patchsize"] == [32, 32, 32]
    assert (info["key_to_encoder"], info["key_to_stem"], info["key_to_lpe"]) == ("eva", "down_projection",
                                                                                 "eva.pos_embed")
    assert info["citations"][0]["name"] == "test"
    # the _Primus trainers build this Primus from the plans; the checkpoint fits it (position embedding 4^3 -> 6^3)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
    from nnunet_tpp.trainers.zoo import TRAINERS
    manager = PlansManager(plans)
    net = TRAINERS["FullFinetuneTrainer_Primus"].build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 2, 2, False)
    assert net.patch_size == (48, 48, 48) and net.eva.pos_embed.shape == (1, 216, 192)
    report = load_nnunet_checkpoint(net, checkpoint)
    assert report.resized == {"eva.pos_embed": ((4, 4, 4), (6, 6, 6))} and report.channels == 2


def test_patch_override_and_spacing_modes(world):
    checkpoint, raw, pre = world
    out = adopt_nnssl_plans(checkpoint, "710", patch=[32, 32, 16], spacing_mode="default_nnunet",
                            run_preprocessing=False, echo=lambda m: None)
    config = json.loads(out.read_text())["configurations"]["3d_fullres"]
    assert out.stem.endswith("_p32x32x16") and config["patch_size"] == [32, 32, 16]
    assert config["spacing"] == [1.25, 1.25, 1.25]  # nnU-Net's own
    out = adopt_nnssl_plans(checkpoint, "710", "fixed_plans", spacing_mode="fixed", spacing=[3, 2, 2],
                            run_preprocessing=False, echo=lambda m: None)
    assert json.loads(out.read_text())["configurations"]["3d_fullres"]["spacing"] == [3.0, 2.0, 2.0]


@pytest.mark.parametrize("kwargs,message", [
    ({"patch": [30, 32, 16]}, "patch \\[30, 32, 16\\] does not fit the checkpoint's PrimusX: every axis must be "
                              "divisible by \\[8, 8, 8\\]"),
    ({"spacing_mode": "fixed"}, "needs --spacing X Y Z"),
    ({"spacing_mode": "isotropic"}, "choose one of like_pretrained, default_nnunet, fixed"),
    ({"plans_name": "a__b"}, "must not contain '__'"),
    ({"plans_name": "nnUNetPlans"}, "exists; pass another name"),
])
def test_refusals_come_before_anything_is_written(world, kwargs, message):
    checkpoint, raw, pre = world
    before, raw_before = _tree(pre), _tree(raw)
    with pytest.raises(AdoptPlansError, match=message):
        adopt_nnssl_plans(checkpoint, "710", run_preprocessing=False, **kwargs)
    assert _tree(pre) == before and _tree(raw) == raw_before


def test_checkpoints_without_a_usable_plan_and_misplaced_options(world, tmp_path, capsys):
    checkpoint, raw, pre = world
    broken = torch.load(checkpoint, weights_only=True)
    del broken["nnssl_adaptation_plan"]["recommended_downstream_patchsize"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(AdoptPlansError, match="lacks \\['recommended_downstream_patchsize'\\]"):
        adopt_nnssl_plans(tmp_path / "broken.pth", "710", run_preprocessing=False)
    broken = torch.load(checkpoint, weights_only=True)
    broken["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] = "SwinUNETR"
    torch.save(broken, tmp_path / "swin.pth")
    with pytest.raises(AdoptPlansError, match="names 'SwinUNETR'; nnunet_tpp builds PrimusS/B/M/L"):
        adopt_nnssl_plans(tmp_path / "swin.pth", "710", run_preprocessing=False)
    with pytest.raises(AdoptPlansError, match="3d_fullres only"):
        adopt(checkpoint, "710", configurations=("2d",), run_preprocessing=False)
    assert main(["adopt-plans", str(checkpoint), "-d", "710", "--patch", "30", "32", "16", "--no-preprocess"]) == 2
    assert "divisible by [8, 8, 8]" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(AdoptPlansError, match="apply to nnssl checkpoints"):
        adopt(model, "710", patch=[32, 32, 32])


def test_resenc_checkpoints_give_plans_nnunet_builds_the_encoder_of(world, tmp_path):
    checkpoint, raw, pre = world
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    for preset, expected in (("ResEncL", RESENC_L), (None, None)):
        path, source = resenc_checkpoint(tmp_path / f"resenc_{preset}.pth", preset=preset, meta=True)
        out = adopt_nnssl_plans(path, "710", plans_name=f"r{preset}", patch=[32, 32, 32] if preset else None,
                                run_preprocessing=False, echo=lambda m: None)
        arch = json.loads(out.read_text())["configurations"]["3d_fullres"]["architecture"]
        if expected:
            assert arch == expected
        with torch.device("meta"):
            net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         1, 1, allow_init=False, deep_supervision=False)
        ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("encoder.")}
        theirs = {k: tuple(v.shape) for k, v in source.state_dict().items() if k.startswith("encoder.")}
        assert ours == theirs
    with pytest.raises(AdoptPlansError, match="divisible by \\[32, 32, 32\\] \\(the U-Net's strides\\)"):
        adopt_nnssl_plans(tmp_path / "resenc_ResEncL.pth", "710", plans_name="x", patch=[48, 48, 16],
                          run_preprocessing=False)
