"""Files of the pretext stages: target-parameter files (a stage's result, what fine-tuning starts from), the
resumable stage state, and the settings a resumed state must share. Shared by the DINO and masked-reconstruction
stages (3-D) and the 2-D TPP.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp import peft

TARGET_FORMAT = "nnunet_tpp.tpp/1"
STATE_FORMAT = "nnunet_tpp.tpp_state/3"


class TargetParameterError(ValueError):
    """A target-parameter file or pretext state that does not fit the network (method, options, architecture or
    backbone), or that cannot be read."""


@dataclass
class PretextSchedule:
    """Length and shape of the pretext stage.

    Attributes:
        epochs, iterations_per_epoch: schedule.
        batch_size: samples per iteration over all processes (DINO: each gives 2 global + k local views; masked
            reconstruction: one masked view); under DDP each rank computes its share.
        feature_stages: (DINO) encoder stages whose globally pooled outputs feed the DINO head (0 = full resolution;
            negative counts from the bottleneck, -1).
        grad_clip: maximal gradient norm (how it is applied: the objective's ``clip`` setting).
        calibration_samples: (DINO) samples whose views set the head's running input statistics before training.
    """

    epochs: int = 50
    iterations_per_epoch: int = 100
    batch_size: int = 8
    feature_stages: tuple[int, ...] = (-2, -1)
    grad_clip: float = 3.0
    calibration_samples: int = 32


# --- target-parameter files ------------------------------------------------------------------------------------
def save_target_parameters(network: nn.Module, path: str, extra: dict | None = None) -> None:
    """Writes the method's target parameters with the method, options, architecture and (when fingerprinted)
    backbone they belong to."""
    payload = {"format": TARGET_FORMAT, **peft.identity(network),
               "target_parameters": {n: p.detach().cpu().clone() for n, p in peft.target_parameters(network).items()},
               **(extra or {})}
    peft.atomic_torch_save(payload, path)


def read_target_parameters(path: str) -> dict:
    """The content of a target-parameter file (refusing any other kind of file, safely)."""
    from nnunet_tpp.models import file_kinds
    try:
        payload = file_kinds.load_expected(path, file_kinds.TARGET_PARAMETERS, role="NNUNET_TPP_TARGET_PARAMETERS")
    except file_kinds.FileKindError as e:
        raise TargetParameterError(str(e)) from None
    if payload.get("format") != TARGET_FORMAT:
        raise TargetParameterError(f"{path!r} is a target-parameter file of format {payload.get('format')!r}; this "
                                   f"version reads {TARGET_FORMAT!r}: re-create it with `nnunet-tpp pretrain`")
    return payload


def check_file_identity(recorded: dict, network: nn.Module, source: str, what: str) -> None:
    """Refuses a file whose recorded method, options, architecture or backbone differ from ``network``'s
    (:func:`peft.check_identity`), as a :class:`TargetParameterError`."""
    try:
        peft.check_identity(recorded, peft.identity(network), source, what)
    except peft.PeftError as e:
        raise TargetParameterError(str(e)) from None


def load_target_parameters(network: nn.Module, path: str) -> dict:
    """Copies the target parameters of a file written by :func:`save_target_parameters` into ``network``.

    Returns:
        The file's metadata. Raises :class:`TargetParameterError` when the file is not a target-parameter file or
        was made for another method, other options, another architecture or another backbone.
    """
    payload = read_target_parameters(path)
    check_file_identity(payload, network, path, "target parameters")
    copy_target_parameters(network, payload["target_parameters"], path)
    return {k: v for k, v in payload.items() if k != "target_parameters"}


def copy_target_parameters(network: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copies ``{name: tensor}`` into the network's target parameters; the names and shapes must be exactly
    those of :func:`peft.target_parameters` (else :class:`TargetParameterError` naming ``source``)."""
    params = peft.target_parameters(network)
    if set(weights) != set(params):
        raise TargetParameterError(f"{source!r}: parameter names differ from this network's target parameters")
    bad = [f"{n}: {tuple(w.shape)} vs {tuple(params[n].shape)}" for n, w in weights.items()
           if w.shape != params[n].shape]
    if bad:
        raise TargetParameterError(f"{source!r}: target parameters of other shapes than this network's: {bad[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# --- the resumable state ---------------------------------------------------------------------------------------
STATE_WHAT = "the pretext stage's resumable state (tpp_state.pth)"


def read_state(state_file: str, device: torch.device | str = "cpu") -> dict:
    """The content of a pretext state file (safely; refusing other files and states of earlier versions)."""
    from nnunet_tpp.models import file_kinds
    try:
        state = file_kinds.load_torch_file(state_file, STATE_WHAT, map_location=device)
    except file_kinds.FileKindError as e:
        raise TargetParameterError(str(e)) from None
    if not isinstance(state, dict) or state.get("state_format") != STATE_FORMAT:
        raise TargetParameterError(f"{state_file!r} is not {STATE_WHAT} of this version ({STATE_FORMAT}); it was "
                                   f"written by an earlier version or another program: remove it to start the "
                                   f"pretext stage afresh")
    return state


def stage_settings(schedule: PretextSchedule, cfg, extra: dict | None = None, name: str = "dino") -> dict:
    """What a resumed state must share with the run that resumes it (everything but the number of epochs).

    Args:
        schedule: the stage's :class:`PretextSchedule`.
        cfg: the objective's recipe (a dataclass: ``DINOConfig``, ``MaskedConfig``), recorded under ``name``.
        extra: further groups (e.g. the view sizes, whether the target parameters train).
    """
    plain = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
    return {"schedule": plain({k: v for k, v in dataclasses.asdict(schedule).items() if k != "epochs"}),
            name: plain(dataclasses.asdict(cfg)), **(extra or {})}


def check_state(state: dict, network: nn.Module, state_file: str, settings: dict | None = None) -> None:
    """Refuses a state made from another method, options, architecture or backbone, or with other settings."""
    check_file_identity(state["identity"], network, state_file, "pretext-stage weights")
    if settings is not None and state.get("settings") != settings:
        theirs = state.get("settings") or {}
        changed = []
        for group, values in settings.items():
            old = theirs.get(group)
            if isinstance(values, dict) and isinstance(old, dict):
                changed += [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in values.items() if old.get(k) != v]
            elif old != values:
                changed.append(f"{group}: {old!r} -> {values!r}")
        raise TargetParameterError(f"{state_file!r} was made with other pretext settings ({'; '.join(changed)}); "
                                   f"run with the settings it was made with, or remove it to start afresh")


def save_state(path: str, network: nn.Module, settings: dict, **content) -> None:
    """Writes a stage state atomically: the format, the network's identity (method, options, architecture,
    backbone fingerprint), the settings, and ``content`` (weights, optimizer state, epoch, history, ...)."""
    peft.atomic_torch_save({"state_format": STATE_FORMAT, "identity": peft.identity(network), "settings": settings,
                            **content}, path)


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """``||after - before|| / ||before||`` over all tensors together (the target parameters' move)."""
    diff = sum(float((after[n].detach().double().cpu() - b.double().cpu()).pow(2).sum()) for n, b in before.items())
    norm = sum(float(b.double().pow(2).sum()) for b in before.values())
    return (diff / norm) ** 0.5 if norm > 0 else float("inf") if diff > 0 else 0.0
