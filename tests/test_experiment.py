"""The LiTS / KiTS Table 10 recipes: valid, naming existing trainers, producing the protocol's commands."""
import pytest

from nnunet_tpp.cli import main
from nnunet_tpp.experiment import Experiment, commands
from nnunet_tpp.trainers.zoo import TRAINERS
from tests.conftest import REPO


@pytest.mark.parametrize("name,kind", [("lits_table10.yaml", "lits"), ("kits_table10.yaml", "kits")])
def test_table10_recipes(name, kind, capsys):
    path = REPO / "configs" / "3d" / name
    exp = Experiment.from_yaml(path)
    assert exp.dataset["kind"] == kind and all(t in TRAINERS for t in exp.trainers)
    assert {"ConvAdapterTrainer_B", "TPPConvAdapterTrainer_B"} <= set(exp.trainers)
    cmds = commands(exp, "/data/src", "STUNet_B.model")
    assert cmds[0][:3] == ["nnunet-tpp", "convert", kind]
    assert len([c for c in cmds if c[0] == "nnUNetv2_train"]) == len(exp.trainers) * len(exp.folds)
    assert main(["experiment", str(path), "--source", "/data/src", "--pretrained", "STUNet_B.model"]) == 0
    out = capsys.readouterr().out
    assert "-tr TPPConvAdapterTrainer_B" in out and "-pretrained_weights STUNet_B.model" in out
    assert "nnunet-tpp evaluate" in out
