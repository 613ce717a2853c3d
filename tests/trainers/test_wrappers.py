"""PEFT models under the wrappers nnU-Net uses: DDP (here with the gloo backend, world size 1; two processes in
``test_ddp_two_processes.py``) and ``torch.compile`` with its default backend, Inductor, as nnU-Net compiles (here
generating CPU code; under autocast in ``tests/models/test_inductor.py``)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import STUNet


def _tiny(method):
    """A tiny STU-Net (two poolings, so few distinct kernels for Inductor to build) with ``method``."""
    torch.manual_seed(0)
    net = STUNet(1, 2, [1] * 6, [4, 8, 8, 8, 8, 8], [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3)
    return peft.apply(net, method)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float32 rounding (Inductor fuses and reorders the arithmetic)."""
    return bool((got - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["conv_adapter", "lora", "bitfit", "linear_probe"])
def test_ddp_trains_peft_models_without_unused_parameter_errors(process_group, method):
    ddp = torch.nn.parallel.DistributedDataParallel(_tiny(method))
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(1, 1, 8, 16, 16), torch.randint(0, 2, (1, 8, 16, 16))
    for _ in range(2):  # an unused trainable parameter would make the second step fail
        opt.zero_grad()
        out = ddp(x)
        sum(torch.nn.functional.cross_entropy(o, torch.nn.functional.interpolate(
            y[:, None].float(), size=o.shape[2:]).long()[:, 0]) for o in out).backward()
        opt.step()
    assert peft.unwrap(ddp) is ddp.module
    assert peft.trainable_summary(ddp).trainable == peft.trainable_summary(ddp.module).trainable
    assert set(peft.state_dict(ddp)) == set(peft.trained_parameter_names(ddp.module))


def test_compiled_peft_model_matches_eager_and_unwraps():
    net = _tiny("conv_adapter").eval()
    compiled = torch.compile(net)  # Inductor
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():  # as nnU-Net validates and predicts
        assert all(_close(a, b) for a, b in zip(compiled(x), net(x)))
    assert peft.unwrap(compiled) is net
    assert set(peft.target_parameters(compiled)) == set(peft.target_parameters(net))


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_memory_paths_train_under_ddp_and_compile_with_the_plain_gradients(process_group, checkpointing):
    from nnunet_tpp.models.lean import MemoryPaths, apply_memory_paths
    x, y = torch.randn(1, 1, 8, 16, 16), torch.randint(0, 2, (1, 8, 16, 16))

    def grads(net, dtype=torch.float32):
        net.zero_grad(set_to_none=True)
        out = net(x.to(dtype))
        sum(torch.nn.functional.cross_entropy(o, torch.nn.functional.interpolate(
            y[:, None].float(), size=o.shape[2:]).long()[:, 0]) for o in out).backward()
        return {n: p.grad.clone() for n, p in peft.unwrap(net).named_parameters() if p.requires_grad}

    def lean_net(dtype=torch.float32):
        net = _tiny("conv_adapter").to(dtype)
        apply_memory_paths(net, MemoryPaths(activation_checkpointing=checkpointing))
        return net

    plain64, lean64 = grads(_tiny("conv_adapter").double(), torch.float64), grads(lean_net(torch.float64),
                                                                                  torch.float64)
    for name in plain64:  # exact: float64 shows what float32 rounding hides
        assert (lean64[name] - plain64[name]).abs().max() <= 1e-10 * plain64[name].abs().max() + 1e-14, name
    lean = lean_net()
    eager = grads(lean)
    got = grads(torch.nn.parallel.DistributedDataParallel(lean))
    assert got.keys() == eager.keys()
    for name in eager:
        assert torch.allclose(got[name], eager[name], rtol=1e-5, atol=1e-7), name
    if checkpointing == "off":  # compiled without checkpointing (fullgraph, autocast): tests/models/test_inductor.py
        return
    # Inductor, as nnU-Net compiles (before wrapping DDP). Compared in float64: in float32 a bias gradient (a sum
    # over every voxel) that nearly cancels differs by reordering alone by more than any fixed share of its size;
    # float32 under autocast against a float64 reference is tests/models/test_inductor.py's job.
    got = grads(torch.compile(lean_net(torch.float64)), torch.float64)
    assert got.keys() == lean64.keys()
    for name in lean64:
        assert lean64[name].abs().max() > 0, name
        assert (got[name] - lean64[name]).abs().max() <= 1e-9 * lean64[name].abs().max() + 1e-14, name
