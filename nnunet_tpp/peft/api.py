"""The PEFT interface every model and trainer in the package uses.

``apply`` adds a method to a model and freezes what the method does not train; the task heads (the
modules a model lists in ``head_prefixes``) always stay trainable. The method and its options are kept on
the model as ``model.peft_config`` so that every other function here knows what was applied.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS as TRANSFORMER_PEFT_DEFAULTS, description_of
from nnunet_tpp.peft.applied import (PeftConfig, is_head, method_and_options, peft_config,  # noqa: F401 (re-exported)
                                     target_parameters, unwrap)
from nnunet_tpp.peft.fingerprint import backbone_fingerprint, check_identity
from nnunet_tpp.peft.registry import PeftError, PeftMethod, get_method

FILE_FORMAT = "nnunet_tpp.peft/1"


def apply(model: nn.Module, method: str, **options) -> nn.Module:
    """Adds a PEFT method to ``model`` in place and freezes everything the method does not train.

    Args:
        model: the network (not wrapped in DDP / torch.compile yet).
        method: a name from :func:`nnunet_tpp.peft.methods`.
        **options: the method's options (see its options dataclass); unknown ones raise. Options not given
            come from ``model.peft_defaults[method]`` when the model has such defaults (a ViT's LoRA adapts
            q and v, an STU-Net's LoRA its convolutions); a described transformer without such defaults (a bare
            Primus) gets the transformers' defaults (LoRA on q and v); else the dataclass's.
    Returns:
        ``model``, with ``model.peft_config`` set.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        raise PeftError("apply PEFT before wrapping the model in DDP or torch.compile")
    if getattr(model, "peft_config", None) is not None:
        raise PeftError(f"this model already has PEFT method {model.peft_config.method!r}; build a fresh model")
    entry = get_method(method)
    defaults = getattr(model, "peft_defaults", None)
    if defaults is None:
        defaults = TRANSFORMER_PEFT_DEFAULTS if description_of(model) is not None else {}
    options = {**defaults.get(method, {}), **options}
    opts = entry.parse_options(options)
    entry.inject(model, opts)
    model.peft_config = PeftConfig(method, dataclasses.asdict(opts), trained_modules=entry.trained_modules(model, opts),
                                   never_trained=tuple(entry.never_trained(model, opts)))
    return freeze(model)


