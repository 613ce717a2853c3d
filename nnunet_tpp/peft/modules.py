"""Helpers to find and replace the layers a PEFT method adapts."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import nn

from nnunet_tpp.peft.registry import PeftError


def matching_convs(model: nn.Module, targets: Sequence[str], conv_type: type = nn.Conv3d
                   ) -> Iterator[tuple[str, nn.Module]]:
    """Yields ``(qualified_name, conv)`` for each plain ``conv_type`` whose attribute name is in ``targets``
    (e.g. ``("conv1", "conv2")`` selects both convolutions of every STU-Net residual block)."""
    wanted = set(targets)
    for name, module in list(model.named_modules()):
        if type(module) is conv_type and name.rsplit(".", 1)[-1] in wanted:
            yield name, module


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def conv_like(conv: nn.Conv3d | nn.Conv2d, cls: type) -> nn.Module:
    """Creates ``cls`` (a subclass of the conv's type) with the conv's hyper-parameters, sharing its weight
    and bias objects, so parameter names, values and ``requires_grad`` stay exactly as they were."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
              padding_mode=conv.padding_mode, device="meta")
    new.weight = conv.weight
    new.bias = conv.bias
    return new


def wrap_convs(model: nn.Module, method: str, targets: Sequence[str], wrappers: dict[type, type],
               attach: Callable[[nn.Module, nn.Module], None], skip_grouped: bool = False) -> int:
    """Replaces each targeted conv by its PEFT wrapper (same parameters, see :func:`conv_like`) and lets
    ``attach(new, old)`` add the method's modules.

    Args:
        method: the method's name, for the error message.
        targets: attribute names of the convs to adapt.
        wrappers: ``{nn.Conv3d: Wrapper3d, nn.Conv2d: Wrapper2d}``.
        skip_grouped: leave grouped convolutions alone.
    Returns:
        The number of wrapped convolutions; raises :class:`PeftError` when none matched.
    """
    found = 0
    for conv_type, wrapper in wrappers.items():
        for name, conv in matching_convs(model, targets, conv_type):
            if skip_grouped and conv.groups != 1:
                continue
            new = conv_like(conv, wrapper)
            attach(new, conv)
            replace_submodule(model, name, new)
            found += 1
    if not found:
        raise PeftError(f"{method}: no convolution named {list(targets)} in {type(model).__name__}")
    return found
