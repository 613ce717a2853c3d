"""Rebuilding an nnU-Net ``checkpoint_final.pth`` from ``peft_weights.pth`` and the published backbone, so a
model can be shared as a few MB of adapter weights and still be used by ``nnUNetv2_predict``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_tpp import file_kinds, peft
from nnunet_tpp.trainers.base import PEFT_WEIGHTS_FILE


def restore_checkpoint(model_folder: Path, fold: str, backbone: Path,
                       checkpoint_name: str = "checkpoint_final.pth", force: bool = False) -> Path:
    """Writes ``model_folder/fold_F/checkpoint_name`` from the adapter file and the backbone checkpoint.

    Args:
        model_folder: ``.../Trainer__Plans__configuration`` holding ``plans.json`` and ``dataset.json``.
        fold: the fold (``0`` ... or ``all``).
        backbone: the pre-trained checkpoint the model was fine-tuned from (STU-Net, nnU-Net or nnssl).
        checkpoint_name: output name; an existing file is never overwritten.
        force: accept a backbone whose fingerprint differs from the one the adapter file records.
    Returns:
        The written checkpoint path. Everything is checked before the file is written.
    """
    from nnunet_tpp.trainers.zoo import TRAINERS

    model_folder = Path(model_folder)
    fold_dir = model_folder / f"fold_{fold}"
    adapter_file = fold_dir / PEFT_WEIGHTS_FILE
    for needed in (model_folder / "plans.json", model_folder / "dataset.json", adapter_file):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing; pass an nnU-Net model folder trained by nnunet_tpp")
    out = fold_dir / checkpoint_name
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first if you want it rebuilt")
    try:
        meta = file_kinds.load_expected(adapter_file, file_kinds.ADAPTER, role="peft_weights.pth")
    except file_kinds.FileKindError as e:
        raise ValueError(str(e)) from None
    trainer = TRAINERS.get(meta.get("trainer_name"))
    if trainer is None:
        raise ValueError(f"{adapter_file} names trainer {meta.get('trainer_name')!r}, which nnunet_tpp does not have")
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    configuration = plans_manager.get_configuration(meta["configuration"])
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    network = trainer.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)
    if meta.get("new_modules"):
        network.head_prefixes = (*network.head_prefixes, *meta["new_modules"])
        peft.freeze(network)
    if meta["method"] != "full":
        trainer.backbone.load(network, str(backbone), set(peft.target_parameters(network)))
        peft.fingerprint_backbone(network)
    try:
        peft.load(network, adapter_file, allow_other_backbone=force)
    except peft.PeftError as e:
        raise ValueError(f"{e}. --backbone must be the checkpoint the model was fine-tuned from; pass --force to "
                         f"build it on {backbone} anyway") from None
    checkpoint = {"network_weights": network.state_dict(), "trainer_name": meta["trainer_name"],
                  "init_args": {"configuration": meta["configuration"], "fold": fold},
                  "inference_allowed_mirroring_axes": meta.get("inference_allowed_mirroring_axes"),
                  "restored_from": [str(adapter_file), str(backbone)]}
    peft.atomic_torch_save(checkpoint, out)
    return out
