"""The Primus trainers: nnU-Net's Primus optimisation (AdamW 1e-4 from a checkpoint / 3e-4 from scratch, weight decay
5e-2, linear warm-up then poly decay, gradient clipping at 1, no deep supervision), the decoder-only probe, EVA's
checkpointing with the plain path's gradients, a resumed run equal to an uninterrupted one bit for bit, and
refusals before anything is written."""
import json

import pytest
import torch

from nnunet_tpp.trainers.zoo import TRAINERS
from tests.nnssl_files import primus_checkpoint

EXPLICIT = {"network_class_name": "PrimusX", "_kw_requires_import": None, "arch_kwargs": {
    "embed_dim": 192, "patch_embed_size": [8, 8, 8], "encoder_eva_depth": 2, "encoder_eva_numheads": 4,
    "scale_attn_inner": True, "init_values": 0.1}}
DATASET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "numTraining": 1,
           "file_ending": ".nii.gz"}


def _plans(patch=(16, 16, 16)) -> dict:
    from tests.test_adopt_nnssl import _base_plans
    plans = _base_plans()
    config = plans["configurations"]["3d_fullres"]
    config.update(patch_size=list(patch), normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                  architecture=EXPLICIT)
    return plans


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("NNUNET_TPP_EPOCHS", "6")
    monkeypatch.setenv("NNUNET_TPP_WARMUP_EPOCHS", "2")
    return tmp_path


def _trainer(name: str = "FullFinetuneTrainer_Primus", patch=(16, 16, 16)):
    """A trainer with its network and loss, as ``initialize`` leaves them (without reading a dataset)."""
    plans = {**_plans(patch), "continue_training": False}
    trainer = TRAINERS[name](plans, "3d_fullres", "all", DATASET, torch.device("cpu"))
    torch.manual_seed(0)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2,
                                                         False)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.was_initialized = True
    return trainer


def _epoch(trainer, epoch: int) -> float:
    """What nnU-Net does around one training step of an epoch, on a fixed batch."""
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    gen = torch.Generator().manual_seed(100 + epoch)
    data = torch.randn(2, 1, 16, 16, 16, generator=gen)
    target = (data[:, :1] > 0.5).float()
    torch.manual_seed(epoch)  # stochastic depth
    trainer.train_step({"data": data, "target": target})
    trainer.logger.log("train_losses", 0.0, epoch)
    trainer.logger.log("val_losses", 0.0, epoch)
    trainer.logger.log("mean_fg_dice", 0.0, epoch)
    trainer.logger.log("ema_fg_dice", 0.0, epoch)
    trainer.logger.log("dice_per_class_or_region", [0.0], epoch)
    trainer.logger.log("epoch_start_timestamps", 0.0, epoch)
    trainer.logger.log("epoch_end_timestamps", 0.0, epoch)
    return trainer.optimizer.param_groups[0]["lr"]


def test_primus_trainer_names_and_nnunet_finds_them():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for family in ("FullFinetuneTrainer", "LinearProbeTrainer"):
        for key in ("Primus_S", "Primus_B", "Primus_M", "Primus_L", "PrimusV3_S", "PrimusV3_B", "PrimusV3_M",
                    "PrimusV3_L", "Primus"):
            assert TRAINERS[f"{family}_{key}"].backbone.is_primus, key
    assert recursive_find_trainer_class_by_name("FullFinetuneTrainer_PrimusV3_S").__name__ == \
        "FullFinetuneTrainer_PrimusV3_S"


