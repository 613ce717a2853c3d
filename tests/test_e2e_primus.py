"""Primus from an nnssl checkpoint, end to end on real MRI (left atrium, 2018 challenge, 1.25 mm) with the stock
commands: a small Primus in nnssl's checkpoint format -> ``nnunet-tpp adopt-plans`` (pre-training spacing, a
CPU-sized patch override) -> ``nnUNetv2_train ... -tr FullFinetuneTrainer_Primus -pretrained_weights`` (and
``-tr LoRATrainer_Primus``: LoRA on q and v of every EVA block) -> ``nnUNetv2_predict``. The fine-tuned model must
beat the network training starts from (the checkpoint's encoder with its new decoder) on held-out cases by a measured
margin."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.data.nnunet_raw import Case, write_raw_dataset
from nnunet_tpp.evaluation import dice_hd95, geometry_mismatches
from nnunet_tpp.nnunet_commands import NNUNetCommandError, NNUNetFolders, run_nnunet
from tests.conftest import SHARED, require
from tests.nnssl_files import primus_checkpoint

pytestmark = pytest.mark.e2e
LA = SHARED / "data" / "mri3d" / "la2018"
DATASET, NAME = 641, "Dataset641_LeftAtrium"
TRAIN = [f"la_{i:03d}" for i in range(8)]
TEST = ["la_098", "la_099"]
PLANS = "nnsslPlans_PrimusX_BaseEvaMAETrainer_p16x32x32"
TRAINER = "FullFinetuneTrainer_Primus"
# measured on this machine (2 CPU cores, shared): the loaded network scores a mean Dice of 0.25 on TEST (its random
# decoder marks ~70 % of each image as atrium); after 2 x 30 iterations at lr 1e-3 the fine-tuned one 0.556, the same in
# two runs (NNUNET_TPP_SEED=0, batches drawn in-process; unseeded, with a background worker, CI once got 0.38)
MARGIN = 0.15


def _dice(folder) -> float:
    scores = []
    for name in TEST:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(LA / f"{name}_labels.nii.gz"))) == 1
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}.nii.gz"))) == 1
        scores.append(dice_hd95(reference, predicted, (1.25, 1.25, 1.25))[0])
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def adopted(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_primus")
    folders = NNUNetFolders(root)
    folders.make()
    raw = write_raw_dataset(folders.raw, DATASET, "LeftAtrium",
                            [Case(n, require(LA / f"{n}.nii.gz"), LA / f"{n}_labels.nii.gz") for n in TRAIN],
                            {"background": 0, "left_atrium": 1}, channel_name="MRI",
                            test=[Case(n, LA / f"{n}.nii.gz") for n in TEST])
    # pre-trained at 32^3 and 2.5 mm (its plan), recommending 64^3; adopted at a 16x32x32 patch for the CPU
    checkpoint, _ = primus_checkpoint(root / "checkpoint_final.pth", 192, 4, 4, patch=(32, 32, 32),
                                      recommended=(64, 64, 64))
    recipe = root / "recipe.yaml"
    recipe.write_text("initial_lr: 1.0e-3\n")
    # seeded, batches drawn in-process: the same run every time (nnU-Net's worker processes seed themselves)
    env = folders.env(NNUNET_TPP_EPOCHS="2", NNUNET_TPP_ITERS_PER_EPOCH="30", NNUNET_TPP_VAL_ITERS_PER_EPOCH="1",
                      NNUNET_TPP_SKIP_VALIDATION="1", NNUNET_TPP_WARMUP_EPOCHS="1", NNUNET_TPP_RECIPE=str(recipe),
                      NNUNET_TPP_SEED="0")
    log = root / "log.txt"
    run_nnunet(["nnunet-tpp", "adopt-plans", checkpoint, "-d", DATASET, "--patch", "16", "32", "32", "-np", "1"],
               env, log)
    env["nnUNet_n_proc_DA"] = "0"  # training draws its batches in-process (0 would crash nnU-Net's planning)
    return folders, raw, env, log, checkpoint


def _baseline(folders, raw, checkpoint, out, trainer: str = TRAINER) -> float:
    """The network ``trainer`` starts from (checkpoint loaded, decoder new), predicted with nnU-Net's predictor."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_tpp import peft
    from nnunet_tpp.models.nnunet_checkpoint import load_nnunet_checkpoint
    from nnunet_tpp.trainers.zoo import TRAINERS
    pre = folders.preprocessed / NAME
    manager = PlansManager(str(pre / f"{PLANS}.json"))
    config = manager.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = TRAINERS[trainer].build_network_architecture(manager, config, 1, 2, False)
    load_nnunet_checkpoint(net, checkpoint, new_keys=set(peft.target_parameters(net)))  # LoRA's factors are new
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, manager, config, [net.state_dict()],
                                    json.loads((pre / "dataset.json").read_text()), trainer, None)
    out.mkdir()
    predictor.predict_from_files_sequential(str(raw / "imagesTs"), str(out), False, True, None)
    return _dice(out)


