"""Fine-tuning an nnU-Net model of one's own with adapters, end to end on the real CT with the stock commands: a
model saved by nnU-Net's own ``nnUNetTrainer`` (its ``save_checkpoint``; the file layout is what matters) -> another
label set -> ``nnunet-tpp adopt-plans`` -> ``ConvAdapterTrainer_nnUNet`` -> ``nnUNetv2_predict``; ResEnc from a
ResEnc preset plan; the refusals of checkpoints that do not fit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.data.nnunet_raw import Case, write_raw_dataset
from nnunet_tpp.evaluation import geometry_mismatches
from nnunet_tpp.nnunet_commands import NNUNetCommandError, NNUNetFolders, run_nnunet
from nnunet_tpp.models.stunet_checkpoint import read_checkpoint
from tests.conftest import CT_IMAGE, CT_LABELS, assert_pretext_moved_its_target_parameters, require, write_v1_checkpoint

pytestmark = pytest.mark.e2e
SOURCE, TARGET = 621, 622
PLANS = "nnUNetPlans_from_Dataset621_Source"
TPP_SEED = 3


STOCK_SAVE = """
import json, sys, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
plans_file, dataset_file, model = sys.argv[1:4]
plans, dataset_json = json.load(open(plans_file)), json.load(open(dataset_file))
json.dump(plans, open(model + "/plans.json", "w"))
plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args sets (nnU-Net 2.8)
trainer = nnUNetTrainer(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
trainer.initialize()
json.dump(dataset_json, open(model + "/dataset.json", "w"))
trainer.save_checkpoint(model + "/fold_all/checkpoint_final.pth")
"""


def _stock_checkpoint(folders: NNUNetFolders, env: dict, plans_name: str = "nnUNetPlans") -> tuple:
    """A model folder as nnUNetv2_train leaves it: nnUNetTrainer's own save_checkpoint (untrained weights), and the
    plans.json and dataset.json it writes beside the folds."""
    import subprocess
    import sys
    preprocessed = folders.preprocessed / "Dataset621_Source"
    model = folders.results / "Dataset621_Source" / f"nnUNetTrainer__{plans_name}__3d_fullres"
    (model / "fold_all").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", STOCK_SAVE, str(preprocessed / f"{plans_name}.json"),
                           str(preprocessed / "dataset.json"), str(model)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return model, model / "fold_all" / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def nnunet_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_nnunet")
    folders = NNUNetFolders(root)
    folders.make()
    write_raw_dataset(folders.raw, SOURCE, "Source", [Case("ct001", require(CT_IMAGE), require(CT_LABELS))],
                      {"background": 0, "liver": 1, "kidney": 2})
    # the target task: another label set (liver only) on its own images
    liver = sitk.ReadImage(str(CT_LABELS))
    array = sitk.GetArrayFromImage(liver)
    relabelled = sitk.GetImageFromArray((array == 1).astype(np.uint8))
    relabelled.CopyInformation(liver)
    target_labels = root / "liver_labels.nii.gz"
    sitk.WriteImage(relabelled, str(target_labels))
    raw = write_raw_dataset(folders.raw, TARGET, "Target", [Case("ct001", CT_IMAGE, target_labels)],
                            {"background": 0, "liver": 1}, test=[Case("ct001", CT_IMAGE)])
    env = folders.env(NNUNET_TPP_EPOCHS="1", NNUNET_TPP_ITERS_PER_EPOCH="2", NNUNET_TPP_VAL_ITERS_PER_EPOCH="1",
                      NNUNET_TPP_SKIP_VALIDATION="1")
    log = root / "log.txt"
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", SOURCE, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env, log)
    plans_file = folders.preprocessed / "Dataset621_Source" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]  # 5x faster CPU steps; same network
    plans_file.write_text(json.dumps(plans, indent=2))
    model, checkpoint = _stock_checkpoint(folders, env)
    return folders, raw, env, log, model, checkpoint


@pytest.fixture(scope="module")
def adopted(nnunet_model):
    folders, raw, env, log, model, checkpoint = nnunet_model
    run_nnunet(["nnunet-tpp", "adopt-plans", model, "-d", TARGET, "-np", "1"], env, log)
    return nnunet_model


def test_adopted_plans_fine_tune_and_predict_with_conv_adapters(adopted, tmp_path):
    folders, raw, env, log, model, checkpoint = adopted
    source_bytes = checkpoint.read_bytes()
    adopted = folders.preprocessed / "Dataset622_Target" / f"{PLANS}.json"
    plans = json.loads(adopted.read_text())
    assert plans["dataset_name"] == "Dataset622_Target" and plans["plans_name"] == PLANS
    assert (folders.preprocessed / "Dataset622_Target" / "dataset.json").exists()
    with pytest.raises(NNUNetCommandError, match="exists; pass another name"):  # never overwritten
        run_nnunet(["nnunet-tpp", "adopt-plans", model, "-d", TARGET, "--no-preprocess"], env, log)

    run_nnunet(["nnUNetv2_train", TARGET, "3d_fullres", "all", "-p", PLANS, "-tr", "ConvAdapterTrainer_nnUNet",
                "-pretrained_weights", checkpoint, "-device", "cpu"], env, log)
    fold = folders.results / "Dataset622_Target" / f"ConvAdapterTrainer_nnUNet__{PLANS}__3d_fullres" / "fold_all"
    text = next(fold.glob("training_log_*.txt")).read_text()
    assert "trainable parameters: " in text and "memory paths: lean norm/act, checkpointing off" in text
    assert "the plans' PlainConvUNet + conv_adapter" in text
    source = read_checkpoint(str(checkpoint))["network_weights"]
    final = read_checkpoint(str(fold / "checkpoint_final.pth"))["network_weights"]
    backbone = {k: v for k, v in source.items() if ".seg_layers." not in k}
    assert backbone and all(torch.equal(final[k], v) for k, v in backbone.items())
    assert any(".adapter." in k for k in final) and (fold / "peft_weights.pth").exists()
    assert json.loads((fold / "backbone.json").read_text())["fingerprint"].startswith("blake2b:")
    assert checkpoint.read_bytes() == source_bytes  # the user's model is untouched

    predictions = tmp_path / "pred"
    run_nnunet(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", TARGET, "-c", "3d_fullres",
                "-p", PLANS, "-f", "all", "-tr", "ConvAdapterTrainer_nnUNet", "-device", "cpu", "-npp", "1",
                "-nps", "1", "--disable_tta"], env, log)
    assert geometry_mismatches(CT_IMAGE, predictions / "ct001.nii.gz") == []


def test_tpp_pretrains_the_adapters_of_an_nnunet_model_then_fine_tunes(adopted):
    folders, raw, env, log, model, checkpoint = adopted
    dino = folders.root / "dino.yaml"  # (the 3-D default pretext is mae; this test covers DINO)
    dino.write_text("pretext: dino\n")
    tpp_env = dict(env, NNUNET_TPP_PRETEXT_EPOCHS="1", NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH="2",
                   NNUNET_TPP_SEED=str(TPP_SEED), NNUNET_TPP_RECIPE=str(dino))
    run_nnunet(["nnUNetv2_train", TARGET, "3d_fullres", "all", "-p", PLANS, "-tr", "TPPConvAdapterTrainer_nnUNet",
                "-pretrained_weights", checkpoint, "-device", "cpu"], tpp_env, log)
    fold = folders.results / "Dataset622_Target" / f"TPPConvAdapterTrainer_nnUNet__{PLANS}__3d_fullres" / "fold_all"
    result = torch.load(fold / "tpp_target_parameters.pth", map_location="cpu", weights_only=True)
    assert result["method"] == "conv_adapter" and result["architecture"].startswith("PlainConvUNet-")
    assert_pretext_moved_its_target_parameters(result, fold.parent, "TPPConvAdapterTrainer_nnUNet", TPP_SEED)
    assert result["backbone"] == json.loads((fold / "backbone.json").read_text())["fingerprint"]
    diagnostics = json.loads((fold / "tpp_diagnostics.json").read_text())
    assert diagnostics and set(diagnostics[0]) >= {"epoch", "loss", "teacher_entropy", "batch_mean_entropy", "kl",
                                                   "log_k"}
    source = read_checkpoint(str(checkpoint))["network_weights"]
    final = read_checkpoint(str(fold / "checkpoint_final.pth"))["network_weights"]
    assert all(torch.equal(final[k], v) for k, v in source.items() if ".seg_layers." not in k)


def test_checkpoints_that_do_not_fit_are_refused_before_anything_is_written(nnunet_model, tmp_path):
    folders, raw, env, log, model, checkpoint = nnunet_model
    stunet = tmp_path / "STUNet_S.model"
    write_v1_checkpoint(stunet)
    cases = [("ConvAdapterTrainer_nnUNet", stunet, "is an STU-Net-S checkpoint; the _nnUNet trainers adapt nnU-Net"),
             ("ConvAdapterTrainer_S", checkpoint, "ConvAdapterTrainer_nnUNet"),
             ("LoRATrainer_nnUNet", tmp_path / "nope.pth", "not found")]
    for trainer, weights, message in cases:
        with pytest.raises(NNUNetCommandError, match=message):
            run_nnunet(["nnUNetv2_train", SOURCE, "3d_fullres", "all", "-tr", trainer, "-pretrained_weights",
                        weights, "-device", "cpu"], env, log)
        assert not list((folders.results / "Dataset621_Source").glob(f"{trainer}__*")), trainer  # nothing written


def test_resenc_preset_plans_build_a_residual_encoder_with_adapters(nnunet_model):
    folders, raw, env, log, model, checkpoint = nnunet_model
    run_nnunet(["nnUNetv2_plan_experiment", "-d", SOURCE, "-pl", "nnUNetPlannerResEncM"], env, log)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_tpp import peft
    from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
    from nnunet_tpp.models.stunet_checkpoint import CheckpointError
    from nnunet_tpp.trainers.zoo import TRAINERS
    manager = PlansManager(str(folders.preprocessed / "Dataset621_Source" / "nnUNetResEncUNetMPlans.json"))
    config = manager.get_configuration("3d_fullres")
    net = TRAINERS["ConvAdapterTrainer_nnUNet"].build_network_architecture(manager, config, 1, 3, True)
    assert type(net).__name__ == "ResidualEncoderUNet" and net.peft_config.method == "conv_adapter"
    assert peft.trainable_summary(net).percent < 5
    assert any(".adapter." in n for n in peft.target_parameters(net))
    with pytest.raises(CheckpointError, match="holds a PlainConvUNet .* these plans build a ResidualEncoderUNet"):
        load_nnunet_checkpoint(net, checkpoint, set(peft.target_parameters(net)))
