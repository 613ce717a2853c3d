"""Conv-Adapter as its official code builds it by default (one adapter per residual block, beside the block's first
k x k convolution, Kaiming-initialised), its options, and files written by nnunet_tpp 0.1."""
import itertools

import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.nnunet_networks import prepare_unet
from nnunet_tpp.peft import PeftError
from nnunet_tpp.peft.conv_adapter import ConvAdapterConv3d


def _blocks(net):
    return [m for m in net.modules() if type(m).__name__ == "ResidualBlock"]


def test_default_is_one_adapter_per_residual_block_beside_its_first_conv(tiny_stunet):
    net = peft.apply(tiny_stunet("B"), "conv_adapter")
    blocks = _blocks(net)
    assert len(blocks) == 11  # 6 encoder + 5 decoder stages, depth 1
    for block in blocks:
        assert isinstance(block.conv1, ConvAdapterConv3d) and type(block.conv2) is torch.nn.Conv3d
        adapter, c_in = block.conv1.adapter, block.conv1.in_channels
        width = adapter.down.out_channels
        assert width == max(1, c_in // 8) or c_in % max(1, c_in // 8)
        assert adapter.down.groups == width and adapter.down.stride == block.conv1.stride
        assert adapter.down.kernel_size == (3, 3, 3) and adapter.up.kernel_size == (1, 1, 1)
        assert adapter.up.out_channels == block.conv1.out_channels
        assert adapter.up.bias is None  # the instance norm after conv1 would cancel it
        assert torch.equal(adapter.scale, torch.ones_like(adapter.scale))
        assert adapter.up.weight.abs().sum() > 0 and adapter.down.weight.abs().sum() > 0  # Kaiming, not zero
    assert not any("norm" in n for n in peft.target_parameters(net))
    assert peft.trainable_summary(net).percent < 0.5


def test_kaiming_fan_out_initialisation_like_the_official_code():
    torch.manual_seed(0)
    from nnunet_tpp.peft.conv_adapter import ConvAdapter
    adapter = ConvAdapter(256, 256, 8, 3, 1, 3)
    fan_out = adapter.up.weight.shape[0]  # out channels x 1x1x1
    assert adapter.up.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
    assert torch.equal(adapter.down.bias, torch.zeros_like(adapter.down.bias))


def _grads(net, x):
    net.zero_grad(set_to_none=True)
    out = net(x)
    sum(o.square().mean() + o[:, :1].mean() for o in out).backward()
    return {n: p.grad for n, p in net.named_parameters() if n in peft.target_parameters(net)}


@pytest.mark.parametrize("targets,init,join", list(itertools.product(
    [("first",), ("all",), ("conv1", "conv3")], ["kaiming", "zero"], ["before_norm", "after_act"])))
def test_no_option_combination_leaves_a_parameter_that_cannot_learn(micro_stunet, targets, init, join):
    net = peft.apply(micro_stunet(depth=2), "conv_adapter", targets=targets, init=init, join=join)
    x = torch.randn(2, 1, 32, 32, 32)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    moved = {n: p.detach().clone() for n, p in peft.target_parameters(net).items()}
    for _ in range(2):  # a zero-initialised up-projection gives its down-projection a gradient from step 2
        grads = _grads(net, x)
        opt.step()
    assert all(g is not None for g in grads.values())
    if init == "kaiming":  # a zero-started up-projection passes its down-projection only a small first gradient
        scale = max(g.abs().max() for g in grads.values())
        dead = [n for n, g in grads.items() if g.abs().max() <= 1e-6 * scale]
        assert not dead, dead
    assert [n for n, p in peft.target_parameters(net).items() if torch.equal(p, moved[n])] == []


def test_join_after_activation_adds_after_the_norm_and_keeps_a_live_bias(micro_stunet):
    net = peft.apply(micro_stunet(), "conv_adapter", join="after_act", init="zero")
    block = _blocks(net)[1]
    assert block.conv1.adapter.up.bias is not None
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x)[0].clone()
        block.conv1.adapter.up.bias.fill_(1.0)  # a constant added after the norm changes the output
        assert not torch.allclose(net(x)[0], before)