def test_an_nnssl_primus_is_adopted_fine_tuned_and_predicts(adopted):
    folders, raw, env, log, checkpoint = adopted
    plans = json.loads((folders.preprocessed / NAME / f"{PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["patch_size"] == [16, 32, 32] and config["spacing"] == [2.5, 2.5, 2.5]
    assert config["architecture"]["arch_kwargs"]["embed_dim"] == 192 and plans["pretrain_info"]["pt_used_patchsize"] \
        == [32, 32, 32]
    source_bytes = checkpoint.read_bytes()

    run_nnunet(["nnUNetv2_train", DATASET, "3d_fullres", "all", "-p", PLANS, "-tr", TRAINER, "-pretrained_weights",
                checkpoint, "-device", "cpu"], env, log)
    fold = folders.results / NAME / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_all"
    text = next(fold.glob("training_log_*.txt")).read_text()
    assert "nnssl pre-training checkpoint of a PrimusX" in text and "Primus optimisation" in text
    assert "eva.pos_embed resized from a 4x4x4 to a 2x4x4 token grid" in text
    assert "trainable parameters: 1985562 of 1985562 (100.00%)" in text and "lr 0.001 (recipe)" in text
    source = torch.load(checkpoint, weights_only=True)["network_weights"]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert not torch.equal(final["eva.blocks.0.attn.q_proj.weight"], source["eva.blocks.0.attn.q_proj.weight"])
    assert (fold / "backbone.json").exists() and checkpoint.read_bytes() == source_bytes  # the file is untouched

    predictions = folders.root / "pred"
    run_nnunet(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", DATASET, "-c", "3d_fullres",
                "-p", PLANS, "-f", "all", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
                "--disable_tta"], env, log)
    for name in TEST:
        assert geometry_mismatches(LA / f"{name}.nii.gz", predictions / f"{name}.nii.gz") == []
    trained, start = _dice(predictions), _baseline(folders, raw, checkpoint, folders.root / "start")
    print(f"mean Dice on {TEST}: trained {trained:.4f}, start {start:.4f}")
    assert trained >= start + MARGIN, (trained, start)


LORA = "LoRATrainer_Primus"
# measured on this machine (shared, 2 cores): LoRA (rank 8 on q and v, the decoder trained as the head) from the same
# start (0.25 on TEST: its B factors start at zero), 2 x 30 iterations: mean Dice 0.46 at lr 3e-3, 0.18 at 1e-3
# (unseeded); seeded as the fixture runs it, 0.559 at 3e-3 in two runs
LORA_LR = "3.0e-3"


def test_lora_fine_tunes_the_adopted_primus_and_predicts(adopted):
    folders, raw, env, log, checkpoint = adopted
    recipe = folders.root / "recipe_lora.yaml"
    recipe.write_text(f"initial_lr: {LORA_LR}\n")
    env = {**env, "NNUNET_TPP_RECIPE": str(recipe)}
    run_nnunet(["nnUNetv2_train", DATASET, "3d_fullres", "all", "-p", PLANS, "-tr", LORA, "-pretrained_weights",
                checkpoint, "-device", "cpu"], env, log)
    fold = folders.results / NAME / f"{LORA}__{PLANS}__3d_fullres" / "fold_all"
    text = next(fold.glob("training_log_*.txt")).read_text()
    assert "lora {'rank': 8, 'alpha': 8.0, 'targets': ['q', 'v']}" in text and "Primus optimisation" in text
    assert f"lr {float(LORA_LR)} (recipe)" in text
    source = torch.load(checkpoint, weights_only=True)["network_weights"]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    for key in ("eva.blocks.0.attn.k_proj.weight", "eva.blocks.3.mlp.fc2.weight"):  # frozen: as loaded
        assert torch.equal(final[key], source[key])
    assert torch.equal(final["eva.blocks.0.attn.q_proj.base_layer.weight"], source["eva.blocks.0.attn.q_proj.weight"])
    assert all(final[f"eva.blocks.{i}.attn.{p}_proj.lora_B.default.weight"].abs().sum() > 0
               for i in range(4) for p in ("q", "v"))  # B starts at zero: it trained
    predictions = folders.root / "pred_lora"
    run_nnunet(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", DATASET, "-c", "3d_fullres",
                "-p", PLANS, "-f", "all", "-tr", LORA, "-device", "cpu", "-npp", "1", "-nps", "1",
                "--disable_tta"], env, log)
    for name in TEST:
        assert geometry_mismatches(LA / f"{name}.nii.gz", predictions / f"{name}.nii.gz") == []
    trained, start = _dice(predictions), _baseline(folders, raw, checkpoint, folders.root / "start_lora", LORA)
    print(f"mean Dice on {TEST}: trained {trained:.4f}, start {start:.4f}")
    assert trained >= start + MARGIN, (trained, start)


