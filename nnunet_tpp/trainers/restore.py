"""Rebuilding an nnU-Net ``checkpoint_final.pth`` from ``peft_weights.pth`` and the published backbone, so a
model can be shared as a few MB of adapter weights and still be used by ``nnUNetv2_predict``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_tpp import peft
from nnunet_tpp.models import file_kinds
from nnunet_tpp.trainers.base import PEFT_WEIGHTS_FILE
from nnunet_tpp.trainers.seeding import INIT_PHASE, seed_generators
from nnunet_tpp.trainers.zoo import TRAINERS


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


def write_initial_checkpoint(model_folder: Path, fold: str, seed: int, pretrained: Path | None,
                             checkpoint_name: str = "checkpoint_untrained.pth") -> Path:
    """Writes the network a seeded run started from as an nnU-Net checkpoint beside its ``checkpoint_final.pth``,
    so ``nnUNetv2_predict -chk checkpoint_name`` shows what the untrained network predicts: the run's backbone
    (``pretrained``) with the PEFT parameters and heads it was initialised with
    (:func:`initial_network`).

    Args:
        model_folder: ``.../Trainer__Plans__configuration`` of a finished run made with ``NNUNET_TPP_SEED=seed``.
        fold: the run's fold (``0`` ... or ``all``).
        seed: the run's seed.
        pretrained: the run's ``-pretrained_weights`` file (None: a run from scratch).
        checkpoint_name: output name in the fold folder; an existing file is never overwritten.
    Returns:
        The written checkpoint. Raises ``ValueError`` when the rebuilt network's frozen weights differ from the
        run's (then it is not the run's starting point: another seed or backbone).
    """
    from nnunet_tpp.models.stunet_checkpoint import read_checkpoint

    fold_dir = Path(model_folder) / f"fold_{fold}"
    out = fold_dir / checkpoint_name
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first if you want it rebuilt")
    final = read_checkpoint(str(fold_dir / "checkpoint_final.pth"), expected=file_kinds.NNUNET_CHECKPOINT)
    network = initial_network(model_folder, final["trainer_name"], seed, final["init_args"]["configuration"])
    if pretrained is not None:
        TRAINERS[final["trainer_name"]].backbone.load(network, str(pretrained), set(peft.target_parameters(network)))
    weights = network.state_dict()
    frozen = [n for n, p in network.named_parameters() if not p.requires_grad]
    if weights.keys() != final["network_weights"].keys() or not all(
            torch.equal(weights[n], final["network_weights"][n]) for n in frozen):
        raise ValueError(f"the network rebuilt from seed {seed} and {pretrained} is not the one the run in {fold_dir} "
                         f"trained: its frozen weights differ (another seed or backbone?)")
    peft.atomic_torch_save({**final, "network_weights": weights}, out)
    return out


def initial_network(model_folder, trainer_name: str, seed: int, configuration: str = "3d_fullres"):
    """The network a run of ``trainer_name`` with ``NNUNET_TPP_SEED=seed`` started from, before its pre-trained
    weights were loaded: the trainer seeds the generators right before nnU-Net builds the network, which draws
    nothing else first, so building it again after the same seeding gives the same values.

    Args:
        model_folder: the run's ``Trainer__Plans__configuration`` folder (its ``plans.json`` and ``dataset.json``).
        trainer_name: one of our trainers (:data:`nnunet_tpp.trainers.zoo.TRAINERS`).
        seed: the run's ``NNUNET_TPP_SEED``.
    Returns:
        The network (on the CPU); its new parameters (PEFT, heads) hold the run's initial values, its backbone is
        random (load the run's ``-pretrained_weights`` for the rest).
    """
    manager = PlansManager(json.loads((Path(model_folder) / "plans.json").read_text()))
    dataset_json = json.loads((Path(model_folder) / "dataset.json").read_text())
    config = manager.get_configuration(configuration)
    seed_generators(seed, INIT_PHASE)
    return TRAINERS[trainer_name].build_network_architecture(
        manager, config, determine_num_input_channels(manager, config, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads, True)
