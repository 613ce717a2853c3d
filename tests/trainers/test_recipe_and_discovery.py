"""Trainer names, recipes and how nnU-Net finds and builds our networks."""
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.trainers.recipe import RecipeError, resolve_recipe


def test_every_trainer_name_exists_for_every_backbone():
    from nnunet_tpp.trainers.zoo import TRAINERS
    for family in ("STUNetTrainer", "FullFinetuneTrainer", "LinearProbeTrainer", "BitFitTrainer", "LoRATrainer",
                   "ConvAdapterTrainer", "TPPConvAdapterTrainer", "TPPLoRATrainer"):
        assert TRAINERS[family].backbone.key == "B"
        for size in "SBLH":
            assert TRAINERS[f"{family}_{size}"].backbone.key == size
        if family != "STUNetTrainer":  # training nnU-Net's network from scratch is nnUNetTrainer's job
            assert not TRAINERS[f"{family}_nnUNet"].backbone.is_stunet
    assert "STUNetTrainer_nnUNet" not in TRAINERS and "TPPBitFitTrainer" not in TRAINERS


def test_nnunet_finds_our_trainers_through_its_own_search():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    cls = recursive_find_trainer_class_by_name("ConvAdapterTrainer_S")
    assert issubclass(cls, nnUNetTrainer) and cls.__name__ == "ConvAdapterTrainer_S"
    assert recursive_find_trainer_class_by_name("nnUNetTrainer") is nnUNetTrainer


def test_nnunet_ext_trainer_folder_is_registered():
    import os
    from nnunet_tpp._startup import trainer_dir
    assert trainer_dir() in os.environ["nnUNet_extTrainer"].split(os.pathsep)
    assert os.path.isfile(os.path.join(trainer_dir(), "nnunet_tpp_trainers.py"))


def test_recipe_defaults_env_and_user_file(tmp_path, monkeypatch):
    recipe = resolve_recipe("ConvAdapterTrainer", "S")
    assert (recipe.method, recipe.size, recipe.epochs) == ("conv_adapter", "S", None)
    assert recipe.network_spec()["options"]["reduction"] == 8
    monkeypatch.setenv("NNUNET_TPP_EPOCHS", "3")
    monkeypatch.setenv("NNUNET_TPP_ITERS_PER_EPOCH", "7")
    user = tmp_path / "r.yaml"
    user.write_text("options: {reduction: 4}\ninitial_lr: 0.005\n")
    monkeypatch.setenv("NNUNET_TPP_RECIPE", str(user))
    recipe = resolve_recipe("ConvAdapterTrainer", "S")
    assert (recipe.epochs, recipe.iterations_per_epoch, recipe.initial_lr) == (3, 7, 0.005)
    assert recipe.network_spec()["options"]["reduction"] == 4


@pytest.mark.parametrize("text,message", [
    ("options: {gamma: 4}\n", "unknown option"),
    ("learning_rate: 0.1\n", "unknown recipe field"),
    ("method: lora\n", "use LoRATrainer"),
    ("method: ssf\n", "no nnU-Net trainer runs 'ssf'"),
    ("tpp: dino\n", "use TPPConvAdapterTrainer instead"),
    ("size: L\n", "suffix _L"),
    ("activation_checkpointing: sometimes\n", "activation_checkpointing must be one of off, on, auto"),
    ("pretext_cases: la_001\n", "pretext_cases must be a non-empty list of case names"),
    ("pretext_cases: []\n", "pretext_cases must be a non-empty list of case names"),
])
def test_bad_recipes_fail_before_training(tmp_path, monkeypatch, text, message):
    user = tmp_path / "r.yaml"
    user.write_text(text)
    monkeypatch.setenv("NNUNET_TPP_RECIPE", str(user))
    with pytest.raises((RecipeError, peft.PeftError), match=message):
        resolve_recipe("ConvAdapterTrainer", "S")


def test_bad_schedule_variable(monkeypatch):
    monkeypatch.setenv("NNUNET_TPP_EPOCHS", "ten")
    with pytest.raises(RecipeError, match="NNUNET_TPP_EPOCHS='ten' is not an integer"):
        resolve_recipe("LoRATrainer", "B")


def test_build_network_architecture_reads_the_spec_from_the_plans():
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnunet_tpp.trainers.zoo import TRAINERS
    pools = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    config = ConfigurationManager({"architecture": {"arch_kwargs": {"strides": pools}},
                                   "nnunet_tpp": {"size": "S", "method": "lora",
                                                  "options": {"rank": 2, "alpha": 4.0, "targets": ["conv1"]},
                                                  "memory": {"lean_backward": True, "activation_checkpointing": "on"}}})
    net = TRAINERS["ConvAdapterTrainer_S"].build_network_architecture(None, config, 1, 3, False)
    assert net.peft_config.method == "lora" and net.peft_config.options["rank"] == 2
    assert net.memory_paths.activation_checkpointing == "on" and net.memory_paths.lean_norm_act
    assert net.pool_op_kernel_sizes[-2:] == [[1, 1, 1], [1, 1, 1]]
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_shipped_recipes_are_valid(monkeypatch):
    from nnunet_tpp.demo.pipeline import DemoConfig
    from nnunet_tpp.trainers.recipe import family_defaults
    from tests.conftest import REPO
    folder = REPO / "configs" / "3d"
    assert DemoConfig.from_yaml(folder / "demo.yaml") == DemoConfig()
    families = ["ConvAdapterTrainer", "LoRATrainer", "BitFitTrainer", "LinearProbeTrainer", "FullFinetuneTrainer"]
    import yaml
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "demo.yaml" or "experiment" in yaml.safe_load(path.read_text()):
            continue  # the demo's and the experiments' recipes are tested with them
        monkeypatch.setenv("NNUNET_TPP_RECIPE", str(path))
        fits = []
        for family in families:
            try:
                resolve_recipe(family, "B")
                fits.append(family)
            except (RecipeError, peft.PeftError):
                pass
        assert fits, f"{path.name} fits no trainer"
        assert family_defaults(fits[0])["method"]
