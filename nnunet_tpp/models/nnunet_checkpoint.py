"""Loading nnU-Net v2 checkpoints (``checkpoint_final.pth`` / ``checkpoint_best.pth`` of any nnU-Net training) and
nnssl pre-training checkpoints into the network of the plans (a U-Net or a Primus), safely.

Files are read with ``torch.load(weights_only=True)`` and the numpy allow-list (:func:`read_checkpoint`); nothing
else is unpickled. Before anything is copied, the checkpoint's tensors are compared with the network's: any
missing, unexpected or mis-shaped tensor stops the load with one error that lists them and names the fix (train
with the source model's plans). The layers whose shape follows the label set are skipped (nnU-Net's
``seg_layers``, Primus's last decoder layer). A stem pre-trained on one channel is repeated over the data's channels
and divided by their number (nnU-Net master's rule: the first layer's output keeps its scale).

nnssl checkpoints (``nnssl_adaptation_plan`` in the file, :mod:`nnunet_tpp.models.nnssl_checkpoint`) hold a
pre-trained encoder: as nnU-Net master's pretrained route does, only the tensors under the plan's
``key_to_encoder`` and ``key_to_stem`` are loaded (into the network's own encoder and stem); the decoder is new and
trains with the heads; a learned position embedding (``key_to_lpe``, Primus) pre-trained at another patch is
resized to the network's token grid by trilinear interpolation.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_tpp.models.nnssl_checkpoint import (AdaptationPlanError, is_nnssl_checkpoint, map_encoder_keys,
                                               read_adaptation_plan, repeat_stem_weight, resize_position_embedding,
                                               under)
from nnunet_tpp.models.primus import PrimusError, spec_from_architecture, token_grid
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
    """``{first name: every state-dict name of the same tensor}``; a layer that Hugging Face ``peft``'s LoRA wraps
    (a transformer's ``q_proj`` ...) keeps its tensors under ``<layer>.base_layer.``, which also answers to the plain
    network's ``<layer>.``."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for key, value in net.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(value), key)
        names.setdefault(owner, []).append(key)
        if ".base_layer." in key:
            names[owner].append(key.replace(".base_layer.", "."))
    return names


def _network_class(checkpoint: dict) -> str | None:
    """The architecture class an nnU-Net checkpoint's plans name (``init_args``), if it says."""
    try:
        args = checkpoint["init_args"]
        config = args["plans"]["configurations"][args["configuration"]]
        return str(config["architecture"]["network_class_name"]).split(".")[-1]
    except (KeyError, TypeError):
        return None


class AdaptedLoadReport(LoadReport):
    """A :class:`LoadReport` that also says how tensors were adapted: the stem repeated over the input channels and
    divided by their number, the position embedding resized to the new patch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels = 1
        self.resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def lines(self) -> list[str]:
        out = [line for line in super().lines() if "repeated over the input channels" not in line]
        if self.repeated_input_channels:
            out.append(f"  stem weights repeated over the {self.channels} input channels and divided by "
                       f"{self.channels}: {self.repeated_input_channels}")
        for key, (old, new) in self.resized.items():
            out.append(f"  {key} resized from a {'x'.join(map(str, old))} to a {'x'.join(map(str, new))} token grid "
                       f"(trilinear)")
        return out


def _theirs(checkpoint: dict) -> str | None:
    """The architecture a checkpoint holds: the plans' class, or Primus when nnU-Net's / our Primus trainer wrote it
    (those ignore the plans' architecture)."""
    if "Primus" in str(checkpoint.get("trainer_name", "")):
        return "Primus"
    return _network_class(checkpoint)


def _family(name: str) -> str:
    return "Primus" if name.startswith("Primus") else name


def _nnssl_architecture_check(plan, model: nn.Module, path: str) -> None:
    """Refuses an nnssl checkpoint of another architecture than the plans' network, naming both."""
    theirs = plan.architecture
    ours = type(model).__name__
    family = {"ResEncL": "ResidualEncoderUNet", "NoSkipResEncL": "ResidualEncoderUNet"}.get(theirs, _family(theirs))
    if family != _family(ours):
        raise CheckpointError(f"{path!r} is an nnssl checkpoint of a {theirs} encoder (its adaptation plan), but these "
                              f"plans build a {ours}; {ADOPT_HINT}")
    spec = getattr(model, "primus_spec", None)
    if spec is not None:
        try:
            planned = spec_from_architecture({"network_class_name": theirs, "arch_kwargs": plan.arch_kwargs})
        except PrimusError as e:
            raise CheckpointError(f"{path!r}: {e}") from None
        if planned is not None and not planned.same_architecture(spec):
            raise CheckpointError(f"{path!r} holds a {planned.describe()} encoder, but these plans build "
                                  f"{spec.describe()}; {ADOPT_HINT}")


def _stem_adaptable(key: str, value: torch.Tensor, tensor: torch.Tensor, stem: str | None) -> bool:
    """A conv weight of the stem pre-trained on 1 channel where the network has more."""
    return (stem is not None and (key == stem or key.startswith(stem + ".")) and value.dim() == tensor.dim() >= 3
            and value.shape[1] == 1 and tensor.shape[1] > 1 and value.shape[0] == tensor.shape[0]
            and value.shape[2:] == tensor.shape[2:])


def _label_layer(key: str, prefixes: tuple[str, ...]) -> bool:
    """A layer whose shape follows the label set (nnU-Net's ``seg_layers``, Primus's last decoder layer)."""
    return SEG_LAYERS in f".{key}" or any(under(key, p) for p in prefixes)


def load_nnunet_checkpoint(model: nn.Module, path: str | os.PathLike, new_keys: set[str] | None = None,
                           check_only: bool = False) -> LoadReport:
    """Loads an nnU-Net v2 or nnssl checkpoint into ``model`` (nnU-Net's network of the plans or a Primus, PEFT
    layers allowed).

    Args:
        model: the network to fill.
        path: the checkpoint file.
        new_keys: names of parameters a PEFT method added (they keep their initialisation).
        check_only: compare names and shapes only (the file memory-mapped, nothing copied; the model may live on
            the meta device).
    Returns:
        An :class:`AdaptedLoadReport`; ``report.new_modules`` names modules the checkpoint does not hold that must
        train (an nnssl checkpoint's missing decoder: ``decoder`` of a U-Net, ``up_projection`` of a Primus).
    Raises:
        CheckpointError: not an nnU-Net checkpoint (an STU-Net one is named as such), another architecture, an nnssl
            checkpoint without a complete adaptation plan, or any missing, unexpected or mis-shaped tensor (all
            listed). The model is unchanged then.
    """
    from nnunet_tpp.models import file_kinds
    path = os.fspath(path)
    checkpoint = read_checkpoint(path, mmap=check_only, expected=file_kinds.NNUNET_CHECKPOINT)
    state, fmt = extract_state_dict(checkpoint)
    stunet = describe_stunet(state)
    if stunet.startswith("STU-Net"):
        raise CheckpointError(f"{path!r} is an {stunet} checkpoint; the _nnUNet trainers adapt nnU-Net's own networks "
                              f"(and the _Primus trainers Primus). Use the STU-Net trainer of the same family with the "
                              f"size suffix (e.g. ConvAdapterTrainer_{stunet[-1]}) for it.")
    ours = type(model).__name__
    stem = getattr(model, "key_to_stem", None) or (_first_conv_weight(model) or "").rsplit(".", 1)[0] or None
    skipped: list[str] = []
    plan = None
    if is_nnssl_checkpoint(checkpoint):
        try:
            plan = read_adaptation_plan(checkpoint, repr(path))
        except AdaptationPlanError as e:
            raise CheckpointError(str(e)) from None
        _nnssl_architecture_check(plan, model, path)
        encoder = getattr(model, "key_to_encoder", "encoder.stages")
        stem = stem or "encoder.stem"
        state, skipped = map_encoder_keys(state, plan, encoder, stem)
        fmt = f"nnssl pre-training checkpoint of a {plan.architecture} ({plan.trainer_name or 'nnssl'}): encoder + stem"
        theirs = plan.architecture
    else:
        theirs = _theirs(checkpoint)
        if theirs is not None and _family(theirs) != _family(ours):
            raise CheckpointError(f"{path!r} holds a {theirs} (its plans), but these plans build a {ours}; "
                                  f"{ADOPT_HINT}")
    new_keys = set(new_keys or ())
    aliases = _aliases(model)
    target = _unique_keys(model)
    label_layers = tuple(getattr(model, "label_layer_prefixes", ()))
    lpe = getattr(model, "key_to_lpe", None)
    report = AdaptedLoadReport(path, fmt, theirs or ours)
    to_load, missing, misshaped = {}, [], []
    for key, tensor in target.items():
        names = aliases[key]
        if key in new_keys or (plan is None and _label_layer(key, label_layers)):
            report.initialised.append(key)
            continue
        if plan is not None and not any(under(n, p) for n in names for p in (encoder, stem)):
            report.initialised.append(key)
            continue
        found = next((n for n in names if n in state), None)
        if found is None:
            missing.append(key)
            continue
        value = state[found]
        shape = value.shape
        if shape != tensor.shape and _stem_adaptable(key, value, tensor, stem):
            shape = tensor.shape
            if not check_only:
                value = repeat_stem_weight(value, tensor.shape[1])
            report.repeated_input_channels.append(key)
            report.channels = tensor.shape[1]
        elif shape != tensor.shape and plan is not None and lpe in names and value.dim() == 3:
            old = token_grid(plan.pretrain_patch, model.patch_embed_size)
            new = token_grid(model.patch_size, model.patch_embed_size)
            if old[0] * old[1] * old[2] != value.shape[1]:
                misshaped.append(f"{key}: {value.shape[1]} tokens, but the adaptation plan's pre-training patch "
                                 f"{list(plan.pretrain_patch)} makes a {'x'.join(map(str, old))} grid")
                continue
            shape = torch.Size((1, new[0] * new[1] * new[2], value.shape[2]))
            if not check_only:
                value = resize_position_embedding(value, old, new)
            report.resized[key] = (old, new)
        if shape != tensor.shape:
            misshaped.append(f"{key}: checkpoint {tuple(shape)} vs network {tuple(tensor.shape)}")
            continue
        to_load[key] = value
    known = {n for names in aliases.values() for n in names}
    unexpected = sorted(k for k in state if k not in known and not _label_layer(k, label_layers))
    if missing or unexpected or misshaped:
        parts = [f"{len(items)} {label}: " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if items]
        raise CheckpointError(f"{path!r} does not fit the {ours} of these plans (" + " | ".join(parts)
                              + f"). Its network was built from other plans (other strides, widths, stages, "
                                f"channels or patch); {ADOPT_HINT}.")
    report.loaded = sorted(to_load)
    loaded_names = {n for key in to_load for n in aliases[key]}
    report.skipped = sorted(skipped + [k for k in state if k not in loaded_names])
    if plan is not None:
        report.new_modules = sorted({name.split(".")[0] for name, _ in model.named_parameters()
                                     if name not in loaded_names and name not in new_keys})
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
