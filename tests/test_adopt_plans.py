"""``nnunet-tpp adopt-plans``: the model's plans for another dataset, as nnU-Net's plan transfer writes them, and
refusals (before anything is written) when the dataset's channels or file format do not fit the model."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.adopt_plans import AdoptPlansError, adopt_plans, default_plans_name
from nnunet_tpp.cli import main


def _tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


@pytest.fixture
def world(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    target = raw / "Dataset700_Target"
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    sitk.WriteImage(image, str(target / "imagesTr" / "c1_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 16), np.uint8)), str(target / "labelsTr" / "c1.nii.gz"))
    (target / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                     "organ": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    model = tmp_path / "model" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    plans = {"dataset_name": "Dataset003_Liver", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [16] * 3}}}
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                    "liver": 1, "tumor": 2}, "file_ending": ".nii.gz"}))
    return model, raw, pre


def test_plans_are_written_for_the_dataset_as_nnunet_moves_them(world):
    model, raw, pre = world
    out = adopt_plans(model, "700", run_preprocessing=False, echo=lambda m: None)
    assert out == pre / "Dataset700_Target" / "nnUNetPlans_from_Dataset003_Liver.json"
    plans = json.loads(out.read_text())
    assert plans["dataset_name"] == "Dataset700_Target" and plans["plans_name"] == out.stem
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == f"{out.stem}_3d_fullres"
    assert json.loads((pre / "Dataset700_Target" / "dataset.json").read_text())["labels"]["organ"] == 1
    assert default_plans_name(__import__("nnunet_tpp.adopt_plans", fromlist=["read_source"]).read_source(model)) \
        == out.stem
    before = _tree(pre)
    with pytest.raises(AdoptPlansError, match="exists; pass another name"):
        adopt_plans(model / "fold_0", "Dataset700_Target", run_preprocessing=False)  # a fold folder works too
    assert _tree(pre) == before


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(channel_names={"0": "T1", "1": "T2"}), "1 input channel"),
    (None, "are read by SimpleITKIO, but the model was trained on images read by NibabelIO"),
])
def test_a_dataset_that_does_not_fit_the_model_is_refused_before_writing(world, change, message):
    model, raw, pre = world
    if change is not None:
        dataset = json.loads((model / "dataset.json").read_text())
        change(dataset)
        (model / "dataset.json").write_text(json.dumps(dataset))
    else:
        plans = json.loads((model / "plans.json").read_text())
        plans["image_reader_writer"] = "NibabelIO"
        (model / "plans.json").write_text(json.dumps(plans))
    raw_before = _tree(raw)
    with pytest.raises(AdoptPlansError, match=message):
        adopt_plans(model, "700", run_preprocessing=False)
    assert _tree(pre) is None and _tree(raw) == raw_before


def test_bad_sources_and_configurations_are_clear_errors(world, tmp_path, capsys):
    model, raw, pre = world
    with pytest.raises(AdoptPlansError, match="no plans.json \\+ dataset.json here"):
        adopt_plans(tmp_path, "700")
    with pytest.raises(AdoptPlansError, match="no configuration\\(s\\) \\['2d'\\]"):
        adopt_plans(model, "700", configurations=("2d",))
    assert main(["adopt-plans", str(model), "-d", "700", "-p", "a__b", "--no-preprocess"]) == 2
    assert "must not contain '__'" in capsys.readouterr().err
    assert _tree(pre) is None
