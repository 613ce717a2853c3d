"""What a model says about the PEFT method applied to it: its :class:`PeftConfig`, the network inside the DDP and
``torch.compile`` wrappers, its task heads and the parameters the method added. Everything else in
:mod:`nnunet_tpp.peft` reads a model through these functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from nnunet_tpp.peft.registry import PeftError, PeftMethod, get_method


@dataclass(frozen=True)
class PeftConfig:
    """The method applied to a model and its resolved options."""

    method: str
    options: dict[str, Any]
    merged: bool = False
    trained_modules: tuple[str, ...] = ()
    never_trained: tuple[str, ...] = ()


def unwrap(model: nn.Module) -> nn.Module:
    """Returns the network inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def peft_config(model: nn.Module) -> PeftConfig:
    """The :class:`PeftConfig` that :func:`nnunet_tpp.peft.apply` recorded on ``model`` (wrappers looked through).

    Raises:
        PeftError: no method was applied to the model.
    """
    cfg = getattr(unwrap(model), "peft_config", None)
    if cfg is None:
        raise PeftError(f"no PEFT method has been applied to this {type(unwrap(model)).__name__}; "
                        f"call nnunet_tpp.peft.apply(model, method) first")
    return cfg


def method_and_options(model: nn.Module) -> tuple[PeftMethod, Any]:
    """The registered method applied to ``model`` and its options parsed into the method's options dataclass."""
    cfg = peft_config(model)
    method = get_method(cfg.method)
    return method, method.parse_options(cfg.options)


def is_head(model: nn.Module, name: str) -> bool:
    """True when parameter ``name`` belongs to one of the model's task heads."""
    return any(name == p or name.startswith(p + ".") for p in getattr(unwrap(model), "head_prefixes", ()))


def target_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the method added (Conv-Adapter / LoRA weights): what TPP pre-trains.

    Returns:
        ``{name: parameter}`` in module order; empty for methods that add nothing.
    """
    method, _ = method_and_options(model)
    return {n: p for n, p in unwrap(model).named_parameters() if method.is_target(n)}