def test_every_default_target_tensor_gets_a_gradient_in_the_first_step(tiny_stunet):
    net = peft.apply(tiny_stunet("S"), "conv_adapter")
    grads = _grads(net, torch.randn(1, 1, 32, 32, 32))
    scale = max(g.abs().max() for g in grads.values())
    assert len(grads) == 44 and all(g.abs().max() > 1e-6 * scale for g in grads.values())


def test_bad_options_are_clear_errors(tiny_stunet):
    with pytest.raises(PeftError, match="init must be one of kaiming, zero"):
        peft.apply(tiny_stunet(), "conv_adapter", init="xavier")
    with pytest.raises(PeftError, match="join must be one of before_norm, after_act"):
        peft.apply(tiny_stunet(), "conv_adapter", join="inside")
    with pytest.raises(PeftError, match="no convolution of STUNet matches targets"):
        peft.apply(tiny_stunet(), "conv_adapter", targets=["conv7"])


def test_files_of_version_0_1_load_with_the_options_they_were_made_with(tmp_path, micro_stunet):
    old_options = {"reduction": 8, "kernel_size": 3, "targets": ("conv1", "conv2"), "zero_init": True}
    net = peft.apply(micro_stunet(seed=2), "conv_adapter", **old_options)
    assert net.peft_config.options["init"] == "zero" and net.peft_config.options["targets"] == ("conv1", "conv2")
    with torch.no_grad():
        for p in peft.target_parameters(net).values():
            p.normal_(std=0.1)
    weights = peft.state_dict(net)
    # a 0.1 file also held the 1x1 bias that the norm cancelled, and stored the old option names
    legacy = {**weights, **{n.replace("up.weight", "up.bias"): torch.randn(w.shape[0])
                            for n, w in weights.items() if n.endswith("adapter.up.weight")}}
    torch.save({"format": "nnunet_tpp.peft/1", "method": "conv_adapter", "options": old_options,
                "architecture": "STUNet-micro", "state_dict": legacy}, tmp_path / "old.pth")
    same = peft.apply(micro_stunet(seed=2), "conv_adapter", targets=["conv1", "conv2"], init="zero")
    peft.load(same, tmp_path / "old.pth")
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(same(x)[0], net(x)[0], atol=1e-5)
    default = peft.apply(micro_stunet(seed=2), "conv_adapter")
    with pytest.raises(PeftError, match=r"targets: \['conv1', 'conv2'\], init: zero.*targets: \['first'\], "
                                        r"init: kaiming"):
        peft.load(default, tmp_path / "old.pth")
    # nnU-Net's predictor loads whole state dicts: the cancelled bias is dropped there too
    full = {k: v for k, v in net.state_dict().items()}
    full.update({k: v for k, v in legacy.items() if k.endswith("up.bias")})
    same.load_state_dict(full)


def test_adapters_attach_to_nnunet_networks_through_their_description():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    torch.manual_seed(0)
    net = prepare_unet(ResidualEncoderUNet(
        input_channels=1, num_classes=2, n_stages=3, features_per_stage=(8, 16, 32), conv_op=torch.nn.Conv3d,
        kernel_sizes=3, strides=(1, 2, 2), n_blocks_per_stage=(1, 2, 2), n_conv_per_stage_decoder=(1, 1),
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True))
    peft.apply(net, "conv_adapter")
    adapted = sorted(n for n, m in net.named_modules() if isinstance(m, ConvAdapterConv3d))
    # the stem, every BasicBlockD (beside conv1) and every decoder stage; nnU-Net holds each layer twice
    assert adapted == ["decoder.stages.0.convs.0.conv", "decoder.stages.1.convs.0.conv", "encoder.stages.0.blocks.0.conv1.conv",
                       "encoder.stages.1.blocks.0.conv1.conv", "encoder.stages.1.blocks.1.conv1.conv",
                       "encoder.stages.2.blocks.0.conv1.conv", "encoder.stages.2.blocks.1.conv1.conv",
                       "encoder.stem.convs.0.conv"]
    block = net.encoder.stages[1].blocks[0].conv1
    assert block.all_modules[0] is block.conv  # the forward path uses the adapted conv
    grads = _grads(net, torch.randn(2, 1, 16, 16, 16))
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
