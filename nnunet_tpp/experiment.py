"""``nnunet-tpp experiment RECIPE``: a 3-D comparison (e.g. the TPP paper's Table 10) as data: convert the
dataset, plan and preprocess, train every trainer on every fold, predict each fold's validation cases and
evaluate them (Dice, HD95, challenge regions). Prints the commands, or runs them with ``--run``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Experiment:
    """A recipe from ``configs/3d/``."""

    name: str
    dataset: dict
    trainers: list[str]
    folds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    device: str = "cuda"

    @classmethod
    def from_yaml(cls, path: Path) -> "Experiment":
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("experiment")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an 'experiment:' mapping")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None


def commands(exp: Experiment, source: str, pretrained: str) -> list[list[str]]:
    """The command sequence of an experiment (each a list of arguments)."""
    did = str(exp.dataset["id"])
    steps = [["nnunet-tpp", "convert", exp.dataset["kind"], source, "-d", did],
             ["nnUNetv2_plan_and_preprocess", "-d", did, "-c", exp.configuration, "--verify_dataset_integrity"]]
    for trainer in exp.trainers:
        for fold in exp.folds:
            steps.append(["nnUNetv2_train", did, exp.configuration, str(fold), "-tr", trainer, "-p", exp.plans,
                          "-pretrained_weights", pretrained, "-device", exp.device])
    return steps


def evaluation_note(exp: Experiment) -> str:
    """How the validation predictions that nnU-Net writes per fold are evaluated."""
    return (f"then, per trainer and fold: nnunet-tpp evaluate $nnUNet_preprocessed/<dataset>/gt_segmentations "
            f"$nnUNet_results/<dataset>/<trainer>__{exp.plans}__{exp.configuration}/fold_<f>/validation "
            f"-d {exp.dataset['id']} --fold <f> --json metrics.json")


def run_experiment(exp: Experiment, source: str, pretrained: str, echo=print) -> dict:
    """Runs :func:`commands` with nnU-Net's folders from the environment, then evaluates every trainer's
    validation predictions over all folds.

    Returns:
        ``{trainer: Evaluation.to_json() of all folds' validation cases}`` (also written to
        ``$nnUNet_results/<dataset>/experiment_<name>.json``).
    """
    import json
    import os

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_tpp.evaluation import Evaluation, evaluate_folder
    from nnunet_tpp.nnunet_commands import run_nnunet

    log = Path(os.environ.get("nnUNet_results", ".")) / f"experiment_{exp.name}.log"
    for cmd in commands(exp, source, pretrained):
        run_nnunet(cmd, dict(os.environ), log, echo)
    dataset = maybe_convert_to_dataset_name(int(exp.dataset["id"]))
    labels = json.loads((Path(nnUNet_preprocessed) / dataset / "dataset.json").read_text())["labels"]
    gt = Path(nnUNet_preprocessed) / dataset / "gt_segmentations"
    splits = json.loads((Path(nnUNet_preprocessed) / dataset / "splits_final.json").read_text())

    def fold_cases(fold):  # each fold's validation folder holds only that fold's validation cases
        return None if str(fold) == "all" else splits[int(fold)]["val"]

    results = {}
    for trainer in exp.trainers:
        base = Path(nnUNet_results) / dataset / f"{trainer}__{exp.plans}__{exp.configuration}"
        per_fold = [evaluate_folder(gt, base / f"fold_{f}" / "validation", labels, cases=fold_cases(f))
                    for f in exp.folds]
        merged = Evaluation.from_cases([case for fold in per_fold for case in fold.per_case])
        echo(f"\n{trainer} ({len(merged.per_case)} validation cases over folds {exp.folds})\n{merged.markdown()}")
        results[trainer] = merged.to_json()
    (Path(nnUNet_results) / dataset / f"experiment_{exp.name}.json").write_text(json.dumps(results, indent=2))
    return results
