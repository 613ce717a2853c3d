"""How much memory a training step will need, what a forward pass keeps for the backward pass, and
``activation_checkpointing: auto``.

The estimate runs the network once on PyTorch's ``meta`` device (shapes only: no memory, no arithmetic) with the
model's parameters replaced by meta tensors of the same shape and ``requires_grad``, and adds up what autograd
would keep for the backward pass (each storage once). To that come the weights, the gradients and the optimiser
state of the trainable parameters, and an allowance for the backward pass's transient tensors (a few copies of the
largest activation). ``auto`` turns activation checkpointing on when that sum does not fit the device.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

TRANSIENT_COPIES = 4  # gradient of the current activation, its input's gradient, and the lean paths' rebuilt tensors
HEADROOM = 0.9  # plan for 90 % of what the device has free


@dataclass(frozen=True)
class PeakEstimate:
    """The parts of an estimated training peak, in bytes."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.transient

    def __str__(self) -> str:
        gib = 2 ** 30
        return (f"{self.total / gib:.1f} GiB (weights {self.weights / gib:.1f}, gradients {self.gradients / gib:.1f}, "
                f"optimiser state {self.optimizer_state / gib:.1f}, activations {self.activations / gib:.1f}, "
                f"backward transients {self.transient / gib:.1f})")


def estimate_training_peak(model: nn.Module, input_shape, optimizer_slots: int = 1,
                           dtype: torch.dtype = torch.float32) -> PeakEstimate:
    """Estimates the peak memory of one training step of ``model`` on a batch of ``input_shape``.

    Args:
        model: the network with its PEFT method and memory paths applied (not wrapped in DDP / compile).
        input_shape: ``(batch, channels, *patch)``.
        optimizer_slots: state tensors per trainable parameter (SGD with momentum 1, AdamW 2).
        dtype: activation dtype (float16 under autocast halves the activations of convolutions).
    Returns:
        A :class:`PeakEstimate`.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in params.values()) + sum(
        b.numel() * b.element_size() for b in buffers.values())
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in params.items()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in buffers.items()})
    param_ids = {id(t) for t in meta.values()}
    saved: dict[int, int] = {}
    largest = [0]

    def pack(t: torch.Tensor):
        if id(t) not in param_ids:  # weights are counted above
            base = t._base if t._base is not None else t
            saved[id(base)] = base.numel() * base.element_size()
            largest[0] = max(largest[0], saved[id(base)])
        return t

    x = torch.empty(tuple(int(s) for s in input_shape), device="meta", dtype=dtype)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = functional_call(model, meta, (x,))
        del out
    finally:
        model.train(was_training)
    activations = sum(saved.values())
    return PeakEstimate(weights, trainable, optimizer_slots * trainable, activations,
                        TRANSIENT_COPIES * largest[0])


@dataclass(frozen=True)
class KeptTensor:
    """One storage that autograd keeps for the backward pass.

    Attributes:
        dtype, shape: of the first tensor saved on that storage.
        nbytes: the storage's size (a view keeps its whole storage alive).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def tensors_kept_for_backward(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> list[KeptTensor]:
    """What autograd keeps for the backward pass while ``run()`` builds its graph (counted with
    ``torch.autograd.graph.saved_tensors_hooks``), each storage once.

    A deterministic measure of a training step's activation memory: it depends on the graph, not on the machine.
    What a checkpointed block keeps (its inputs, held by the checkpoint itself) is not seen by these hooks.

    Args:
        run: builds the graph, e.g. ``lambda: model(x)`` (under autocast if it should count autocast's tensors);
            what it returns is dropped afterwards, with the graph.
        exclude: tensors whose storages are not counted (the parameters, which exist anyway); iterated after
            ``run()``.
    Returns:
        One :class:`KeptTensor` per storage, in the order they were first saved.
    """
    held: list[torch.Tensor] = []  # keeps every saved storage alive, so that no address is reused while counting
    kept: dict[tuple, KeptTensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in kept:
            held.append(t)
            kept[key] = KeptTensor(t.dtype, tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    # after the run: a model that converts its weights on its first call (channels-last) excludes the new ones
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    del out, held
    return [k for key, k in kept.items() if key not in skip]


def bytes_kept_for_backward(model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for the backward pass of ``model(x)`` (training mode as the model is), parameters
    excluded; under autocast on ``x``'s device type with ``autocast_dtype`` when given. See
    :func:`tensors_kept_for_backward`."""
    def run():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(x)
    return sum(k.nbytes for k in tensors_kept_for_backward(run, model.parameters()))


def available_bytes(device: torch.device) -> int:
    """Memory this process can still use on ``device``: free CUDA memory plus what PyTorch already holds there, or
    the machine's available memory (and its cgroup limit) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    available = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        available = info.get("MemAvailable")
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw.isdigit() and int(raw) < 2 ** 60:
                used_path = os.path.join(os.path.dirname(path), "memory.current" if path.endswith("max")
                                         else "memory.usage_in_bytes")
                with open(used_path) as f:
                    limit_left = int(raw) - int(f.read().strip())
                available = limit_left if available is None else min(available, limit_left)
        except (OSError, ValueError):
            continue
    return int(available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_checkpointing(setting: str, model: nn.Module, input_shape, device, optimizer_slots: int = 1,
                          dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Turns ``activation_checkpointing`` (``off | on | auto``) into ``off`` or ``on``.

    Returns:
        ``(resolved, reason)``; for ``auto`` the reason gives the estimate and what the device has.
    """
    if setting in ("off", "on"):
        return setting, f"activation_checkpointing: {setting} (recipe)"
    if setting != "auto":
        raise ValueError(f"activation_checkpointing must be off, on or auto, got {setting!r}")
    estimate = estimate_training_peak(model, input_shape, optimizer_slots, dtype)
    have = available_bytes(device)
    resolved = "on" if estimate.total > HEADROOM * have else "off"
    return resolved, (f"activation_checkpointing: auto -> {resolved}: estimated training peak {estimate}; "
                      f"{torch.device(device).type} has {have / 2 ** 30:.1f} GiB available")
