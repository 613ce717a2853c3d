"""The TPP trainer's checks, without running nnU-Net (the end-to-end runs are in tests/test_e2e_ct.py): the fold's
pretext state and result are resumed or reused only when made from this run's backbone, method and options, a
refusal names the files and how to proceed and changes nothing, and the pretext settings are checked before the
stage starts (batch, views against the plan's pooling and the cases, learning rates)."""
import dataclasses
import hashlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import STUNet, build_stunet
from nnunet_tpp.pretext.dino import PretextSettingsError
from nnunet_tpp.pretext.stage import save_target_parameters
from nnunet_tpp.trainers.recipe import resolve_recipe
from nnunet_tpp.trainers.base import BACKBONE_RECORD
from nnunet_tpp.trainers.tpp import TPP_FILE, TPP_STATE, TPPTrainer, TPPFoldError

POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _trainer(folder, network, continue_training=False, lines=None):
    trainer = TPPTrainer.__new__(TPPTrainer)  # (no nnU-Net plans needed for these checks)
    trainer.output_folder, trainer.network, trainer.local_rank = str(folder), network, 0
    trainer.continue_training = continue_training
    trainer.print_to_log_file = lambda message, **_: (lines if lines is not None else []).append(message)
    return trainer


def _tiny(seed=0, method="conv_adapter"):
    torch.manual_seed(seed)
    net = peft.apply(STUNet(1, 3, [1] * 6, [4, 8, 16, 16, 16, 16], POOLS), method)
    peft.fingerprint_backbone(net)
    return net


def _snapshot(folder):
    return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest() for p in os.listdir(folder)}


def _state_from(net, path):
    from nnunet_tpp.pretext.stage import STATE_FORMAT
    peft.atomic_torch_save({"state_format": STATE_FORMAT, "identity": peft.identity(net), "settings": {},
                            "student": {}, "teacher": {}, "optimizer": {}, "center": torch.zeros(1, 4), "epoch": 1,
                            "history": []}, path)


def test_a_fresh_run_refuses_the_fold_files_of_another_backbone_and_changes_nothing(tmp_path):
    theirs = _tiny(seed=0)
    _state_from(theirs, tmp_path / TPP_STATE)
    save_target_parameters(theirs, str(tmp_path / TPP_FILE))
    (tmp_path / BACKBONE_RECORD).write_text('{"path": "/data/STUNet_S_other.model"}')
    before = _snapshot(tmp_path)
    with pytest.raises(TPPFoldError) as info:
        _trainer(tmp_path, _tiny(seed=1)).check_fold_files("/data/STUNet_S.model")
    message = str(info.value)
    for part in (TPP_STATE, TPP_FILE, str(tmp_path), "/data/STUNet_S.model", "/data/STUNet_S_other.model",
                 "a different pre-trained checkpoint", "--c", "new fold folder", "left as they were"):
        assert part in message, part
    assert _snapshot(tmp_path) == before
    with pytest.raises(TPPFoldError, match="method conv_adapter"):  # another method in the same folder
        _trainer(tmp_path, _tiny(seed=0, method="lora")).check_fold_files("/data/STUNet_S_other.model")


def test_the_same_backbone_resumes_and_reuses_with_a_log_line(tmp_path):
    ours = _tiny(seed=0)
    _state_from(ours, tmp_path / TPP_STATE)
    save_target_parameters(ours, str(tmp_path / TPP_FILE))
    lines = []
    _trainer(tmp_path, _tiny(seed=0), lines=lines).check_fold_files("STUNet_S.model")
    assert any("resuming its pretext stage" in line for line in lines)
    assert any("reusing its pretext result" in line for line in lines)


def test_files_without_a_fingerprint_are_refused_on_a_fresh_run_but_continued_with_c(tmp_path):
    net = _tiny(seed=0)
    payload = {"format": "nnunet_tpp.tpp/1", **{k: v for k, v in peft.identity(net).items() if k != "backbone"},
               "target_parameters": {}}
    torch.save(payload, tmp_path / TPP_FILE)  # as an earlier version wrote it
    with pytest.raises(TPPFoldError, match="no backbone fingerprint"):
        _trainer(tmp_path, net).check_fold_files("STUNet_S.model")
    lines = []
    _trainer(tmp_path, net, continue_training=True, lines=lines).check_fold_files(None)
    assert any("reusing" in line for line in lines)