TPP = "TPPLoRATrainer_Primus"


def test_tpp_lora_pretrains_the_lora_factors_by_masked_reconstruction_then_fine_tunes(adopted):
    """``TPPLoRATrainer_Primus`` with ``pretext_control``: 1 pretext epoch of 2 iterations (masked reconstruction,
    nnssl's SimMIM on Primus) and its head-only control, then 1 supervised epoch of 2 iterations; the fold gets the
    stage's files and ``tpp_target_check.json``, the frozen weights stay the nnssl file's."""
    folders, raw, env, log, checkpoint = adopted
    recipe = folders.root / "recipe_tpp.yaml"
    recipe.write_text(f"initial_lr: {LORA_LR}\npretext_control: true\npretext_eval_samples: 2\n")
    env = {**env, "NNUNET_TPP_RECIPE": str(recipe), "NNUNET_TPP_PRETEXT_EPOCHS": "1",
           "NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH": "2", "NNUNET_TPP_EPOCHS": "1", "NNUNET_TPP_ITERS_PER_EPOCH": "2"}
    run_nnunet(["nnUNetv2_train", DATASET, "3d_fullres", "all", "-p", PLANS, "-tr", TPP, "-pretrained_weights",
                checkpoint, "-device", "cpu"], env, log)
    fold = folders.results / NAME / f"{TPP}__{PLANS}__3d_fullres" / "fold_all"
    text = next(fold.glob("training_log_*.txt")).read_text()
    assert "their tokens replaced by a learned mask token" in text and "ADAMW lr 0.0003" in text
    check = json.loads((fold / "tpp_target_check.json").read_text())
    assert check["pretext"] == "mae" and check["control_steps"] == 2 and check["relative_change"] > 0
    assert all(check[k] > 0 for k in ("loss_trained", "loss_reset", "loss_control"))
    pretrained = torch.load(fold / "tpp_target_parameters.pth", weights_only=True)
    assert any("lora_B" in k for k in pretrained["target_parameters"])
    source = torch.load(checkpoint, weights_only=True)["network_weights"]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    for key in ("eva.blocks.0.attn.k_proj.weight", "eva.blocks.3.mlp.fc2.weight"):
        assert torch.equal(final[key], source[key])


def test_a_primus_that_does_not_fit_the_plans_is_refused_before_anything_is_written(adopted):
    folders, raw, env, log, checkpoint = adopted
    with pytest.raises(NNUNetCommandError, match="use the trainer with suffix _Primus"):
        run_nnunet(["nnUNetv2_train", DATASET, "3d_fullres", "all", "-p", PLANS, "-tr", "FullFinetuneTrainer_Primus_S",
                    "-pretrained_weights", checkpoint, "-device", "cpu"], env, log)
    assert not list((folders.results / NAME).glob("FullFinetuneTrainer_Primus_S__*"))
