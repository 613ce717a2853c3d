"""Loading published STU-Net checkpoints (nnU-Net v1 ``.model``, nnU-Net v2 ``.pth``) safely.

Files are read with ``torch.load(weights_only=True)`` and an explicit allow-list of the numpy types that
nnU-Net v1 stores next to the weights; nothing else is ever unpickled. Every backbone tensor of the model
must be found in the checkpoint; the segmentation heads are skipped (a new task gets new heads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from nnunet_tpp.models import file_kinds
from nnunet_tpp.models.checkpoint_errors import CheckpointError
from nnunet_tpp.models.stunet import STUNet, describe_stunet

_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: str | os.PathLike, mmap: bool = False, expected: str | None = None) -> dict:
    """Reads a backbone checkpoint file without executing arbitrary pickled code.

    Args:
        path: a ``.model`` / ``.pth`` / ``.pt`` file.
        mmap: memory-map the tensors of a ZIP-format file instead of reading them (for checks of names and
            shapes; the legacy format is read whole).
        expected: the kind of file wanted, for the message (:mod:`nnunet_tpp.models.file_kinds`; default an STU-Net
            checkpoint).
    Returns:
        The unpickled dictionary (tensors on the CPU).
    Raises:
        CheckpointError: the file is missing, not a torch checkpoint, contains objects outside the allow-list,
            or is a file of another kind that nnunet_tpp writes (an adapter file, a target-parameter file, a
            pretext state), named as such with what to pass instead (see :mod:`nnunet_tpp.models.file_kinds`).
    """
    obj, kind = file_kinds.read(path, mmap=mmap)
    if obj is None or not isinstance(obj, dict) or kind.kind in file_kinds.NNUNET_TPP_KINDS:
        raise CheckpointError(file_kinds.wrong_kind_message(kind, expected or file_kinds.STUNET))
    return obj


def extract_state_dict(checkpoint: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Finds the weights in a checkpoint dictionary and strips DDP / torch.compile prefixes.

    Returns:
        ``(state_dict, format)`` where format is ``"nnU-Net v2"``, ``"nnU-Net v1"`` or ``"state dict"``.
    """
    if "network_weights" in checkpoint:
        sd, fmt = checkpoint["network_weights"], "nnU-Net v2"
    elif "state_dict" in checkpoint:
        sd, fmt = checkpoint["state_dict"], "nnU-Net v1"
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sd, fmt = checkpoint, "state dict"
    else:
        raise CheckpointError("no weights found: expected a 'network_weights' (nnU-Net v2) or 'state_dict' "
                              f"(nnU-Net v1) entry, found keys {sorted(checkpoint)[:8]}")
    clean = {}
    for key, value in sd.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean, fmt


@dataclass
class LoadReport:
    """What a checkpoint load did: tensors loaded, checkpoint tensors skipped, model tensors left as
    initialised."""

    path: str
    source_format: str
    architecture: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    repeated_input_channels: list[str] = field(default_factory=list)
    new_modules: list[str] = field(default_factory=list)  # modules the checkpoint lacks that must train

    def lines(self) -> list[str]:
        """A human-readable report, one line per item group."""
        out = [f"pre-trained weights: {self.path} ({self.source_format}, {self.architecture})",
               f"  loaded {len(self.loaded)} tensors (every {'encoder' if self.new_modules else 'backbone'} tensor)",
               f"  skipped {len(self.skipped)} checkpoint tensors: {_short(self.skipped)}",
               f"  newly initialised {len(self.initialised)} tensors: {_short(self.initialised)}"]
        if self.repeated_input_channels:
            out.append(f"  first-layer weights repeated over the input channels: {self.repeated_input_channels}")
        if self.new_modules:
            out.append(f"  not in the checkpoint, trained with the heads: {', '.join(self.new_modules)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _short(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _is_head(key: str, model: STUNet) -> bool:
    return any(key.startswith(p + ".") for p in model.head_prefixes)


def load_stunet_checkpoint(model: nn.Module, path: str | os.PathLike, new_keys: set[str] | None = None,
                           check_only: bool = False) -> LoadReport:
    """Loads a published STU-Net checkpoint into ``model`` (an :class:`STUNet`, PEFT layers allowed).

    Args:
        model: the network to fill; keys must follow the published layout.
        path: checkpoint file.
        new_keys: model keys that are expected to be missing from a published checkpoint (parameters
            added by a PEFT method); they keep their initialisation.
        check_only: compare names and shapes only (the file memory-mapped, nothing copied; the model may live on
            the meta device).
    Returns:
        A :class:`LoadReport`.
    Raises:
        CheckpointError: wrong architecture or size, missing or mis-shaped backbone tensors. The model is
            left unchanged in that case.
    """
    new_keys = new_keys or set()
    checkpoint = read_checkpoint(path, mmap=check_only)
    state, fmt = extract_state_dict(checkpoint)
    found = describe_stunet(state)
    if not found.startswith("STU-Net") and ("init_args" in checkpoint or "nnssl_adaptation_plan" in checkpoint):
        raise CheckpointError(
            f"{os.fspath(path)!r} is a checkpoint of nnU-Net's own network (trainer "
            f"{checkpoint.get('trainer_name', '?')}), not an STU-Net; to adapt it use the _nnUNet trainer of the same "
            f"family (e.g. ConvAdapterTrainer_nnUNet) with the source model's plans (`nnunet-tpp adopt-plans`)")
    expected = f"STU-Net-{model.size_name}" if getattr(model, "size_name", None) else "STU-Net"
    if not found.startswith("STU-Net-") or (model.size_name and found != expected):
        hint = ""
        if found.startswith("STU-Net-") and model.size_name:
            hint = f" Use the trainer for that size (suffix _{found[-1]}) or the checkpoint of {expected}."
        raise CheckpointError(f"{os.fspath(path)!r} is {found}, but this network is {expected}.{hint}")

    target = model.state_dict()
    report = LoadReport(os.fspath(path), fmt, found)
    to_load, problems = {}, []
    for key, tensor in target.items():
        if _is_head(key, model) or key in new_keys:
            report.initialised.append(key)
            continue
        if key not in state:
            problems.append(f"missing {key}")
            continue
        value = state[key]
        if value.shape != tensor.shape and key.startswith("conv_blocks_context.0.0.") and value.dim() == 5 \
                and value.shape[1] == 1 and value.shape[0] == tensor.shape[0] and value.shape[2:] == tensor.shape[2:]:
            value = value.repeat(1, tensor.shape[1], 1, 1, 1)
            report.repeated_input_channels.append(key)
        if value.shape != tensor.shape:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(tensor.shape)}")
            continue
        to_load[key] = value
    if problems:
        raise CheckpointError(f"{os.fspath(path)!r} ({found}) does not fit this {expected}: "
                              + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    report.skipped = sorted(k for k in state if k not in to_load)
    report.loaded = sorted(to_load)
    if not check_only:
        with torch.no_grad():
            for key, value in to_load.items():
                target[key].copy_(value.to(dtype=target[key].dtype))
    return report
