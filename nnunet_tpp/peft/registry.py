"""The registry of PEFT methods: one entry per method, shared by every model and trainer in the package.

A method is a small class that knows how to inject its new parameters into a model, which parameter
names it trains, which of those it added (its *target parameters*, what TPP pre-trains) and, where
possible, how to merge itself into the plain network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn


class PeftError(ValueError):
    """Invalid use of the PEFT interface: unknown method or option, a method that cannot merge, ..."""


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


class PeftMethod:
    """Base class of a registry entry.

    Subclasses set ``name``, ``options`` (a dataclass of the method's knobs) and override what applies.
    """

    name: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    mergeable: ClassVar[bool] = True
    adds_parameters: ClassVar[bool] = False
    models: ClassVar[tuple[str, ...]] = ("STUNet", "ViT")  # the backbones the method can adapt
    description: ClassVar[str] = ""

    def inject(self, model: nn.Module, opts) -> None:
        """Adds the method's new modules to ``model`` in place (default: none)."""

    def is_target(self, name: str) -> bool:
        """True for parameters the method added to the network."""
        return False

    def trains(self, name: str) -> bool:
        """True for every parameter the method trains besides the task heads."""
        return self.is_target(name)

    def never_trained(self, model: nn.Module, opts) -> tuple[str, ...]:
        """Names of parameters that ``trains`` would select but that cannot learn in this model (a bias that the
        following norm cancels); they stay frozen. Resolved once when the method is applied (default: none)."""
        return ()

    def is_copy(self, name: str) -> bool:
        """True for trainable copies of parts of existing weights (APLA's rows): they count as trainable but
        not a second time in the model's total."""
        return False

    def trained_modules(self, model: nn.Module, opts) -> tuple[str, ...]:
        """Names of whole submodules the method trains that depend on the model (e.g. a quarter of its
        blocks); resolved once when the method is applied and kept in ``model.peft_config``."""
        return ()

    def upgrade_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Maps options stored by an earlier version of the package to today's names (default: unchanged), so
        old files load with the options they were made with."""
        return options

    def upgrade_stored_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Like :meth:`upgrade_options`, for options read from a file: an option that did not exist when the file
        was written takes the value that reproduces the behaviour of that time (default: :meth:`upgrade_options`)."""
        return self.upgrade_options(options)

    def legacy_key(self, name: str) -> bool:
        """True for a tensor name that files of an earlier version hold and today's structure leaves out on
        purpose (loading ignores it); default False."""
        return False

    def current_name(self, name: str, names: set[str]) -> str:
        """The name under which today's model holds a tensor that a file of an earlier version names ``name``
        (``names``: the model's parameter names); default ``name``."""
        return name

    def merge(self, model: nn.Module, opts) -> None:
        """Folds the method's parameters into the plain network in place (default: nothing to fold)."""
        if not self.mergeable:
            raise PeftError(f"method {self.name!r} cannot be merged into the backbone; run it unmerged")

    def parse_options(self, options: dict[str, Any]):
        """Validates ``options`` against the method's dataclass and returns an instance of it."""
        options = self.upgrade_options(dict(options))
        known = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise PeftError(f"unknown option(s) {unknown} for PEFT method {self.name!r}; valid options: {valid}")
        converted = {}
        for key, value in options.items():
            default = known[key].default
            if isinstance(default, tuple) and isinstance(value, (list, tuple)):
                value = tuple(value)
            elif isinstance(default, tuple) and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            converted[key] = value
        opts = self.options(**converted)
        check = getattr(opts, "validate", None)
        if check is not None:
            check()
        return opts


_REGISTRY: dict[str, PeftMethod] = {}


def register(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator that adds a method to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise TypeError(f"PEFT method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> PeftMethod:
    """Returns the registry entry for ``name`` or raises :class:`PeftError` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PeftError(f"unknown PEFT method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)
