"""The TPP pretext stages under DDP: two spawned processes (gloo, CPU, a free port), each computing its share of
the batch on views of the real CT. Target parameters, the pretext head (DINO's EMA teacher, centre and running
statistics; the masked output layer) stay identical across ranks after every epoch, only rank 0 writes files, and the
result is the single-process run's on the whole batch (up to the order of the sums). Each rank draws its fresh
head from another seed: the stage makes them rank 0's (the single process's)."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import STUNet
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler
from nnunet_tpp.pretext.dino import DINOConfig
from nnunet_tpp.pretext.masked import MaskedConfig, run_masked_stage
from nnunet_tpp.pretext.masked_views import MaskedViewSampler
from nnunet_tpp.pretext.stage import PretextSchedule, run_dino_stage

POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2
CFG = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_epochs=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    torch.manual_seed(0)
    return peft.apply(STUNet(1, 3, [1] * 6, [4, 8, 8, 8, 8, 8], POOLS), "conv_adapter")


def _ct():
    from tests.pretext.test_stage import _CTDataset
    return _CTDataset(step=2)


def run(pretext: str, folder: str) -> dict:
    """One stage of 2 epochs x 2 steps at batch 4 in ``folder`` (this rank's share of each batch); returns the
    snapshots taken after every epoch (target parameters and the pretext head's state)."""
    torch.set_num_threads(1)
    net = _net()
    head_seed = dist.get_rank() if dist.is_initialized() else 0  # each rank draws another fresh head
    snapshots = []

    def snap(parts):
        if pretext == "dino":
            tensors = {**{f"teacher.{k}": v for k, v in parts["teacher"].state_dict().items() if "network" not in k},
                       "center": parts["center"]}
        else:
            tensors = {f"output.{k}": v for k, v in parts["model"].output.state_dict().items()}
        tensors.update({f"target.{k}": v for k, v in peft.target_parameters(net).items()})
        snapshots.append({k: v.detach().clone() for k, v in tensors.items()})

    schedule = PretextSchedule(2, 2, 4, feature_stages=(3, 5))
    if pretext == "dino":
        source = MultiCropSampler(_ct(), ["ct"], (16, 16, 16), (8, 8, 8), MultiCropConfig(n_local=2), seed=1)
        run_dino_stage(net, source, schedule, CFG, torch.device("cpu"), os.path.join(folder, "state.pth"),
                       log=lambda m: None, diagnostics_file=os.path.join(folder, "d.json"), on_epoch_end=snap,
                       seed=head_seed)
    else:
        source = MaskedViewSampler(_ct(), ["ct"], (16, 16, 16), block_size=8, seed=1)
        run_masked_stage(net, source, schedule, MaskedConfig(), torch.device("cpu"), os.path.join(folder, "state.pth"),
                         log=lambda m: None, diagnostics_file=os.path.join(folder, "d.json"), on_epoch_end=snap,
                         seed=head_seed)
    return {"snapshots": snapshots, "result": {k: v.detach().clone() for k, v in peft.target_parameters(net).items()}}


def _worker(rank: int, world: int, port: int, pretext: str, root: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        folder = os.path.join(root, f"rank{rank}")  # each rank its own folder: only rank 0's may fill
        out = run(pretext, folder)
        torch.save(out, os.path.join(root, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pretext", ["dino", "mae"])
def test_two_ranks_stay_identical_and_only_rank_0_writes(tmp_path, pretext):
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), pretext, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["snapshots"]) == 2
    for a, b in zip(ranks[0]["snapshots"], ranks[1]["snapshots"]):  # teacher, centre, head, target parameters
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["d.json", "state.pth"]
    assert not list((tmp_path / "rank1").iterdir())
    single_folder = tmp_path / "single"
    single_folder.mkdir()
    single = run(pretext, str(single_folder))  # one process, the whole batch: the same views, the same result
    moved = [n for n, v in single["result"].items() if not torch.equal(v, _net().state_dict()[n])]
    assert moved
    for name, value in single["result"].items():
        np.testing.assert_allclose(ranks[0]["result"][name].numpy(), value.numpy(), rtol=1e-3, atol=1e-5,
                                   err_msg=name)
