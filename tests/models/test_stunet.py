import json

import pytest
import torch

from nnunet_tpp.models.stunet import STUNet, build_stunet, plan_pool_sizes
from tests.conftest import REFERENCE, require


def _relative_error(outputs, reference) -> float:
    """max |ours - theirs| / max |theirs| over the deep-supervision outputs (shapes must match)."""
    assert len(outputs) == len(reference)
    assert all(o.shape == r.shape for o, r in zip(outputs, reference))
    return max(float((o.double() - r.double()).abs().max() / r.abs().max()) for o, r in zip(outputs, reference))


def test_matches_published_forward_pass():
    """The reference was computed in float32, so it carries float32 rounding of its own: our float64 forward
    pass (the same on every CPU) differs from it by up to 1.2e-5 of each output's range (8e-5 absolute). Our
    float32 pass lands within 1e-5 absolute on the Intel machine that made the reference and within ~1.7e-5 of
    the range on AMD EPYC, where oneDNN rounds differently. A wrong layer, slope or weight mapping moves the
    outputs by 1e-3 or more (LeakyReLU slope 0.0101 instead of 0.01: 1.8e-2)."""
    ref = torch.load(require(REFERENCE / "stunet_parity_tiny.pt"), weights_only=True)
    c = ref["config"]
    net = STUNet(c["input_channels"], c["num_classes"], c["depth"], c["dims"], c["pool_op_kernel_sizes"], True)
    net.load_state_dict(ref["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        assert _relative_error(net(ref["input"]), ref["outputs"]) < 5e-5
        assert _relative_error(net.double()(ref["input"].double()), ref["outputs"]) < 2e-5


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_state_dict_layout_is_the_published_one(size):
    ref = json.loads(require(REFERENCE / f"stunet_keys_{size}.json").read_text())
    with torch.device("meta"):
        net = build_stunet(size, 1, 105)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: shape for k, shape in ref["state_dict"]}
    assert sum(p.numel() for p in net.parameters()) == ref["n_params"]


def test_deep_supervision_outputs_highest_resolution_first():
    net = build_stunet("S", 1, 3, [[2, 2, 2]] * 4 + [[1, 2, 2]])
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        outs = net(x)
        assert [tuple(o.shape[2:]) for o in outs] == [(32, 64, 64), (16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4)]
        net.decoder.deep_supervision = False
        single = net(x)
    assert torch.equal(single, outs[0])


def test_plan_pool_sizes_are_cut_or_padded_to_five():
    assert plan_pool_sizes([[1, 1, 1], [2, 2, 2], [1, 2, 2]]) == [[2, 2, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    seven = [[1, 1, 1]] + [[2, 2, 2]] * 6
    assert plan_pool_sizes(seven) == [[2, 2, 2]] * 5


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown STU-Net size 'XL'"):
        build_stunet("XL", 1, 2)


def test_fast_cpu_kernels_give_the_same_network_up_to_float_rounding():
    ref = torch.load(require(REFERENCE / "stunet_parity_tiny.pt"), weights_only=True)
    c = ref["config"]
    net = STUNet(c["input_channels"], c["num_classes"], c["depth"], c["dims"], c["pool_op_kernel_sizes"], True,
                 fast_cpu_kernels=True)
    net.load_state_dict(ref["state_dict"])
    net.eval()
    with torch.no_grad():
        outputs = net(ref["input"])
    for ours, theirs in zip(outputs, ref["outputs"]):
        assert torch.allclose(ours, theirs, atol=2e-3, rtol=1e-3)
    assert net.conv_blocks_context[0][0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    for key, value in ref["state_dict"].items():  # the layout changed, the values did not
        assert torch.equal(net.state_dict()[key], value)
