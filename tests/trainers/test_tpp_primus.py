"""TPP on Primus (``TPPLoRATrainer_Primus*``, ``TPPAdapterTrainer_Primus*``): the masked stage's defaults (nnssl's
Primus recipe: the patch as the view, one-token mask blocks, AdamW 3e-4), DINO on the mean patch token, settings
refused before the stage, and either stage with ``pretext_control`` on real few-slice MRI writing
``tpp_target_check.json``."""
import dataclasses
import json

import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import PretextSettingsError
from nnunet_tpp.trainers.recipe import resolve_recipe
from nnunet_tpp.trainers.zoo import TRAINERS
from tests.pretext.test_masked import FewSliceMRI
from tests.trainers.test_primus_trainers import _trainer, folders  # noqa: F401  (the fixture)

PATCH = (8, 32, 32)


def _tpp(family="TPPLoRATrainer", folder=None, **fields):
    trainer = _trainer(f"{family}_Primus", PATCH)
    trainer.recipe = dataclasses.replace(resolve_recipe(family, "Primus"), **fields)
    data = FewSliceMRI()
    names = sorted(data.cases)
    trainer.dataset_class = lambda root, keys: data
    trainer.do_split = lambda: (names[:5], names[5:])
    trainer.preprocessed_dataset_folder = ""
    trainer.fold = "all"
    if folder is not None:
        trainer.output_folder = str(folder)
    return trainer


def test_tpp_primus_trainers_exist_for_every_size_and_nnunet_finds_them():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for family in ("TPPLoRATrainer", "TPPAdapterTrainer"):
        for key in ("Primus_S", "Primus_B", "Primus_M", "Primus_L", "PrimusV3_S", "PrimusV3_B", "PrimusV3_M",
                    "PrimusV3_L", "Primus"):
            cls = TRAINERS[f"{family}_{key}"]
            assert cls.backbone.is_primus and resolve_recipe(family, key).tpp
    assert recursive_find_trainer_class_by_name("TPPLoRATrainer_Primus_M").__name__ == "TPPLoRATrainer_Primus_M"


@pytest.mark.parametrize("family", ["TPPLoRATrainer", "TPPAdapterTrainer"])
def test_the_masked_stage_takes_nnssls_primus_recipe(folders, family):  # noqa: F811
    plan = _tpp(family, pretext_control=True).pretext_setup()
    assert plan.pretext == "mae" and plan.view == PATCH and plan.divisor == [8, 8, 8]
    cfg = plan.cfg
    assert (cfg.block_size, cfg.optimizer, cfg.lr, cfg.betas, cfg.grad_clip) == (8, "adamw", 3e-4, (0.9, 0.98), 1.0)
    assert plan.schedule.batch_size == 2 and len(plan.eval_keys) == 1 and len(plan.stage_keys) == 4
    assert _tpp(family, pretext_lr=1e-3, pretext_mask_block=16).pretext_setup().cfg.block_size == 16


@pytest.mark.parametrize("fields,message", [
    ({"pretext_view_size": [16, 32, 32]}, "takes only its patch"),
    ({"pretext_mask_block": 12}, "whole 8-voxel tokens"),
])
def test_settings_primus_cannot_take_are_refused_before_the_stage(folders, fields, message):  # noqa: F811
    with pytest.raises(PretextSettingsError, match=message):
        _tpp(**fields).check_resumable_state("/nonexistent/tpp_state.pth")


def test_dino_takes_the_mean_patch_token_and_views_at_the_patch(folders):  # noqa: F811
    from nnunet_tpp.pretext.token_embedding import TokenEmbedding
    trainer = _tpp(pretext="dino")
    plan = trainer.pretext_setup()
    assert plan.view == PATCH and plan.divisor == [8, 8, 8]  # global views at the patch, local ones resized to it
    embedding = trainer.pretext_embedding(plan)
    assert isinstance(embedding, TokenEmbedding) and embedding.size == PATCH and embedding.dim == 192


@pytest.mark.parametrize("pretext", ["mae", "dino"])
def test_the_stage_and_its_control_write_the_target_check(folders, tmp_path, pretext):  # noqa: F811
    trainer = _tpp(folder=tmp_path, pretext=pretext, pretext_control=True, pretext_epochs=2,
                   pretext_iterations_per_epoch=2, pretext_workers=0, pretext_eval_samples=2, pretext_lr=1e-3,
                   pretext_batch_size=2)
    net = peft.unwrap(trainer.network)
    peft.fingerprint_backbone(net)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if n not in peft.target_parameters(net)}
    trainer.run_pretext_stage(str(tmp_path / "tpp_target_parameters.pth"))
    check = json.loads((tmp_path / "tpp_target_check.json").read_text())
    assert check["pretext"] == pretext and check["control_steps"] == 4 and check["relative_change"] > 0
    assert all(check[k] > 0 for k in ("loss_trained", "loss_reset", "loss_control"))
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert (tmp_path / "tpp_progress.png").is_file() and (tmp_path / "tpp_initial_target_parameters.pth").is_file()
