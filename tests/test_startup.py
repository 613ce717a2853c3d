"""The start-up hook's trainer search: a misspelt name of ours gets our message with the nearest names, before
nnU-Net's own search can crash importing timm -> torchvision on CPU torch; other names reach nnU-Net (issue 15)."""
import hashlib
import os
import subprocess
import types

import pytest

from nnunet_tpp._startup import _wrap_trainer_search, close_trainer_names


def _hashes(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def search():
    """Our wrapper around a stand-in for nnU-Net's search that records the names it was asked for."""
    asked = []

    def original(name):
        asked.append(name)
        return f"nnU-Net's {name}"

    module = types.SimpleNamespace(recursive_find_trainer_class_by_name=original)
    _wrap_trainer_search(module)
    return module.recursive_find_trainer_class_by_name, asked


def test_a_misspelt_name_of_ours_gets_our_message_with_the_nearest_names(search):
    find, asked = search
    from nnunet_tpp.trainers.zoo import TRAINERS
    assert find("ConvAdapterTrainer_S") is TRAINERS["ConvAdapterTrainer_S"]
    for typo, nearest in (("ConvAdaptorTrainer_S", "ConvAdapterTrainer_S"),
                          ("convadaptertrainer_s", "ConvAdapterTrainer_S"),
                          ("TPPConvAdapter", "TPPConvAdapterTrainer"), ("LoraTrainer_B", "LoRATrainer_B"),
                          ("STUNetTrainer_5epochs", "STUNetTrainer_S")):
        with pytest.raises(RuntimeError, match=rf"^Could not find requested nnunet trainer {typo}: .*"
                                               rf"Did you mean {nearest}\?"):
            find(typo)
    assert asked == []


def test_other_names_go_to_nnunet_unchanged(search, tmp_path, monkeypatch):
    find, asked = search
    # far from ours; and close to ours but defined by nnU-Net itself (nnUNetTrainer scores 0.85 vs STUNetTrainer)
    for name in ("nnUNetTrainer_5epochs", "MyTrainer", "nnUNetTrainer", "nnUNetTrainerNoDA"):
        assert find(name) == f"nnU-Net's {name}"
    # a user's own trainer of a name close to ours, in their own nnUNet_extTrainer folder
    (tmp_path / "mine.py").write_text("class ConvAdaptorTrainer_S(object):\n    pass\n")
    monkeypatch.setenv("nnUNet_extTrainer", f"{tmp_path}{os.pathsep}{os.environ.get('nnUNet_extTrainer', '')}")
    assert find("ConvAdaptorTrainer_S") == "nnU-Net's ConvAdaptorTrainer_S"
    assert asked == ["nnUNetTrainer_5epochs", "MyTrainer", "nnUNetTrainer", "nnUNetTrainerNoDA", "ConvAdaptorTrainer_S"]


def test_closeness_rule():
    from nnunet_tpp.trainers.zoo import TRAINERS
    assert close_trainer_names("ConvAdaptorTrainer_S", TRAINERS)[0] == "ConvAdapterTrainer_S"
    assert close_trainer_names("ConvAdapterTrainer_XL", TRAINERS)[0] == "ConvAdapterTrainer_L"
    assert close_trainer_names("nnUNetTrainer_250epochs", TRAINERS) == []
    assert close_trainer_names("nnUNetTrainerDiceCELoss_noSmooth", TRAINERS) == []


def test_the_real_nnunetv2_train_fails_fast_with_our_message(tmp_path):
    from nnunet_tpp.nnunet_commands import NNUNetFolders, console_script
    folders = NNUNetFolders(tmp_path / "work")
    folders.make()
    (folders.raw / "keep.txt").write_text("x")
    before = _hashes(tmp_path)
    proc = subprocess.run([console_script("nnUNetv2_train"), "1", "3d_fullres", "0", "-tr", "ConvAdaptorTrainer_S"],
                          env=folders.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer ConvAdaptorTrainer_S" in out
    assert "Did you mean ConvAdapterTrainer_S?" in out
    assert "torchvision" not in out and "timm" not in out
    assert _hashes(tmp_path) == before
