"""``nnunet-tpp pretrain``: the TPP pretext stage alone, on the dataset to be fine-tuned or on another one
(the paper's cross-dataset setting), writing a target-parameter file that any PEFT trainer of the same
method, options, STU-Net size and backbone can start from (``NNUNET_TPP_TARGET_PARAMETERS=FILE``).

Beside the output ``NAME.pth`` it writes ``NAME.tpp_diagnostics.json`` (the per-epoch diagnostics, as
``tpp_diagnostics.json`` in a TPP fold folder), ``NAME.tpp_progress.png``, ``NAME.tpp_initial_target_parameters.pth``
(with ``pretext_control: true`` also ``NAME.tpp_control_state.pth`` and ``NAME.tpp_target_check.json``) and, while
it runs, ``NAME.tpp_state.pth``: a killed run resumes when started again with the same arguments (the state records
the backbone fingerprint, method and options; another backbone is refused). Nothing is written into the trainer's
nnU-Net fold folder but nnU-Net's own log.
"""
from __future__ import annotations

import os

import torch

from nnunet_tpp.trainers.tpp import TPPTrainer


def side_files(output: str) -> dict[str, str]:
    """The files written beside ``output``: ``{"state", "plot", "diagnostics", "initial", "control_state",
    "check"}`` (the last two with ``pretext_control: true``)."""
    root = output[:-4] if output.endswith(".pth") else output
    return {"state": f"{root}.tpp_state.pth", "plot": f"{root}.tpp_progress.png",
            "diagnostics": f"{root}.tpp_diagnostics.json", "initial": f"{root}.tpp_initial_target_parameters.pth",
            "control_state": f"{root}.tpp_control_state.pth", "check": f"{root}.tpp_target_check.json"}


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
    if not issubclass(cls, TPPTrainer):
        raise ValueError(f"{trainer_name} has no pretext stage; use its TPP variant (e.g. TPPConvAdapterTrainer_S)")
    trainer = get_trainer_from_args(str(dataset), configuration, fold if fold == "all" else int(fold), trainer_name,
                                    plans, device=torch.device(device))
    trainer.initialize()
    trainer.load_pretrained_backbone(pretrained_weights, record=False)
    files = side_files(output)
    trainer.check_resumable_state(files["state"])  # settings, views and an earlier state: before the stage
    trainer.run_pretext_stage(output, files)
    trainer.print_to_log_file(f"TPP: collapse diagnostics per epoch in {files['diagnostics']}",
                              also_print_to_console=True)
    return output
