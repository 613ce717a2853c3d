"""Pretext input from background workers: the views of a step are fixed by (seed, step, sample) alone, so 0 and 2
workers give the same batches and the same trained weights, and a draw leaves the process's random streams alone."""
import numpy as np
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import STUNet
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler
from nnunet_tpp.pretext.feed import STEP, batches, fixed_set
from nnunet_tpp.pretext.masked import MaskedConfig, run_masked_stage
from nnunet_tpp.pretext.masked_views import MaskedViewSampler
from nnunet_tpp.pretext.stage import PretextSchedule
from tests.pretext.test_stage import _CTDataset

POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def test_the_same_views_for_any_number_of_workers():
    sources = [MaskedViewSampler(_CTDataset(), ["ct"], (16, 16, 16), block_size=8, seed=3),
               MultiCropSampler(_CTDataset(), ["ct"], (16, 16, 16), (8, 8, 8), MultiCropConfig(n_local=2), seed=3)]
    for source in sources:
        here = list(batches(source, range(2, 5), [0, 1, 2], workers=0))
        workers = list(batches(source, range(2, 5), [0, 1, 2], workers=2))
        assert len(here) == len(workers) == 3 and _equal(here, workers)
        assert not _equal(here[0], here[1])  # steps differ
        again = [source.collate([source.draw((STEP, 3, i)) for i in (0, 1, 2)])]
        assert _equal(again[0], here[1])  # a step's views depend on the key alone
        assert _equal(fixed_set(source, 3, 2), fixed_set(source, 3, 2))


def test_a_draw_leaves_the_global_random_streams_as_they_were():
    source = MaskedViewSampler(_CTDataset(), ["ct"], (16, 16, 16), block_size=8, seed=3)
    torch.manual_seed(5)
    np.random.seed(5)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(5)
    np.random.seed(5)
    source.draw((STEP, 0, 0))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_a_stage_fed_by_two_workers_ends_where_the_in_process_one_does(tmp_path):
    results = []
    for workers in (0, 2):
        torch.manual_seed(0)
        net = peft.apply(STUNet(1, 3, [1] * 6, [4, 8, 8, 8, 8, 8], POOLS), "conv_adapter")
        source = MaskedViewSampler(_CTDataset(), ["ct"], (16, 16, 16), block_size=8, seed=1)
        run_masked_stage(net, source, PretextSchedule(1, 3, 2), MaskedConfig(), torch.device("cpu"),
                         str(tmp_path / f"state{workers}.pth"), log=lambda m: None, workers=workers)
        results.append({k: v.detach().clone() for k, v in peft.target_parameters(net).items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
