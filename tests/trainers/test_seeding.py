"""``NNUNET_TPP_SEED``: the value is checked, and the generators are seeded per (seed, rank, phase)."""
import random

import numpy as np
import pytest
import torch

from nnunet_tpp.trainers.seeding import ENV_SEED, INIT_PHASE, SeedError, requested_seed, seed_generators


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_the_seed_variable_is_an_optional_non_negative_integer(monkeypatch):
    monkeypatch.delenv(ENV_SEED, raising=False)
    assert requested_seed() is None
    monkeypatch.setenv(ENV_SEED, " 12 ")
    assert requested_seed() == 12
    for bad in ("-1", "1.5", "abc"):
        monkeypatch.setenv(ENV_SEED, bad)
        with pytest.raises(SeedError, match=f"{ENV_SEED}='{bad}': the seed must be a non-negative integer"):
            requested_seed()


def test_each_phase_draws_the_same_numbers_whatever_came_before():
    seed_generators(3, 2)
    first = _draws()
    seed_generators(3, INIT_PHASE)
    _draws()  # a run that went through other phases first
    seed_generators(3, 2)
    assert _draws() == first
    others = [(4, 2, 0), (3, 1, 0), (3, 2, 1), (3, INIT_PHASE, 0)]  # another seed, epoch or rank
    for seed, phase, rank in others:
        seed_generators(seed, phase, rank)
        assert _draws() != first, (seed, phase, rank)
