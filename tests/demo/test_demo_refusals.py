"""``nnunet-tpp demo`` refuses bad settings and inputs before it writes anything or starts nnU-Net (issue 15)."""
import hashlib
import json

import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp.cli import main
from tests.conftest import CT_IMAGE, CT_LABELS, require


def _hashes(*folders):
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for f in folders if f.exists() for p in sorted(f.rglob("*"))}


@pytest.fixture(autouse=True)
def no_nnunet(monkeypatch):
    """A refusal must come before planning: any nnU-Net command here is a test failure."""
    import nnunet_tpp.demo.pipeline as pipeline

    def refuse(args, *a, **k):
        raise AssertionError(f"the demo started {args[0]} before refusing")
    monkeypatch.setattr(pipeline, "run_nnunet", refuse)


def _stunet_stage0(size, path, **extra):
    """The first encoder stage of an STU-Net of that size, under its published key names (what the size check
    reads), saved as an nnU-Net v2 checkpoint."""
    from nnunet_tpp.models.stunet import build_stunet
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_stunet(size, 1, 2).state_dict().items()}
    torch.save({"network_weights": {k: torch.zeros(s) for k, s in shapes.items()
                                    if k.startswith("conv_blocks_context.0.")}, **extra}, path)


def _run(tmp_path, *args):
    work = tmp_path / "work"
    code = main(["demo", "--work-dir", str(work), *args])
    return code, work


def test_a_checkpoint_of_another_size_is_refused_before_planning(tmp_path, capsys):
    ckpt = tmp_path / "STUNet_B.pth"
    _stunet_stage0("B", ckpt, trainer_name="STUNetTrainer_B")
    before = _hashes(tmp_path)
    code, work = _run(tmp_path, "--pretrained", str(ckpt))
    err = capsys.readouterr().err
    assert code == 2
    assert "is STU-Net-B, but the demo's trainer ConvAdapterTrainer_S builds STU-Net-S" in err
    assert "--trainer ConvAdapterTrainer_B" in err
    assert not work.exists() and _hashes(tmp_path) == before


def test_a_file_that_is_not_a_backbone_is_refused_by_kind(tmp_path, capsys):
    from nnunet_tpp import peft
    from nnunet_tpp.models.stunet import build_stunet
    from nnunet_tpp.pretext.stage import save_target_parameters
    net = build_stunet("S", 1, 3)
    peft.apply(net, "conv_adapter")
    save_target_parameters(net, str(tmp_path / "tpp.pth"))
    (tmp_path / "notes.txt").write_text("a checkpoint, I promise")
    before = _hashes(tmp_path)
    for name, message in (("tpp.pth", "is an nnunet_tpp target-parameter file"),
                          ("tpp.pth", "pass it with NNUNET_TPP_TARGET_PARAMETERS"),
                          ("notes.txt", "is not a readable PyTorch checkpoint: it is a text file"),
                          ("missing.model", "checkpoint not found")):
        code, work = _run(tmp_path, "--pretrained", str(tmp_path / name))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "weights_only" not in err, err
        assert not work.exists() and _hashes(tmp_path) == before


def test_an_empty_data_folder_says_it_found_no_images(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    before = _hashes(tmp_path)
    code, work = _run(tmp_path, "--data", str(tmp_path / "data"))
    err = capsys.readouterr().err
    assert code == 2 and "found no image files in" in err and "--labels" not in err
    assert not work.exists() and _hashes(tmp_path) == before


def test_real_ct_data_problems_are_found_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(require(CT_IMAGE))), str(data / "ct.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(require(CT_LABELS))), str(data / "ct_labels.nii.gz"))
    before = _hashes(tmp_path)
    code, work = _run(tmp_path, "--data", str(data))  # no labels.json: now it asks for the labels
    assert code == 2 and "give the label names with --labels or a labels.json" in capsys.readouterr().err
    code, work = _run(tmp_path, "--data", str(data), "--labels", json.dumps({"background": 0, "liver": 1}))
    err = capsys.readouterr().err  # the real labels hold 2 (kidney) too
    assert code == 2 and "label values [2] are not in the dataset's label set" in err and "nothing was written" in err
    assert not work.exists() and _hashes(tmp_path) == before


def test_a_taken_dataset_id_in_the_work_folder_and_bad_settings(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "nnUNet_raw" / "Dataset501_Other").mkdir(parents=True)
    (work / "nnUNet_raw" / "Dataset501_Other" / "dataset.json").write_text("{}")
    before = _hashes(tmp_path)
    for args, message in ((["--pretrained", str(tmp_path / "x.pth")], "checkpoint not found"),
                          ([], "dataset id 501 is taken: " + str(work.resolve() / "nnUNet_raw" / "Dataset501_Other")),
                          (["--trainer", "ConvAdaptorTrainer_S"], "did you mean ConvAdapterTrainer_S"),
                          (["--epochs", "0"], "epochs must be an integer >= 1"),
                          (["--dataset-id", "999"], "--dataset-id must be within 1..998")):
        code, _ = _run(tmp_path, *args)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert _hashes(tmp_path) == before
