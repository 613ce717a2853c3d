"""End to end on the real CT in ../shared/data/ct with the stock nnU-Net commands:
raw dataset -> plan and preprocess -> ConvAdapterTrainer_S from a v1-format checkpoint -> predict -> evaluate;
the refusals; restoring a model from its adapter file; the TPP trainer and ``nnunet-tpp pretrain``.

Planning is shared by the module; every test that trains has its own ``nnUNet_results`` folder (the ``trained``
fixture's model is only read), so each test passes alone and in any order. Killing and resuming a run with ``--c``
is tested in ``tests/trainers/test_nnunet_resume.py``; learning against chance in
``tests/trainers/test_nnunet_learning.py``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.data.nnunet_raw import Case, write_raw_dataset
from nnunet_tpp.evaluation import evaluate_folder, geometry_mismatches
from nnunet_tpp.models.stunet import build_stunet
from nnunet_tpp.models.stunet_checkpoint import read_checkpoint
from nnunet_tpp.nnunet_commands import NNUNetCommandError, NNUNetFolders, run_nnunet
from nnunet_tpp.trainers.restore import initial_network
from tests.conftest import CT_IMAGE, CT_LABELS, assert_pretext_moved_its_target_parameters, require, write_v1_checkpoint

pytestmark = pytest.mark.e2e
DATASET_ID = 611
LABELS = {"background": 0, "liver": 1, "kidney": 2}
TPP_SEED = 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    folders = NNUNetFolders(root)
    folders.make()
    raw = write_raw_dataset(folders.raw, DATASET_ID, "CT", [Case("ct001", require(CT_IMAGE), require(CT_LABELS))],
                            LABELS, test=[Case("ct001", CT_IMAGE)])
    env = folders.env(NNUNET_TPP_EPOCHS="1", NNUNET_TPP_ITERS_PER_EPOCH="2", NNUNET_TPP_VAL_ITERS_PER_EPOCH="1")
    log = root / "log.txt"
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "--verify_dataset_integrity",
                "-np", "1", "-npfp", "1"], env, log)
    _set_patch_size(folders, [64, 64, 64])
    return folders, raw, env, log


def _own_results(env: dict, tmp_path) -> tuple[dict, object]:
    """The module's environment with this test's own ``nnUNet_results`` folder, and that folder."""
    results = tmp_path / "nnUNet_results"
    results.mkdir()
    return dict(env, nnUNet_results=str(results)), results


def _set_patch_size(folders: NNUNetFolders, patch: list[int]) -> None:
    """Edits the plan's 3d_fullres patch (nnU-Net planned 112 x 112 x 128 for this CT): a 64^3 patch makes a
    training step on 2 CPU cores about 5x faster. nnU-Net's final validation, which slides this patch over the
    case with mirroring, is skipped in these tests (the demo test runs it); nnUNetv2_predict is run without it."""
    plans_file = next(folders.preprocessed.rglob("nnUNetPlans.json"))
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = patch
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="module")
def stunet_s(tmp_path_factory):
    """A published-style STU-Net-S checkpoint (v1 ``.model``, random weights) and its backbone tensors."""
    ckpt = tmp_path_factory.mktemp("stunet") / "STUNet_S.model"
    return ckpt, write_v1_checkpoint(ckpt)


@pytest.fixture(scope="module")
def trained(workspace, stunet_s):
    """ConvAdapterTrainer_S fine-tuned for one short epoch from a v1-format checkpoint (tests only read its
    model folder)."""
    folders, raw, env, log = workspace
    ckpt, backbone = stunet_s
    ckpt_bytes = ckpt.read_bytes()
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "ConvAdapterTrainer_S",
                "-pretrained_weights", ckpt, "-device", "cpu"], dict(env, NNUNET_TPP_SKIP_VALIDATION="1"), log)
    fold = next(folders.results.rglob("ConvAdapterTrainer_S__nnUNetPlans__3d_fullres")) / "fold_all"
    return ckpt, ckpt_bytes, backbone, fold


def test_conv_adapter_trainer_end_to_end_on_real_ct(workspace, trained, tmp_path):
    folders, raw, env, log = workspace
    ckpt, ckpt_bytes, backbone, fold = trained

    training_log = next(fold.glob("training_log_*.txt")).read_text()
    assert "trainable parameters: " in training_log and "pre-trained weights:" in training_log
    assert f"loaded {len(backbone)} tensors" in training_log

    final = read_checkpoint(str(fold / "checkpoint_final.pth"))
    for key, value in backbone.items():  # every pre-trained backbone tensor is unchanged
        assert torch.equal(final["network_weights"][key], value), key
    assert any(".adapter." in k for k in final["network_weights"])
    adapter_file = fold / "peft_weights.pth"
    assert adapter_file.stat().st_size < 0.1 * (fold / "checkpoint_final.pth").stat().st_size
    assert ckpt.read_bytes() == ckpt_bytes  # the user's checkpoint is untouched

    predictions = tmp_path / "pred"
    run_nnunet(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", DATASET_ID, "-c", "3d_fullres",
                "-f", "all", "-tr", "ConvAdapterTrainer_S", "-device", "cpu", "-npp", "1", "-nps", "1",
                "--disable_tta"], env, log)
    prediction = predictions / "ct001.nii.gz"
    assert geometry_mismatches(CT_IMAGE, prediction) == []
    labels_dir = tmp_path / "ref"
    labels_dir.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CT_LABELS)), str(labels_dir / "ct001.nii.gz"))
    result = evaluate_folder(labels_dir, predictions, LABELS)
    assert set(result.dice) == {"liver", "kidney"}
    assert all(0.0 <= v <= 1.0 or np.isnan(v) for v in result.dice.values())
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))) <= {0, 1, 2}


def test_checkpoint_of_another_size_stops_before_training(workspace, tmp_path):
    folders, raw, env, log = workspace
    ckpt = tmp_path / "STUNet_B.model"
    write_v1_checkpoint(ckpt, size="B")
    with pytest.raises(NNUNetCommandError) as err:
        run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "LoRATrainer_S",
                    "-pretrained_weights", ckpt, "-device", "cpu"], env, log)
    assert "is STU-Net-B, but this network is STU-Net-S" in str(err.value)
    assert "nothing was written" in str(err.value)
    assert not list(folders.results.rglob("LoRATrainer_S__nnUNetPlans__3d_fullres"))  # checked before nnU-Net starts


def test_missing_checkpoint_file_is_a_clear_error(workspace):
    folders, raw, env, log = workspace
    with pytest.raises(NNUNetCommandError, match="checkpoint not found: .* is a path that does not exist"):
        run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "BitFitTrainer_S",
                    "-pretrained_weights", folders.root / "nope.model", "-device", "cpu"], env, log)


def test_wrong_files_and_flags_are_refused_before_anything_is_written(workspace, trained):
    folders, raw, env, log = workspace
    ckpt, _, _, fold = trained
    before = sorted(p.name for p in fold.iterdir())
    cases = [(["--c", "-pretrained_weights", ckpt], {}, "--c continues a run from its own checkpoint"),
             (["-pretrained_weights", ckpt], {"NNUNET_TPP_TARGET_PARAMETERS": str(ckpt)},
              "is an STU-Net-S checkpoint .* not a target-parameter file: pass it with -pretrained_weights")]
    for extra, variables, message in cases:
        with pytest.raises(NNUNetCommandError, match=message) as err:
            run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "ConvAdapterTrainer_S", *extra,
                        "-device", "cpu"], dict(env, **variables), log)
        assert "weights_only=False" not in str(err.value)
    assert sorted(p.name for p in fold.iterdir()) == before


def test_model_is_restored_from_adapter_weights_and_backbone(workspace, trained, tmp_path):
    folders, raw, env, log = workspace
    ckpt, _, _, trained_fold = trained
    from nnunet_tpp.cli import main
    model = tmp_path / trained_fold.parent.name  # what a user shares: plans, dataset.json, the adapter file
    fold = model / "fold_all"
    fold.mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "fold_all/peft_weights.pth"):
        shutil.copyfile(trained_fold.parent / name, model / name)
    assert main(["restore", str(fold.parent), "-f", "all", "--backbone", str(ckpt),
                 "--checkpoint-name", "restored.pth"]) == 0
    original = read_checkpoint(str(trained_fold / "checkpoint_final.pth"))
    restored = read_checkpoint(str(fold / "restored.pth"))
    assert restored["trainer_name"] == "ConvAdapterTrainer_S"
    assert set(restored["network_weights"]) == set(original["network_weights"])
    for key, value in original["network_weights"].items():
        assert torch.equal(restored["network_weights"][key], value), key
    assert main(["restore", str(fold.parent), "-f", "all", "--backbone", str(ckpt),
                 "--checkpoint-name", "restored.pth"]) == 2  # never overwrites
    other = tmp_path / "other_STUNet_S.model"  # the same architecture, other weights
    torch.manual_seed(7)
    torch.save({"state_dict": build_stunet("S", 1, 105).state_dict()}, other)
    assert main(["restore", str(fold.parent), "-f", "all", "--backbone", str(other),
                 "--checkpoint-name", "other.pth"]) == 2  # the adapter file's backbone fingerprint differs
    assert not (fold / "other.pth").exists()
    assert main(["restore", str(fold.parent), "-f", "all", "--backbone", str(other), "--checkpoint-name",
                 "other.pth", "--force"]) == 0


def test_tpp_trainer_pretrains_target_parameters_then_fine_tunes(workspace, stunet_s, tmp_path):
    folders, raw, env, log = workspace
    ckpt, backbone = stunet_s
    env, results = _own_results(env, tmp_path)
    dino = tmp_path / "dino.yaml"  # (the 3-D default pretext is mae; this test covers DINO)
    dino.write_text("pretext: dino\n")
    tpp_env = dict(env, NNUNET_TPP_PRETEXT_EPOCHS="1", NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH="2",
                   NNUNET_TPP_SKIP_VALIDATION="1", NNUNET_TPP_SEED=str(TPP_SEED), NNUNET_TPP_RECIPE=str(dino))
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "TPPConvAdapterTrainer_S",
                "-pretrained_weights", ckpt, "-device", "cpu"], tpp_env, log)
    model = next(results.rglob("TPPConvAdapterTrainer_S__nnUNetPlans__3d_fullres"))
    fold = model / "fold_all"
    result = torch.load(fold / "tpp_target_parameters.pth", map_location="cpu", weights_only=True)
    assert result["method"] == "conv_adapter" and result["architecture"] == "STUNet-S"
    assert all(".adapter." in k for k in result["target_parameters"])
    assert_pretext_moved_its_target_parameters(result, model, "TPPConvAdapterTrainer_S", TPP_SEED)
    assert (fold / "tpp_progress.png").exists()
    assert result["backbone"] == json.loads((fold / "backbone.json").read_text())["fingerprint"]
    diagnostics = json.loads((fold / "tpp_diagnostics.json").read_text())
    assert len(diagnostics) == 1 and set(diagnostics[0]) == {"epoch", "loss", "teacher_entropy",
                                                             "batch_mean_entropy", "kl", "log_k"}
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "TPP: pretext stage finished" in text and "starts from the pre-trained target parameters" in text
    assert "teacher entropy" in text and "mean IoU" in text
    final = read_checkpoint(str(fold / "checkpoint_final.pth"))
    for key, value in backbone.items():
        assert torch.equal(final["network_weights"][key], value), key

    # a new run in the same fold, with learning rate 0 so that fine-tuning cannot move any parameter: its final
    # network must hold exactly the pretext stage's target parameters
    frozen_lr = tmp_path / "lr0.yaml"
    frozen_lr.write_text("pretext: dino\ninitial_lr: 0.0\n")
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "TPPConvAdapterTrainer_S",
                "-pretrained_weights", ckpt, "-device", "cpu"], dict(tpp_env, NNUNET_TPP_RECIPE=str(frozen_lr)), log)
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "pretext stage already finished" in text and "not repeated" in text
    assert "was made from this backbone, method and options: reusing its pretext result" in text
    final = read_checkpoint(str(fold / "checkpoint_final.pth"))
    for key, value in result["target_parameters"].items():
        assert torch.equal(final["network_weights"][key], value), key
    heads = {k: v for k, v in initial_network(model, "TPPConvAdapterTrainer_S", TPP_SEED).state_dict().items()
             if k.startswith("seg_outputs.")}  # untouched at lr 0: the seeded initial values, rebuilt here
    assert heads and all(torch.equal(final["network_weights"][k], v) for k, v in heads.items())

    # a fresh run with another backbone in this fold is refused before the fold's files change
    other = tmp_path / "STUNet_S_other.model"
    write_v1_checkpoint(other, seed=1)
    watched = {p.name: p.read_bytes() for p in fold.iterdir() if p.name.startswith("tpp_") or p.name.startswith(
        ("backbone.json", "checkpoint_"))}
    with pytest.raises(NNUNetCommandError, match="tpp_state.pth, tpp_target_parameters.pth and "
                                                     "tpp_initial_target_parameters.pth of another TPP run"):
        run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "TPPConvAdapterTrainer_S",
                    "-pretrained_weights", other, "-device", "cpu"], tpp_env, log)
    assert {name: (fold / name).read_bytes() for name in watched} == watched

    # --c of an interrupted pretext stage (only its state left): the recorded backbone is reloaded first, without a
    # warning about a random backbone, and the stage resumes
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth", "tpp_target_parameters.pth"):
        (fold / name).unlink(missing_ok=True)
    logs = set(fold.glob("training_log_*.txt"))
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "TPPConvAdapterTrainer_S", "--c",
                "-device", "cpu"], tpp_env, log)
    text = "".join(p.read_text() for p in set(fold.glob("training_log_*.txt")) - logs)
    assert "TPP: resuming; reloading the pre-trained backbone" in text and "resuming at epoch 1" in text
    assert "the backbone is random" not in text
    resumed = torch.load(fold / "tpp_target_parameters.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, result["target_parameters"][k]) for k, v in resumed["target_parameters"].items())


def test_pretrain_command_then_any_peft_trainer_starts_from_its_file(workspace, stunet_s, tmp_path):
    folders, raw, env, log = workspace
    ckpt, _ = stunet_s
    env, results = _own_results(env, tmp_path)
    out = tmp_path / "ct_target_parameters.pth"
    dino = tmp_path / "dino.yaml"  # (the 3-D default pretext is mae; this test covers DINO)
    dino.write_text("pretext: dino\n")
    pre_env = dict(env, NNUNET_TPP_PRETEXT_EPOCHS="1", NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH="1",
                   NNUNET_TPP_RECIPE=str(dino))
    # the fold of an earlier training run of the same trainer: pretrain logs there and must leave its files alone
    tpp_fold = results / "Dataset611_CT" / "TPPConvAdapterTrainer_S__nnUNetPlans__3d_fullres" / "fold_all"
    tpp_fold.mkdir(parents=True)
    for name in ("tpp_state.pth", "tpp_target_parameters.pth", "tpp_diagnostics.json", "backbone.json",
                 "checkpoint_latest.pth", "checkpoint_final.pth", "peft_weights.pth"):
        (tpp_fold / name).write_bytes(f"the earlier run's {name}".encode())
    watched = {p.name: p.read_bytes() for p in tpp_fold.iterdir()}
    run_nnunet(["nnunet-tpp", "pretrain", "-d", DATASET_ID, "-tr", "TPPConvAdapterTrainer_S",
                "-pretrained_weights", ckpt, "-o", out], pre_env, log)
    assert torch.load(out, weights_only=True)["method"] == "conv_adapter"
    assert json.loads(out.with_suffix(".tpp_diagnostics.json").read_text())[0]["epoch"] == 1
    assert out.with_suffix(".tpp_state.pth").exists() and out.with_suffix(".tpp_progress.png").exists()
    assert {p.name: p.read_bytes() for p in tpp_fold.iterdir() if not p.name.startswith("training_log")} == watched
    run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "ConvAdapterTrainer_S",
                "-pretrained_weights", ckpt, "-device", "cpu"],
               dict(env, NNUNET_TPP_TARGET_PARAMETERS=str(out), NNUNET_TPP_SKIP_VALIDATION="1"), log)
    fold = next(results.rglob("ConvAdapterTrainer_S__nnUNetPlans__3d_fullres")) / "fold_all"
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"starts from the pre-trained target parameters in {out}" in text
    with pytest.raises(NNUNetCommandError, match="holds target parameters that do not fit this model: method "
                                                 "conv_adapter"):
        run_nnunet(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "LoRATrainer_S",
                    "-pretrained_weights", ckpt, "-device", "cpu"],
                   dict(env, NNUNET_TPP_TARGET_PARAMETERS=str(out)), log)
