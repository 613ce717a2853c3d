"""STU-Net with Conv-Adapter and the memory paths compiled by Inductor (``torch.compile`` with its default backend,
as nnU-Net compiles its network) under float16 autocast, as nnU-Net trains on a GPU; here on the CPU.

The lean autograd functions trace into one graph (``fullgraph=True`` fails on any graph break), and the compiled
step gives the outputs and the gradients of the eager step to the rounding of float16: both are compared against a
float64 reference, and the compiled step must be as close to it as eager autocast is (Inductor keeps intermediate
values in float32 inside its fused kernels, so it rounds differently, not worse). float16 rather than bfloat16:
with bfloat16's 8-bit mantissa a tiny random network's gradients carry errors of 10-60 % whatever runs them, too
much noise for a comparison to mean anything.
The float32 compile against eager, with and without activation checkpointing, is in
``tests/trainers/test_wrappers.py``."""
import copy

import torch

from nnunet_tpp import peft
from nnunet_tpp.models.lean import MemoryPaths, apply_memory_paths
from nnunet_tpp.models.stunet import STUNet

POOLS = [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3  # downsampling and upsampling compiled, few distinct kernels to build


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (num / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def test_inductor_compiles_the_lean_paths_in_one_graph_and_matches_eager_under_autocast():
    """Measured (relative L2 error against float64): outputs 0.14 % compiled vs 0.15 % eager, gradients 0.65 % vs
    1.31 %; bounds 1.5x and 1.25x the eager errors."""
    torch.manual_seed(0)
    net = STUNet(1, 2, [1] * 6, [8] * 6, POOLS)
    with torch.no_grad():  # norms that are not the identity, so that the lean backward's inverse affine is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    peft.apply(net, "conv_adapter")
    reference_net = copy.deepcopy(net).double()
    apply_memory_paths(net, MemoryPaths(lean_convs=True))  # both levers, so both autograd functions are traced
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))

    def step(model, params_of, inp, autocast=True):
        params_of.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = model(inp)
            loss = sum(o.double().square().mean() + o[:, :1].double().mean() for o in out)
        loss.backward()
        return ([o.detach() for o in out],
                {n: p.grad.clone() for n, p in params_of.named_parameters() if p.requires_grad})

    ref_out, ref_grads = step(reference_net, reference_net, x.double(), autocast=False)
    eager_out, eager_grads = step(net, net, x)
    compiled = torch.compile(net, fullgraph=True)  # Inductor; fullgraph: a graph break is an error
    out, grads = step(compiled, net, x)
    assert [o.dtype for o in out] == [o.dtype for o in eager_out] == [torch.float16] * len(out)
    assert grads.keys() == eager_grads.keys() == ref_grads.keys()
    out_err = {name: max(_rel({0: a}, {0: b}) for a, b in zip(o, ref_out))
               for name, o in (("eager", eager_out), ("compiled", out))}
    grad_err = {"eager": _rel(eager_grads, ref_grads), "compiled": _rel(grads, ref_grads)}
    assert grad_err["eager"] > 1e-4  # float16 rounding is visible, so the comparison means something
    assert out_err["compiled"] <= 1.5 * out_err["eager"] + 2 ** -11, out_err
    assert grad_err["compiled"] <= 1.25 * grad_err["eager"], grad_err
