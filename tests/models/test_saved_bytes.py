"""What a training step keeps for the backward pass, counted with ``saved_tensors_hooks``: a property of the
autograd graph, not of the machine, so these are deterministic tests where a timing or a peak RSS could not be.
The memory paths keep no more than the plain path (float32 and bfloat16 autocast), keep half-precision tensors
under autocast (no up-cast to float32), and make Conv-Adapter cheaper than full fine-tuning by a stated margin."""
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.lean import MemoryPaths, apply_memory_paths
from nnunet_tpp.models.memory import bytes_kept_for_backward, tensors_kept_for_backward
from nnunet_tpp.models.stunet import STUNet, build_stunet

DTYPES = {"float32": None, "bfloat16 autocast": torch.bfloat16}
LEAN = {"lean norm/act (default)": MemoryPaths(), "lean norm/act + lean convs": MemoryPaths(lean_convs=True)}


def _micro(depth=1):
    """A very small STU-Net (6 stages, 5 poolings) with the trainers' CPU kernels (channels-last)."""
    torch.manual_seed(0)
    return _randomise_affine(STUNet(1, 3, [depth] * 6, [8, 16, 16, 16, 16, 16], [[2, 2, 2]] * 4 + [[1, 1, 1]],
                                    fast_cpu_kernels=True))


def _randomise_affine(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["conv_adapter", "lora", "bitfit"])
def test_the_lean_paths_never_keep_more_than_the_plain_path(method, dtype):
    x = torch.randn(2, 1, 16, 32, 32)
    plain = peft.apply(_micro(depth=2), method)
    kept_plain = bytes_kept_for_backward(plain, x, DTYPES[dtype])
    for label, paths in LEAN.items():
        lean = peft.apply(_micro(depth=2), method)
        apply_memory_paths(lean, paths)
        kept = bytes_kept_for_backward(lean, x, DTYPES[dtype])
        assert kept <= kept_plain, (label, kept, kept_plain)
        if method == "conv_adapter":  # where every block has a frozen norm + LeakyReLU, lean must save something
            assert kept < 0.9 * kept_plain, (label, kept, kept_plain)


@pytest.mark.parametrize("paths", [MemoryPaths(), MemoryPaths(lean_convs=True),
                                   MemoryPaths(lean_convs=True, activation_checkpointing="on")],
                         ids=["lean norm/act", "both levers", "both levers + checkpointing"])
def test_no_memory_path_up_casts_to_float32_under_autocast(paths):
    """Under bfloat16 autocast every activation-sized tensor the lean paths keep is bfloat16: the float32 ones are
    per-(sample, channel) statistics only (the input, which the caller holds anyway, and the parameters aside)."""
    net = peft.apply(_micro(), "conv_adapter")
    apply_memory_paths(net, paths)
    x = torch.randn(2, 1, 16, 32, 32)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert all(o.dtype == torch.bfloat16 for o in out)
        return out

    kept = tensors_kept_for_backward(run, [*net.parameters(), x])
    assert kept and sum(k.nbytes for k in kept if k.dtype == torch.bfloat16) > 0
    widest = max(m.num_features for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    for k in kept:
        if k.dtype != torch.bfloat16:
            numel = 1
            for s in k.shape:
                numel *= s
            assert k.dtype == torch.float32 and numel <= x.shape[0] * widest, k


def test_stunet_s_with_conv_adapter_keeps_at_most_two_thirds_of_full_fine_tuning():
    """STU-Net-S, Conv-Adapter with the default memory paths (lean norm/act) against full fine-tuning (plain), one
    sample of 32^3, float32, the trainers' CPU kernels: measured 0.639 (17.96 MB against 28.10 MB; the plain
    Conv-Adapter path keeps 1.036x of full fine-tuning's, so the memory paths are what makes it cheaper; at 64^3
    the fraction is 0.582). Bound: 0.67. The count is a property of the graph, not of the machine."""
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    kept = {}
    for method in ("full", "conv_adapter"):
        torch.manual_seed(0)
        net = peft.apply(build_stunet("S", 1, 3, fast_cpu_kernels=True), method)
        if method != "full":
            apply_memory_paths(net, MemoryPaths())
        kept[method] = bytes_kept_for_backward(net, x)
    assert kept["conv_adapter"] <= 0.67 * kept["full"], kept
