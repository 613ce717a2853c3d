"""Reproducible nnU-Net runs: ``NNUNET_TPP_SEED`` seeds the network's initialisation and every epoch.

nnU-Net seeds nothing, and its checkpoint holds no random-number state, so two runs (or a run and its ``--c``
continuation) draw different patches and augmentations. With ``NNUNET_TPP_SEED=N`` our trainers seed Python's,
NumPy's and PyTorch's generators from ``(N, rank, phase)`` before the network is built and again at the start of
every training epoch, so the batches of epoch ``e`` depend only on ``N`` and ``e``: a run resumed with ``--c`` from
the checkpoint of epoch ``e - 1`` continues exactly as the uninterrupted run did (bit for bit on the CPU).

nnU-Net draws the batches in the training process only with ``nnUNet_n_proc_DA=0``; with worker processes (its
default) the workers seed themselves from the operating system and prefetch across epochs, so their batches are
not reproducible whatever the seed (the trainer says so in its log).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

ENV_SEED = "NNUNET_TPP_SEED"
INIT_PHASE = -1  # the phase of the network's initialisation; epochs are 0, 1, ...


class SeedError(ValueError):
    """An ``NNUNET_TPP_SEED`` that is not a non-negative integer."""


def requested_seed() -> int | None:
    """The seed given with ``NNUNET_TPP_SEED``, or None when it is unset or empty.

    Raises:
        SeedError: the value is not a non-negative integer (names the variable and the fix).
    """
    raw = os.environ.get(ENV_SEED, "").strip()
    if not raw:
        return None
    try:
        seed = int(raw)
    except ValueError:
        seed = -1
    if seed < 0:
        raise SeedError(f"{ENV_SEED}={raw!r}: the seed must be a non-negative integer, e.g. {ENV_SEED}=0 (or unset it "
                        f"for nnU-Net's unseeded runs)")
    return seed


def seed_generators(seed: int, phase: int, rank: int = 0) -> int:
    """Seeds ``random``, ``numpy.random`` and ``torch`` (every device) for one phase of a run.

    Args:
        seed: the run's seed (``NNUNET_TPP_SEED``).
        phase: :data:`INIT_PHASE` before the network is built, else the epoch about to start.
        rank: the DDP rank (each rank draws its own batches).
    Returns:
        The 32-bit seed derived from ``(seed, rank, phase)`` and given to the three generators.
    """
    derived = int(np.random.SeedSequence([seed, rank, phase - INIT_PHASE]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def data_workers() -> int:
    """How many data-augmentation worker processes nnU-Net will start (its ``get_allowed_n_proc_DA``): 0 means the
    batches are drawn in the training process, where the seed reaches them."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    return int(get_allowed_n_proc_DA())
