"""Pretext input: views drawn per (step, sample) with their own seed, cut in background workers as nnU-Net feeds
its supervised stage (``nnUNet_n_proc_DA`` processes).

A *view source* draws the views of one sample from a key: ``source.draw(key)`` with ``key = (STEP, step, index)``
for the stage's batches (``index``: the sample's place in the global batch), ``(EVAL, k)`` for a fixed evaluation
set and ``(CALIBRATION, k)`` for the DINO head's calibration. Each draw seeds its own generators from the key and the
source's seed (numpy, and the global torch / numpy generators that nnU-Net's transforms use, restored afterwards), so a
view depends on the key alone: the same for 0 or 8 workers, for 1 or 2 DDP ranks, and for a resumed run.
``source.collate(samples)`` stacks the draws of a batch.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

STEP, EVAL, CALIBRATION = 0, 1, 2


@runtime_checkable
class ViewSource(Protocol):
    """Draws the views of one sample from a key, and stacks draws into a batch."""

    def draw(self, key: tuple[int, ...]) -> Any: ...

    def collate(self, samples: list) -> Any: ...


@contextlib.contextmanager
def seeded(seed_key: Sequence[int]):
    """Seeds the global torch and numpy generators from ``seed_key`` (a sequence of non-negative integers) for the
    block, and restores them afterwards (so a draw changes no other random stream of the process)."""
    seed = int(np.random.SeedSequence([int(k) for k in seed_key]).generate_state(1)[0])
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield np.random.default_rng(seed)
        finally:
            np.random.set_state(state)


def default_workers() -> int:
    """nnU-Net's number of augmentation processes (``nnUNet_n_proc_DA``, else its per-host table, at most the CPU
    count), as its supervised stage uses."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    return max(0, int(get_allowed_n_proc_DA()))


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step``: the collated views of this rank's samples of that step."""

    def __init__(self, source: ViewSource, indices: list[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:  # (items are addressed by step through the sampler)
        return 1 << 62

    def __getitem__(self, step: int):
        return self.source.collate([self.source.draw((STEP, int(step), i)) for i in self.indices])


def _worker_init(_):
    torch.set_num_threads(1)


def batches(source: ViewSource, steps: range, indices: list[int], workers: int = 0) -> Iterator:
    """The batches of ``steps`` in order: each the collated draws ``(STEP, step, i)`` for ``i`` in ``indices``.

    Args:
        workers: background processes (0: drawn in this process when needed). With workers, batches are prepared
            ahead (two per worker) while the stage trains; the order and the content are the same.
    """
    data = _StepBatches(source, indices)
    if workers <= 0 or len(steps) == 0:
        for step in steps:
            yield data[step]
        return
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=list(steps), num_workers=int(workers),
                                         prefetch_factor=2, worker_init_fn=_worker_init,
                                         multiprocessing_context="fork" if os.name == "posix" else None)
    yield from loader


def fixed_set(source: ViewSource, count: int, batch_size: int) -> list:
    """A fixed evaluation set: ``count`` samples drawn with keys ``(EVAL, k)``, collated in batches."""
    samples = [source.draw((EVAL, k)) for k in range(count)]
    return [source.collate(samples[i:i + batch_size]) for i in range(0, count, batch_size)]


def stage_batches(sample, steps: range, indices: list[int], workers: int = 0) -> Iterator:
    """The batches a stage trains on for ``steps``: from a :class:`ViewSource` (views fixed by step and sample, in
    ``workers`` background processes), or from a plain ``sample(batch_size)`` callable (drawn here, in order; the
    2-D stage's and earlier callers' way) called with this rank's share ``len(indices)``."""
    if isinstance(sample, ViewSource):
        yield from batches(sample, steps, indices, workers)
    else:
        for _ in steps:
            yield sample(len(indices))


def calibration_batches(sample, count: int, batch_size: int, rank: int, world_size: int) -> Iterator:
    """Batches of about ``count`` samples for a calibration before training: keys ``(CALIBRATION, k)`` of a
    :class:`ViewSource` (this rank's ``k``, so that the ranks together draw each once), or ``sample(batch_size)``
    calls of a plain callable."""
    if isinstance(sample, ViewSource):
        mine = [k for k in range(max(1, count)) if k % world_size == rank]
        for i in range(0, len(mine), batch_size):
            yield sample.collate([sample.draw((CALIBRATION, k)) for k in mine[i:i + batch_size]])
        return
    seen = 0
    while seen < max(1, count):
        yield sample(batch_size)
        seen += batch_size


@contextlib.contextmanager
def step_random(seed: int, step: int, device: torch.device):
    """Torch's random state (CPU, and ``device``'s on CUDA) set from ``(seed, step)`` for the block and restored
    after it: a training step's randomness (stochastic depth) is the same in a resumed stage."""
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) * 1_000_003 + int(step))
        yield
