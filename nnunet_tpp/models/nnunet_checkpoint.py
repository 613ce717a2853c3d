"""Loading nnU-Net v2 checkpoints (``checkpoint_final.pth`` / ``checkpoint_best.pth`` of any nnU-Net training) and
nnssl pre-training checkpoints into the network of the plans, safely.

Files are read with ``torch.load(weights_only=True)`` and the numpy allow-list (:func:`read_checkpoint`); nothing
else is unpickled. Before anything is copied, the checkpoint's tensors are compared with the network's: any
missing, unexpected or mis-shaped tensor stops the load with one error that lists them and names the fix (train
with the source model's plans). The segmentation layers are skipped (a new label set gets new ones); for another
input channel count the first convolution's weights are repeated over the channels, as for STU-Net.

nnssl checkpoints (``nnssl_adaptation_plan`` in the file) hold a pre-trained encoder: as nnssl's adaptation plan
says (``key_to_encoder``, ``key_to_stem``), only those tensors are loaded; the decoder is new and trains with the
heads.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_tpp.models.stunet_checkpoint import (CheckpointError, LoadReport, describe_stunet, extract_state_dict,
                                                 read_checkpoint)

SEG_LAYERS = ".seg_layers."
ADOPT_HINT = ("train with the source model's plans: `nnunet-tpp adopt-plans MODEL_FOLDER_OR_CHECKPOINT -d DATASET` "
              "writes them for your dataset and preprocesses it (nnU-Net's own route: nnUNetv2_extract_fingerprint, "
              "nnUNetv2_move_plans_between_datasets, nnUNetv2_preprocess; see its pretraining_and_finetuning.md), then "
              "pass -p with that plans name")


def _unique_keys(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict with each tensor once (nnU-Net's blocks list every layer under two names, and its
    decoder holds the encoder again); the first name of a tensor wins, as in ``named_parameters``."""
    seen, keys = set(), {}
    for key, value in net.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            keys[key] = value
    return keys


def _aliases(net: nn.Module) -> dict[str, list[str]]:
    """``{first name: every state-dict name of the same tensor}``."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for key, value in net.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(value), key)
        names.setdefault(owner, []).append(key)
    return names


def _network_class(checkpoint: dict) -> str | None:
    """The architecture class an nnU-Net checkpoint's plans name (``init_args``), if it says."""
    try:
        args = checkpoint["init_args"]
        config = args["plans"]["configurations"][args["configuration"]]
        return str(config["architecture"]["network_class_name"]).split(".")[-1]
    except (KeyError, TypeError):
        return None


def _encoder_only(checkpoint: dict, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """For an nnssl checkpoint: the encoder and stem tensors under the names of nnU-Net's ResidualEncoderUNet, and
    the names of everything else (skipped)."""
    plan = checkpoint["nnssl_adaptation_plan"]
    mapping = {str(plan.get("key_to_encoder", "encoder.stages")): "encoder.stages",
               str(plan.get("key_to_stem", "encoder.stem")): "encoder.stem"}
    kept, skipped = {}, []
    for key, value in state.items():
        for source, target in mapping.items():
            if key == source or key.startswith(source + "."):
                kept[target + key[len(source):]] = value
                break
        else:
            skipped.append(key)
    return kept, skipped


def load_nnunet_checkpoint(model: nn.Module, path: str | os.PathLike, new_keys: set[str] | None = None,
                           check_only: bool = False) -> LoadReport:
    """Loads an nnU-Net v2 or nnssl checkpoint into ``model`` (nnU-Net's network of the plans, PEFT layers allowed).

    Args:
        model: the network to fill.
        path: the checkpoint file.
        new_keys: names of parameters a PEFT method added (they keep their initialisation).
        check_only: compare names and shapes only (the file memory-mapped, nothing copied; the model may live on
            the meta device).
    Returns:
        A :class:`LoadReport`; ``report.new_modules`` names modules the checkpoint does not hold that must train
        (an nnssl checkpoint's missing decoder).
    Raises:
        CheckpointError: not an nnU-Net checkpoint (an STU-Net one is named as such), another architecture, or any
            missing, unexpected or mis-shaped tensor (all listed). The model is unchanged then.
    """
    from nnunet_tpp import file_kinds
    path = os.fspath(path)
    checkpoint = read_checkpoint(path, mmap=check_only, expected=file_kinds.NNUNET_CHECKPOINT)
    state, fmt = extract_state_dict(checkpoint)
    stunet = describe_stunet(state)
    if stunet.startswith("STU-Net"):
        raise CheckpointError(f"{path!r} is an {stunet} checkpoint; the _nnUNet trainers adapt nnU-Net's own "
                              f"networks. Use the STU-Net trainer of the same family with the size suffix (e.g. "
                              f"ConvAdapterTrainer_{stunet[-1]}) for it.")
    ours = type(model).__name__
    theirs = _network_class(checkpoint)
    if theirs is not None and theirs != ours:
        raise CheckpointError(f"{path!r} holds a {theirs} (its plans), but these plans build a {ours}; {ADOPT_HINT}")
    skipped: list[str] = []
    nnssl = "nnssl_adaptation_plan" in checkpoint
    if nnssl:
        fmt = "nnssl pre-training checkpoint (encoder only)"
        state, skipped = _encoder_only(checkpoint, state)
    new_keys = set(new_keys or ())
    aliases = _aliases(model)
    target = _unique_keys(model)
    in_proj = _first_conv_weight(model)
    report = LoadReport(path, fmt, theirs or ours)
    to_load, missing, misshaped = {}, [], []
    for key, tensor in target.items():
        names = aliases[key]
        if SEG_LAYERS in f".{key}" or key in new_keys:
            report.initialised.append(key)
            continue
        if nnssl and not key.startswith("encoder."):
            report.initialised.append(key)
            continue
        found = next((n for n in names if n in state), None)
        if found is None:
            missing.append(key)
            continue
        value = state[found]
        if (value.shape != tensor.shape and key == in_proj and value.dim() == tensor.dim() and value.shape[1] == 1
                and value.shape[0] == tensor.shape[0] and value.shape[2:] == tensor.shape[2:]):
            value = value.repeat(1, tensor.shape[1], *([1] * (value.dim() - 2)))
            report.repeated_input_channels.append(key)
        if value.shape != tensor.shape:
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(tensor.shape)}")
            continue
        to_load[key] = value
    known = {n for names in aliases.values() for n in names}
    unexpected = sorted(k for k in state if k not in known and SEG_LAYERS not in f".{k}")
    if missing or unexpected or misshaped:
        parts = [f"{len(items)} {label}: " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if items]
        raise CheckpointError(f"{path!r} does not fit the {ours} of these plans (" + " | ".join(parts)
                              + f"). Its network was built from other plans (other strides, widths, stages or "
                                f"channels); {ADOPT_HINT}.")
    report.loaded = sorted(to_load)
    loaded_names = {n for key in to_load for n in aliases[key]}
    report.skipped = sorted(skipped + [k for k in state if k not in loaded_names])
    if nnssl:
        report.new_modules = ["decoder"]
    if not check_only:
        with torch.no_grad():
            for key, value in to_load.items():
                target[key].copy_(value.to(dtype=target[key].dtype))
    return report


def _first_conv_weight(model: nn.Module) -> str | None:
    """The name of the first convolution's weight (the one that sees the image channels)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return f"{name}.weight"
    return None
