"""Each PEFT method adds, freezes and trains exactly what it should (on STU-Net)."""
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.peft import PeftError


def _names(net):
    return set(dict(net.named_parameters()))


def test_registry_lists_the_3d_methods():
    assert {"conv_adapter", "lora", "bitfit", "linear_probe", "full"} <= set(peft.methods())
    with pytest.raises(PeftError, match="unknown PEFT method 'adapterz'.*conv_adapter"):
        peft.apply(torch.nn.Linear(2, 2), "adapterz")


@pytest.mark.parametrize("method,trained", [
    ("full", lambda n: True),
    ("linear_probe", lambda n: n.startswith("seg_outputs.")),
    # the block convs' biases are cancelled by the instance norm after them: they stay frozen
    ("bitfit", lambda n: (n.endswith(".bias") and not n.endswith(("conv1.bias", "conv2.bias")))
     or n.startswith("seg_outputs.")),
    ("conv_adapter", lambda n: ".adapter." in n or n.startswith("seg_outputs.")),
    ("lora", lambda n: ".lora_" in n or n.startswith("seg_outputs.")),
])
def test_apply_freezes_everything_the_method_does_not_train(tiny_stunet, method, trained):
    plain = _names(tiny_stunet())
    net = peft.apply(tiny_stunet(), method)
    for name, p in net.named_parameters():
        assert p.requires_grad == trained(name), name
    targets = set(peft.target_parameters(net))
    assert targets == _names(net) - plain  # exactly the parameters the method added
    summary = peft.trainable_summary(net)
    assert summary.trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert str(summary).startswith(f"trainable parameters: {summary.trainable} of {summary.total} (")


@pytest.mark.parametrize("method,options", [("conv_adapter", {"init": "zero"}), ("lora", {})])
def test_new_parameters_that_start_at_zero_leave_the_pretrained_network(tiny_stunet, method, options):
    x = torch.randn(1, 1, 32, 32, 32)
    plain, adapted = tiny_stunet(seed=3), peft.apply(tiny_stunet(seed=3), method, **options)
    with torch.no_grad():
        for a, b in zip(plain(x), adapted(x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_unknown_or_invalid_options_are_clear_errors(tiny_stunet):
    with pytest.raises(PeftError, match=r"unknown option\(s\) \['gamma'\].*reduction"):
        peft.apply(tiny_stunet(), "conv_adapter", gamma=4)
    with pytest.raises(PeftError, match="rank must be >= 1"):
        peft.apply(tiny_stunet(), "lora", rank=0)
    with pytest.raises(PeftError, match="no convolution of STUNet matches targets"):
        peft.apply(tiny_stunet(), "lora", targets=["conv9"])
    net = peft.apply(tiny_stunet(), "bitfit")
    with pytest.raises(PeftError, match="already has PEFT method 'bitfit'"):
        peft.apply(net, "lora")


@pytest.mark.parametrize("method", ["conv_adapter", "lora", "bitfit"])
def test_training_changes_only_trainable_parameters(micro_stunet, method):
    net = peft.apply(micro_stunet(), method)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-2)
    x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 32, 32, 32))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x)[0], y).backward()
        opt.step()
    params = dict(net.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(params[n].grad is None for n in frozen)
    assert any(not torch.equal(params[n], v) for n, v in trained.items() if ".adapter." in n or ".lora_" in n
               or method == "bitfit")


def test_adapter_only_state_dict_round_trip(tmp_path, tiny_stunet):
    net = peft.apply(tiny_stunet(seed=1), "conv_adapter")
    with torch.no_grad():
        for p in peft.target_parameters(net).values():
            p.normal_()
    peft.save(net, tmp_path / "a.pth")
    weights = peft.state_dict(net)
    assert set(weights) == set(peft.target_parameters(net)) | {n for n in weights if n.startswith("seg_outputs.")}
    fresh = peft.apply(tiny_stunet(seed=1), "conv_adapter")
    meta = peft.load(fresh, tmp_path / "a.pth")
    assert meta["method"] == "conv_adapter" and meta["architecture"] == "STUNet-S"
    for name, value in peft.state_dict(fresh).items():
        assert torch.equal(value, weights[name])
    other = peft.apply(tiny_stunet(seed=1), "conv_adapter", reduction=4)
    with pytest.raises(PeftError, match=r"do not fit this model: method conv_adapter \{reduction: 8.*reduction: 4"):
        peft.load(other, tmp_path / "a.pth")
    lora = peft.apply(tiny_stunet(), "lora")
    with pytest.raises(PeftError):
        peft.load(lora, tmp_path / "a.pth")


def test_lora_merges_into_a_plain_network_with_the_same_outputs(tiny_stunet):
    plain = tiny_stunet(seed=5)
    net = peft.apply(tiny_stunet(seed=5), "lora", rank=4, alpha=8)
    with torch.no_grad():
        for p in peft.target_parameters(net).values():
            p.normal_(std=0.05)
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x)[0]
        peft.merge(net)
        after = net(x)[0]
    assert torch.allclose(before, after, atol=1e-4)
    assert set(net.state_dict()) == set(plain.state_dict())
    assert type(net.conv_blocks_context[0][0].conv1) is torch.nn.Conv3d
    assert peft.target_parameters(net) == {}


def test_conv_adapter_merge_is_a_clear_error(tiny_stunet):
    with pytest.raises(PeftError, match="conv_adapter cannot be merged"):
        peft.merge(peft.apply(tiny_stunet(), "conv_adapter"))
    assert peft.merge(peft.apply(tiny_stunet(), "bitfit")).peft_config.merged
