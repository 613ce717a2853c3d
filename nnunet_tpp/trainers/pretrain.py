"""``nnunet-tpp pretrain``: the TPP pretext stage alone, on the dataset to be fine-tuned or on another one
(the paper's cross-dataset setting), writing a target-parameter file that any PEFT trainer of the same
method, options and STU-Net size can start from (``NNUNET_TPP_TARGET_PARAMETERS=FILE``)."""
from __future__ import annotations

import os

import torch

from nnunet_tpp.trainers.tpp import STUNetTPPTrainer


def pretrain(dataset: str, trainer_name: str, pretrained_weights: str, output: str, fold: str = "all",
             configuration: str = "3d_fullres", plans: str = "nnUNetPlans", device: str = "cpu") -> str:
    """Runs the pretext stage of ``trainer_name`` (a ``TPP...Trainer``) on a preprocessed nnU-Net dataset.

    Args:
        dataset: nnU-Net dataset id or name (planned and preprocessed).
        trainer_name: e.g. ``TPPConvAdapterTrainer_B``: decides method, options (recipe) and size.
        pretrained_weights: the published STU-Net checkpoint (the frozen backbone).
        output: the target-parameter file to write (never overwritten).
        fold: which fold's training cases to use (``all`` for every case).
    Returns:
        ``output``.
    """
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; choose another output file")
    cls = recursive_find_trainer_class_by_name(trainer_name)
    if not issubclass(cls, STUNetTPPTrainer):
        raise ValueError(f"{trainer_name} has no pretext stage; use its TPP variant (e.g. TPPConvAdapterTrainer_S)")
    trainer = get_trainer_from_args(str(dataset), configuration, fold if fold == "all" else int(fold), trainer_name,
                                    plans, device=torch.device(device))
    trainer.initialize()
    trainer.load_pretrained_backbone(pretrained_weights)
    trainer.run_pretext_stage(output)
    return output
