"""Helpers to find, wrap and hook the layers a PEFT method adapts (CNN sites and transformer descriptions)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from nnunet_tpp.models.sites import BLOCK, SHORTCUT, UPSAMPLE, ConvSite, NoDescriptionError, describe
from nnunet_tpp.models import primus_sites  # noqa: F401  (registers Primus's transformer description)
from nnunet_tpp.models.transformer_sites import TransformerDescription, find_transformers
from nnunet_tpp.peft.registry import PeftError

CNN_POSITIONS = ("first", "all", "upsample")


def name_matches(name: str, target: str) -> bool:
    """True when the dotted module path ``name`` is ``target`` or ends with ``.target`` (a bare target such
    as ``conv1`` matches the attribute name, a dotted one such as ``attn.proj`` a path suffix)."""
    return name == target or name.endswith("." + target)


def has_part(name: str, part: str) -> bool:
    """True when ``part`` (e.g. ``tuner`` or ``adapter_mlp``) is one whole component of the dotted ``name``."""
    return f".{part}." in f".{name}."


def matching_convs(model: nn.Module, targets: Sequence[str], conv_type: type = nn.Conv3d
                   ) -> Iterator[tuple[str, nn.Module]]:
    """Yields ``(qualified_name, conv)`` for each plain ``conv_type`` whose attribute name is in ``targets``
    (e.g. ``("conv1", "conv2")`` selects both convolutions of every STU-Net residual block); a dotted target
    (``patch_embed.proj``) matches the end of the qualified name (see :func:`name_matches`)."""
    for name, module in list(model.named_modules()):
        if type(module) is conv_type and any(name_matches(name, t) for t in targets):
            yield name, module


def describes_itself(model: nn.Module) -> bool:
    """True when ``model`` says where convolutional methods attach (:func:`nnunet_tpp.models.sites.describe`)."""
    try:
        describe(model)
    except NoDescriptionError:
        return False
    return True


def select_sites(model: nn.Module, targets: Sequence[str], method: str) -> list[ConvSite]:
    """The convolutions of a self-describing CNN that ``targets`` name.

    Args:
        targets: positions ``first`` (each block's first k x k convolution), ``all`` (every k x k convolution of a
            block's main path), ``upsample`` (the decoder's upsampling convolutions), and/or attribute names or
            dotted suffixes of block, shortcut or upsampling convolutions (``conv1``, ``conv3``).
        method: the method's name, for the error message.
    Returns:
        The chosen sites in forward order. Raises :class:`PeftError` when nothing matches.
    """
    sites = [s for s in describe(model).convs if s.role in (BLOCK, SHORTCUT, UPSAMPLE)]
    names = [t for t in targets if t not in CNN_POSITIONS]
    chosen = []
    for site in sites:
        conv = model.get_submodule(site.name)
        k_by_k = site.role == BLOCK and max(conv.kernel_size) > 1
        if (("all" in targets and k_by_k) or ("first" in targets and k_by_k and site.index == 0)
                or ("upsample" in targets and site.role == UPSAMPLE) or any(name_matches(site.name, t) for t in names)):
            chosen.append(site)
    if not chosen:
        examples = sorted({s.name.rsplit(".", 1)[-1] for s in sites})[:8]
        raise PeftError(f"{method}: no convolution of {type(model).__name__} matches targets {list(targets)}; use "
                        f"{', '.join(CNN_POSITIONS)} or attribute names such as {examples}")
    return chosen


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
               attach: Callable[[nn.Module, nn.Module], None], skip_grouped: bool = False,
               required: bool = True, exclude: Callable[[str], bool] | None = None) -> int:
    """Replaces each targeted conv by its PEFT wrapper (same parameters, see :func:`conv_like`) and lets
    ``attach(new, old)`` add the method's modules.

    Args:
        method: the method's name, for the error message.
        targets: attribute names of the convs to adapt.
        wrappers: ``{nn.Conv3d: Wrapper3d, nn.Conv2d: Wrapper2d}``.
        skip_grouped: leave grouped convolutions alone.
        required: raise :class:`PeftError` when no convolution matched.
        exclude: ``exclude(qualified_name)`` True leaves that convolution alone.
    Returns:
        The number of wrapped convolutions.
    """
    found = 0
    for conv_type, wrapper in wrappers.items():
        for name, conv in matching_convs(model, targets, conv_type):
            if (skip_grouped and conv.groups != 1) or (exclude is not None and exclude(name)):
                continue
            new = conv_like(conv, wrapper)
            attach(new, conv)
            replace_submodule(model, name, new)
            found += 1
    if not found and required:
        raise PeftError(f"{method}: no convolution named {list(targets)} in {type(model).__name__}")
    return found


def module_like(module: nn.Module, cls: type) -> nn.Module:
    """Creates ``cls`` (the module's own type, a subclass of it, or a plain base type) with the module's
    hyper-parameters, sharing its weight and bias objects (names, values and ``requires_grad`` unchanged).
    Handles ``nn.Linear``, ``nn.LayerNorm`` and convolutions."""
    if isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    elif isinstance(module, nn.LayerNorm):
        new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                  bias=module.bias is not None, device="meta")
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return conv_like(module, cls)
    else:
        raise TypeError(f"module_like cannot copy a {type(module).__name__}")
    new.weight = module.weight
    new.bias = module.bias
    return new


def transformers(model: nn.Module, method: str, token_stream: bool = False
                 ) -> list[tuple[str, nn.Module, TransformerDescription]]:
    """The described transformers inside ``model`` as ``(qualified name, module, description)`` (``""`` for the model
    itself; a combined classifier has several).

    Args:
        method: the method's name, for the errors.
        token_stream: the method needs one token sequence through all blocks (VPT, EVP, DTL).
    Raises:
        PeftError: there is none, or one without the token stream the method needs.
    """
    found = list(find_transformers(model))
    if not found:
        raise PeftError(f"PEFT method {method!r} adapts Vision Transformers (timm's ViT, LiteMedSAM's TinyViT, "
                        f"nnU-Net's Primus), and "
                        f"{type(model).__name__} has none inside; for convolutional networks (STU-Net) use "
                        f"conv_adapter, lora (convolutions), bitfit, linear_probe or full")
    for _, _, description in found:
        if token_stream and not description.token_stream:
            raise PeftError(f"{method} works on one token sequence that runs through every block (prompt tokens, a "
                            f"side network), and {description.name} has none (windowed attention, stages of "
                            f"different widths): use lora, adapter, adaptformer, ssf, apla, partial, bitfit, "
                            f"linear_probe or full on it")
    return found


def qualified(prefix: str, name: str) -> str:
    """``prefix.name`` (``name`` alone when the prefix is empty)."""
    return f"{prefix}.{name}" if prefix else name


def swap_class(module: nn.Module, mixin: type) -> None:
    """Makes ``module`` an instance of ``mixin`` + its own class, with its parameters, buffers and names unchanged;
    :func:`restore_class` undoes it."""
    base = type(module)
    key = (mixin, base)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {"peft_base": base})
    module.__class__ = _SWAPPED[key]


def restore_class(module: nn.Module) -> None:
    """Gives a module changed by :func:`swap_class` its own class back."""
    module.__class__ = module.peft_base


_SWAPPED: dict[tuple[type, type], type] = {}


def attach(owner: nn.Module, name: str, module: nn.Module, method: str) -> None:
    """Registers ``module`` as the new submodule ``owner.<name>``; raises :class:`PeftError` when it is taken."""
    if getattr(owner, name, None) is not None:
        raise PeftError(f"{method}: this {type(owner).__name__} already has a {name!r} (a PEFT method was applied)")
    owner.add_module(name, module)


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter ``scale * up(dropout(act(down(x))))``: ``down`` D -> m, ``up`` m -> D.

    ``down`` keeps PyTorch's Linear initialisation (Kaiming-uniform, a = sqrt(5)) with a zero bias and ``up``
    starts at zero, so a new adapter adds nothing (AdaptFormer's "lora" initialisation).

    Args:
        dim: token width D.
        bottleneck: hidden width m.
        act: ``"gelu"`` or ``"relu"``.
        scale: fixed output scale.
        dropout: dropout on the hidden activations.
    """

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        self.pending: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        out = self.up(self.dropout(self.act(self.down(x))))
        return out * self.scale if self.scale != 1.0 else out

    def residual_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the hooked module's output ``h`` becomes ``h + adapter(h)`` (a sequential adapter)."""
        return output + self(output)

    def read_input_hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: computes ``adapter(x)`` of the hooked module's input for :meth:`add_read_hook`."""
        self.pending = self(args[0])

    def add_read_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: adds the value :meth:`read_input_hook` computed to the hooked module's output (a parallel
        adapter)."""
        pending, self.pending = self.pending, None
        return output + pending


def positive_int(method: str, option: str, value) -> int:
    """``int(value)`` when it is a positive integer, else a :class:`PeftError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 1:
        raise PeftError(f"{method}: {option} must be a positive integer, got {value!r}")
    return int(value)
