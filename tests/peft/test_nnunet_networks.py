"""Every CNN method on nnU-Net's own networks, through their description (no method names their attributes)."""
import copy

import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.sites import describe
from tests.models.test_nnunet_checkpoint import plain, resenc


@pytest.mark.parametrize("build", [plain, resenc])
def test_the_description_covers_every_convolution(build):
    net = build()
    sites = describe(net)
    convs = {n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))}
    assert {s.name for s in sites.convs} == convs
    assert all(s.norm and s.norm.endswith(".norm") for s in sites.convs if s.role == "block")
    assert {s.name for s in sites.select("head")} == {f"decoder.seg_layers.{i}" for i in range(2)}


@pytest.mark.parametrize("build", [plain, resenc])
def test_lora_with_upsampling_merges_into_the_same_network(build):
    net = peft.apply(build(), "lora", targets=["all", "upsample"], rank=2)
    assert any(type(m).__name__ == "LoRAConvTranspose3d" for m in net.modules())
    with torch.no_grad():
        for p in peft.target_parameters(net).values():
            p.normal_(std=0.05)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)[0]
        merged = peft.merge(copy.deepcopy(net))
        assert torch.allclose(merged(x)[0], before, atol=1e-4)
    assert set(merged.state_dict()) == set(build().state_dict())


@pytest.mark.parametrize("method,expected", [
    ("linear_probe", lambda n: n.startswith("decoder.seg_layers.")),
    # the norms' biases and the transposed convs' (they feed a concatenation, not a norm); the block convs' biases
    # are cancelled by the instance norm after them
    ("bitfit", lambda n: n.startswith("decoder.seg_layers.") or (n.endswith(".bias") and (
        ".norm." in n or "transpconvs" in n))),
])
def test_heads_and_biases_are_found_from_the_description(method, expected):
    net = peft.apply(plain(), method)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in net.named_parameters() if expected(n)}, trained ^ {
        n for n, _ in net.named_parameters() if expected(n)}