def test_a_refused_backbone_leaves_the_fold_record_of_the_other_run(tmp_path):
    torch.manual_seed(0)
    ours = build_stunet("S", 1, 3)
    torch.save({"network_weights": ours.state_dict()}, tmp_path / "ours.pth")
    theirs = peft.apply(build_stunet("S", 1, 3), "conv_adapter")
    peft.fingerprint_backbone(theirs)  # a different random backbone made the fold's state
    fold = tmp_path / "fold"
    fold.mkdir()
    _state_from(theirs, fold / TPP_STATE)
    record = '{"path": "/data/theirs.pth", "fingerprint": "%s"}' % peft.backbone_fingerprint(theirs)
    (fold / BACKBONE_RECORD).write_text(record)
    trainer = _trainer(fold, peft.apply(build_stunet("S", 1, 3), "conv_adapter"))
    trainer.pretrained_report = None
    with pytest.raises(TPPFoldError, match="that run's backbone: /data/theirs.pth"):
        trainer.load_pretrained_backbone(str(tmp_path / "ours.pth"))
    assert (fold / BACKBONE_RECORD).read_text() == record  # that run's --c still reloads its own backbone
    trainer.load_pretrained_backbone(str(tmp_path / "ours.pth"), record=False)  # nnunet-tpp pretrain
    assert (fold / BACKBONE_RECORD).read_text() == record
    (fold / TPP_STATE).unlink()
    trainer.load_pretrained_backbone(str(tmp_path / "ours.pth"))
    import json
    assert json.loads((fold / BACKBONE_RECORD).read_text())["path"] == str(tmp_path / "ours.pth")
    assert peft.backbone_fingerprint(trainer.network) is not None


class _Cases:
    def __init__(self, shapes):
        self.shapes = shapes

    def __call__(self, folder, keys):
        return self

    def load_case(self, key):
        return np.zeros((1, *self.shapes[key]), dtype=np.float32), None, None, {}


def _setup_trainer(**fields):
    trainer = _trainer("/nonexistent", _tiny())
    trainer.recipe = dataclasses.replace(resolve_recipe("TPPConvAdapterTrainer", "S"), **fields)
    trainer.configuration_manager = SimpleNamespace(patch_size=[64, 64, 64], pool_op_kernel_sizes=[[1, 1, 1]] + POOLS)
    trainer.do_split = lambda: (["a", "b", "d", "e", "f"], ["c"])
    trainer.dataset_class = _Cases({"a": (80, 80, 80), "b": (56, 90, 90), "c": (8, 8, 8), "d": (70, 70, 70),
                                    "e": (70, 70, 70), "f": (70, 70, 70)})
    trainer.preprocessed_dataset_folder = ""
    trainer.fold = "all"
    return trainer


@pytest.mark.parametrize("fields,message", [
    ({"pretext": "dino", "pretext_batch_size": 0}, "batch size must be >= 1"),
    ({"pretext": "dino", "pretext_view_size": [48, 48, 36]}, "does not fit the plan's pooling"),
    ({"pretext": "dino", "pretext_view_size": [64, 64, 64]}, "larger than 1 of the 5 training cases"),
    ({"pretext": "dino", "pretext_lr": 0.0}, "must be > 0"),
    ({"pretext": "dino", "pretext_lr": 1e-6, "pretext_min_lr": 1e-5}, "below the peak"),
    ({"pretext": "mae", "pretext_lr": 0.0}, "must be > 0"),
    ({"pretext": "mae", "pretext_view_size": [48, 48, 36]}, "does not fit the plan's pooling"),
    ({"pretext": "mae", "pretext_mask_ratio": 0.01}, "masks none"),
    ({"pretext": "mae", "pretext_optimizer": "adam"}, "optimizer must be one of"),
])
def test_pretext_settings_are_checked_before_the_stage(fields, message):
    trainer = _setup_trainer(**fields)
    with pytest.raises(PretextSettingsError, match=message):
        trainer.check_resumable_state("/nonexistent/tpp_state.pth")


def test_the_pretexts_defaults_fit_and_the_control_holds_out_evaluation_cases():
    plan = _setup_trainer(pretext="dino").pretext_setup()  # (the validation case is not looked at)
    assert plan.view == (32, 32, 32) and plan.divisor == [8, 8, 8] and plan.stage_keys == ["a", "b", "d", "e", "f"]
    assert plan.schedule.batch_size == 8 and plan.cfg.lr == 5e-4 and plan.cfg.keep == "teacher"
    assert plan.cfg.teacher_mode == "train" and plan.cfg.clip == "per_parameter" and not plan.control
    plan = _setup_trainer(pretext="mae").pretext_setup()
    assert plan.view == (64, 64, 64) and plan.schedule.batch_size == 2  # nnssl: the patch, batch 2
    assert (plan.cfg.mask_ratio, plan.cfg.block_size) == (0.75, 16)
    plan = _setup_trainer(pretext="mae", pretext_control=True).pretext_setup()
    assert len(plan.eval_keys) == 1 and plan.control  # 20 % of 5 training cases, never the validation case
    assert sorted(plan.eval_keys + plan.stage_keys) == ["a", "b", "d", "e", "f"]
    trainer = _setup_trainer(pretext="mae", pretext_control=True)
    trainer.do_split = lambda: (["a"], [])
    with pytest.raises(PretextSettingsError, match="pretext_control needs at least 2 training cases"):
        trainer.pretext_setup()