def _trains(method: PeftMethod, net: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` trains: the method's own, the heads', or inside a module the method trains
    (never one the method marked as unable to learn)."""
    if name in peft_config(net).never_trained:
        return False
    if method.trains(name) or is_head(net, name):
        return True
    return any(name.startswith(prefix + ".") for prefix in peft_config(net).trained_modules)


def freeze(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad`` as the applied method wants: its trained parameters and the heads train,
    everything else is frozen (also to restore the freezing after a stage that trained a subset)."""
    method, _ = method_and_options(model)
    net = unwrap(model)
    for name, param in net.named_parameters():
        param.requires_grad_(_trains(method, net, name))
    return model


def trained_parameter_names(model: nn.Module) -> list[str]:
    """Names of everything the method trains: its target parameters, its other trainable parameters and
    the heads (what an adapter-only checkpoint holds)."""
    method, _ = method_and_options(model)
    net = unwrap(model)
    return [n for n, _ in net.named_parameters() if _trains(method, net, n)]


@dataclass(frozen=True)
class TrainableSummary:
    """Counts of trainable parameters."""

    method: str
    trainable: int
    total: int
    target: int
    heads: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable} of {self.total} ({self.percent:.2f}%)"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Counts trainable, total, target and head parameters of a PEFT model. The total is the adapted
    network's size: trainable copies of existing weights (APLA rows) are not counted twice."""
    method, _ = method_and_options(model)
    net = unwrap(model)
    params = dict(net.named_parameters())
    trainable = set(trained_parameter_names(net))
    return TrainableSummary(
        method=method.name,
        trainable=sum(params[n].numel() for n in trainable),
        total=sum(p.numel() for n, p in params.items() if not method.is_copy(n)),
        target=sum(p.numel() for n, p in params.items() if method.is_target(n)),
        heads=sum(p.numel() for n, p in params.items() if is_head(net, n)))


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter-only state dict: every parameter the method trains plus the heads (CPU tensors)."""
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().cpu().clone() for n in trained_parameter_names(model)}


def load_state_dict(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Loads an adapter-only state dict into a model that has the same method applied.

    Args:
        model: the PEFT model (backbone weights already loaded).
        weights: the output of :func:`state_dict`.
        strict: raise if a trained parameter is missing from ``weights`` or a key is unknown.
    Returns:
        The names that were loaded.
    """
    net = unwrap(model)
    method, _ = method_and_options(net)
    expected = set(trained_parameter_names(net))
    params = dict(net.named_parameters())
    weights = current_names(net, weights)
    weights = {n: w for n, w in weights.items() if n in params or not method.legacy_key(n)}
    missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - set(params))
    if strict and (missing or unknown):
        raise PeftError(f"adapter weights do not fit this model: missing {missing[:5]}, unknown {unknown[:5]}")
    bad = [f"{n}: {tuple(w.shape)} vs {tuple(params[n].shape)}" for n, w in weights.items()
           if n in params and w.shape != params[n].shape]
    if bad:
        raise PeftError(f"adapter weights have other shapes than this model: {bad[:5]}")
    with torch.no_grad():
        for n, w in weights.items():
            if n in params:
                params[n].copy_(w.to(params[n].device, params[n].dtype))
    return sorted(n for n in weights if n in params)


def current_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (adapter / target-parameter tensors by name) with the names of files written by earlier versions
    mapped to the names ``model`` holds them under (e.g. Hugging Face ``peft``'s ``lora_A.default``)."""
    method, _ = method_and_options(model)
    names = {n for n, _ in unwrap(model).named_parameters()}
    return {method.current_name(n, names): w for n, w in weights.items()}


def merge(model: nn.Module) -> nn.Module:
    """Folds a mergeable method into the plain network in place (LoRA; trivially BitFit, linear probe, full).

    Returns:
        ``model``, now free of PEFT layers. Raises :class:`PeftError` for methods that cannot merge.
    """
    net = unwrap(model)
    cfg = peft_config(net)
    method, opts = method_and_options(net)
    method.merge(net, opts)
    net.peft_config = dataclasses.replace(cfg, merged=True)
    return model


def save(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Writes the adapter-only weights with the method, options and architecture, atomically."""
    payload = {"format": FILE_FORMAT, **identity(model), "state_dict": state_dict(model), **(extra or {})}
    atomic_torch_save(payload, path)


def identity(model: nn.Module) -> dict:
    """What a weights file must match to be loaded into ``model``: method, options, architecture and, when the
    backbone was fingerprinted (:func:`nnunet_tpp.peft.identity.fingerprint_backbone`), ``backbone``."""
    cfg = peft_config(model)
    ours = {"method": cfg.method, "options": cfg.options, "architecture": architecture_name(model)}
    fingerprint = backbone_fingerprint(model)
    if fingerprint is not None:
        ours["backbone"] = fingerprint
    return ours


def load(model: nn.Module, path: str | os.PathLike, allow_other_backbone: bool = False) -> dict:
    """Loads a file written by :func:`save` into a model with the same method, options, architecture and (when
    both record one) backbone fingerprint.

    Args:
        allow_other_backbone: accept a file made on another backbone checkpoint.
    Returns:
        The file's metadata (everything but the weights).
    """
    from nnunet_tpp.models import file_kinds
    try:
        payload = file_kinds.load_expected(os.fspath(path), file_kinds.ADAPTER, role="adapter weights")
    except file_kinds.FileKindError as e:
        raise PeftError(str(e)) from None
    if payload.get("format") != FILE_FORMAT:
        raise PeftError(f"{os.fspath(path)!r} is an adapter file of format {payload.get('format')!r}; this "
                        f"nnunet_tpp reads {FILE_FORMAT!r}")
    check_identity(payload, identity(model), os.fspath(path), "adapter weights", allow_other_backbone)
    load_state_dict(model, payload["state_dict"])
    return {k: v for k, v in payload.items() if k != "state_dict"}


def architecture_name(model: nn.Module) -> str:
    """A short name of the backbone, e.g. ``STUNet-B`` or ``ResidualEncoderUNet-3f2a9c1d`` (a network's own
    ``architecture_id`` when it has one)."""
    net = unwrap(model)
    if getattr(net, "architecture_id", None):
        return net.architecture_id
    size = getattr(net, "size_name", None)
    return f"{type(net).__name__}-{size}" if size else type(net).__name__


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then an atomic rename over ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
