"""What a file of trained parameters was made from, and the check that it fits a model.

Adapter files (``peft_weights.pth``), TPP target-parameter files and pretext states record the PEFT method, its
options, the architecture and a **fingerprint of the backbone**: a hash of every backbone tensor (everything but
the method's own parameters and the task heads), computed once when the backbone is loaded. A file made on another
backbone, by another method or with other options is refused with both identities named.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import nn

from nnunet_tpp.peft.applied import is_head, target_parameters, unwrap
from nnunet_tpp.peft.registry import PeftError, get_method

FINGERPRINT_ATTRIBUTE = "backbone_fingerprint"


def _backbone_tensors(model: nn.Module):
    net = unwrap(model)
    targets = set(target_parameters(net)) if getattr(net, "peft_config", None) is not None else set()
    seen = set()
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        if name in targets or is_head(net, name) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def fingerprint_backbone(model: nn.Module) -> str:
    """Hashes the backbone tensors of ``model`` now (names, shapes, dtypes and values; independent of memory layout
    and device), records the result on the model and returns it (``blake2b:<32 hex digits>``)."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in sorted(_backbone_tensors(model), key=lambda item: item[0]):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    value = f"blake2b:{digest.hexdigest()}"
    setattr(unwrap(model), FINGERPRINT_ATTRIBUTE, value)
    return value


def backbone_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint recorded by :func:`fingerprint_backbone` (None when the backbone was never fingerprinted,
    e.g. a network built for prediction)."""
    return getattr(unwrap(model), FINGERPRINT_ATTRIBUTE, None)


def canonical_options(method: str, options: dict, stored: bool = False) -> dict:
    """``options`` as today's options dataclass stores them (old names upgraded, defaults filled in, lists as
    tuples), so options written by any version compare equal when they build the same network.

    Args:
        stored: the options were read from a file: options it predates take the values of its time
            (:meth:`PeftMethod.upgrade_stored_options`).
    """
    entry = get_method(method)
    if stored:
        options = entry.upgrade_stored_options(dict(options))
    return dataclasses.asdict(entry.parse_options(dict(options)))


def check_identity(recorded: dict, ours: dict, source: str, what: str, allow_other_backbone: bool = False) -> None:
    """Refuses a file whose recorded identity differs from the model's.

    Args:
        recorded: the file's ``method``, ``options``, ``architecture`` and optional ``backbone`` (fingerprint).
        ours: the same for the model (:func:`nnunet_tpp.peft.identity_of`).
        source: the file, for the message.
        what: what the file is (``adapter weights``, ``target parameters``, ...).
        allow_other_backbone: accept a different backbone fingerprint (``restore --force``).
    Raises:
        PeftError: naming every difference and how to proceed.
    """
    problems = []
    try:
        theirs = canonical_options(recorded["method"], recorded.get("options", {}), stored=True)
    except PeftError as e:
        raise PeftError(f"{source!r} holds {what} made with options this version cannot build ({e}); re-create the "
                        f"file with the current nnunet_tpp") from None
    if recorded["method"] != ours["method"] or theirs != canonical_options(ours["method"], ours["options"]):
        problems.append(f"method {recorded['method']} {_short(theirs)} vs this model's {ours['method']} "
                        f"{_short(ours['options'])}")
    if recorded.get("architecture") != ours["architecture"]:
        problems.append(f"architecture {recorded.get('architecture')} vs this model's {ours['architecture']}")
    if (recorded.get("backbone") and ours.get("backbone") and recorded["backbone"] != ours["backbone"]
            and not allow_other_backbone):
        problems.append(f"backbone {recorded['backbone']} vs this model's {ours['backbone']} (a different "
                        f"pre-trained checkpoint)")
    if problems:
        raise PeftError(f"{source!r} holds {what} that do not fit this model: " + "; ".join(problems))


def _short(options: dict) -> str:
    return "{" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in options.items()) + "}"