def test_scratch_and_pretrained_learning_rates_and_the_schedule(folders, tmp_path):
    trainer = _trainer()
    optimizer = trainer.optimizer
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["betas"] == (0.9, 0.98)
    assert (trainer.initial_lr, trainer.weight_decay, trainer.enable_deep_supervision) == (3e-4, 5e-2, False)
    path, _ = primus_checkpoint(tmp_path / "checkpoint_final.pth", 192, 2, 4, patch=(16, 16, 16))
    trainer.load_pretrained_backbone(str(path), record=False)
    assert trainer.initial_lr == 1e-4 and trainer.pretrained_report.new_modules == ["up_projection"]
    lrs = [_epoch(trainer, e) for e in range(6)]
    # warm-up over 2 epochs (lr * (e + 1) / 2), then nnU-Net's poly decay over the 4 remaining epochs
    expected = [5e-5, 1e-4] + [1e-4 * (1 - s / 4) ** 0.9 for s in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_a_recipe_sets_learning_rate_and_weight_decay(folders, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("initial_lr: 0.002\nweight_decay: 0.01\n")
    monkeypatch.setenv("NNUNET_TPP_RECIPE", str(recipe))
    trainer = _trainer()
    path, _ = primus_checkpoint(tmp_path / "checkpoint_final.pth", 192, 2, 4, patch=(16, 16, 16))
    trainer.load_pretrained_backbone(str(path), record=False)
    assert (trainer.initial_lr, trainer.optimizer.param_groups[0]["weight_decay"]) == (0.002, 0.01)


def test_the_probe_trains_the_decoder_only(folders):
    trainer = _trainer("LinearProbeTrainer_Primus")
    trained = {n for n, p in trainer.network.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("up_projection.") for n in trained)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in trainer.network.named_parameters() if n in trained)
    before = {n: p.detach().clone() for n, p in trainer.network.named_parameters()}
    _epoch(trainer, 0)
    after = dict(trainer.network.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if n not in trained)
    assert all(not torch.equal(after[n], v) for n, v in before.items() if n in trained and n.endswith("weight"))


def test_eva_checkpointing_keeps_the_plain_gradients(folders, tmp_path, monkeypatch):
    grads = []
    for setting in ("off", "on"):
        recipe = tmp_path / f"{setting}.yaml"
        recipe.write_text(f"activation_checkpointing: '{setting}'\n")
        monkeypatch.setenv("NNUNET_TPP_RECIPE", str(recipe))
        net = _trainer().network
        assert net.activation_checkpointing == (setting == "on") and not net.eva.grad_checkpointing
        x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(3)
        net(x).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(folders, tmp_path):
    path, _ = primus_checkpoint(tmp_path / "checkpoint_final.pth", 192, 2, 4, patch=(16, 16, 16))
    straight = _trainer()
    straight.load_pretrained_backbone(str(path))  # records backbone.json: the run started from a checkpoint
    for epoch in range(4):
        _epoch(straight, epoch)
        if epoch == 2:  # past the warm-up: the resumed run must rebuild the poly schedule at 1e-4
            straight.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    resumed = _trainer()
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert (resumed.current_epoch, resumed.initial_lr, resumed.training_stage) == (3, 1e-4, "train")
    _epoch(resumed, 3)
    ours, theirs = resumed.network.state_dict(), straight.network.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_bad_patches_and_checkpoints_are_refused_before_training(folders, tmp_path):
    cls = TRAINERS["FullFinetuneTrainer_Primus"]
    with pytest.raises(ValueError, match="patch \\[20, 16, 16\\] does not fit Primus: every axis must be divisible "
                                         "by 8"):
        cls.check_before_training(_plans((20, 16, 16)), "3d_fullres", DATASET)
    other, _ = primus_checkpoint(tmp_path / "other.pth", 96, 2, 2, patch=(16, 16, 16))
    with pytest.raises(ValueError, match="holds a Primus \\(96 dims, depth 2, 2 heads\\) encoder"):
        cls.check_before_training(_plans(), "3d_fullres", DATASET, str(other))
    with pytest.raises(ValueError, match="these plans describe Primus \\(192 dims.* use the trainer with suffix "
                                         "_Primus"):
        TRAINERS["FullFinetuneTrainer_Primus_S"].check_before_training(_plans(), "3d_fullres", DATASET)
    assert not (tmp_path / "nnUNet_results").exists()
    assert json.loads(json.dumps(_plans()))  # the plans stay plain data


@pytest.mark.parametrize("family", ["LoRATrainer", "AdapterTrainer"])
def test_lora_and_adapter_trainers_adapt_the_eva_blocks_with_the_primus_optimisation(folders, tmp_path, family):
    """``LoRATrainer_Primus*`` / ``AdapterTrainer_Primus*``: LoRA on q and v (as the LoRA paper), Houlsby adapters
    after attention and MLP; AdamW 1e-4 with weight decay 5e-2 on the trainable parameters only once the nnssl
    checkpoint is loaded (the method's new weights start fresh, the decoder is new); frozen weights stay put."""
    from peft.tuners.lora import Linear as PeftLinear
    for key in ("Primus_S", "Primus_B", "Primus_M", "Primus_L", "PrimusV3_S", "PrimusV3_M", "Primus"):
        assert TRAINERS[f"{family}_{key}"].backbone.is_primus
    assert family not in TRAINERS or family == "LoRATrainer"  # the adapter has no STU-Net trainers
    assert "AdapterTrainer_B" not in TRAINERS and "TPPAdapterTrainer_B" not in TRAINERS
    assert TRAINERS["TPPAdapterTrainer_Primus"].backbone.is_primus  # TPP on Primus: tests/trainers/test_tpp_primus.py
    trainer = _trainer(f"{family}_Primus")
    net = trainer.network
    if family == "LoRATrainer":
        assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["nnunet_tpp"]["options"]["targets"] == [
            "q", "v"]
        assert isinstance(net.eva.blocks[0].attn.q_proj, PeftLinear) and isinstance(
            net.eva.blocks[0].attn.v_proj, PeftLinear) and type(net.eva.blocks[0].attn.k_proj) is torch.nn.Linear
    else:
        assert hasattr(net.eva.blocks[0], "adapter_attn") and hasattr(net.eva.blocks[0], "adapter_mlp")
    path, _ = primus_checkpoint(tmp_path / "checkpoint_final.pth", 192, 2, 4, patch=(16, 16, 16))
    trainer.load_pretrained_backbone(str(path), record=False)
    source = torch.load(path, weights_only=True)["network_weights"]
    key = "eva.blocks.0.attn.k_proj.weight"
    assert torch.equal(dict(net.named_parameters())[key], source[key])
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == set(__import__("nnunet_tpp").peft.trained_parameter_names(net))
    assert trainer.initial_lr == 1e-4 and trainer.optimizer.param_groups[0]["weight_decay"] == 5e-2
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in net.named_parameters() if n in trained)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _epoch(trainer, 0)
    _epoch(trainer, 1)
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if n not in trained)
    moved = [n for n in trained if ("lora_B" in n or "adapter_attn.up.weight" in n)]
    assert moved and all(not torch.equal(after[n], before[n]) for n in moved)
