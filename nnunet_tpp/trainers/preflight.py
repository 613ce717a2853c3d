"""Checks of an ``nnUNetv2_train`` call with one of our trainers, run before nnU-Net constructs the trainer (which
creates the results folder): a refused command writes nothing. Called by the start-up hook that wraps
``nnunetv2.run.run_training.run_training`` (:mod:`nnunet_tpp._startup`)."""
from __future__ import annotations

import json
import os


class PreflightError(ValueError):
    """An ``nnUNetv2_train`` call of ours that cannot work; nothing was written."""


def preflight(dataset_name_or_id, configuration: str, trainer_class_name: str, plans_identifier: str = "nnUNetPlans",
              pretrained_weights: str | None = None, continue_training: bool = False, **_) -> None:
    """Validates a training call of one of our trainers (other trainers pass untouched).

    Raises:
        PreflightError or the trainer's own check errors (all ``ValueError``), naming the problem and the fix.
    """
    from nnunet_tpp.trainers.zoo import TRAINERS
    cls = TRAINERS.get(trainer_class_name)
    if cls is None:
        return
    if continue_training and pretrained_weights:
        raise PreflightError("--c continues a run from its own checkpoint, which holds the backbone: leave "
                             "-pretrained_weights out (a TPP run's pretext stage reloads the backbone recorded in "
                             "the fold folder's backbone.json)")
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        return  # nnU-Net itself says what is missing
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError:
        return
    plans_file = os.path.join(preprocessed, name, f"{plans_identifier}.json")
    dataset_file = os.path.join(preprocessed, name, "dataset.json")
    if not (os.path.isfile(plans_file) and os.path.isfile(dataset_file)):
        return
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_file) as f:
        dataset_json = json.load(f)
    if configuration not in plans.get("configurations", {}):
        return
    cls.check_before_training(plans, configuration, dataset_json, pretrained_weights)
