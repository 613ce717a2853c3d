"""Every transformer PEFT method on nnU-Net's Primus (EVA blocks, separate q/k/v, SwiGLU MLP, rotary positions),
through the same ``peft.apply`` / ``target_parameters`` / ``merge`` / adapter-only save and load as on the 2-D ViTs:
modules where the method's official code puts them (the file is named in each test), every target parameter gets a
gradient once the zero-initialised halves have moved, frozen weights stay bit-identical, mergeable methods merge
exactly; EVP (a 2-D FFT) refuses a 3-D Primus."""
import pytest
import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.models.primus_sites import describe_primus
from nnunet_tpp.peft import PeftError
from tests.models.test_primus_sites import primus

METHODS = ["lora", "adapter", "adaptformer", "bitfit", "ssf", "vpt", "apla", "partial", "dtl", "linear_probe", "full"]
OPTIONS = {"partial": {"quarter": 2}, "apla": {"rows": 4}, "vpt": {"length": 3}, "dtl": {"rank": 2}}


def headed(net: nn.Module) -> nn.Module:
    """The decoder is the task head (as :func:`nnunet_tpp.models.primus.prepare_primus` sets)."""
    net.head_prefixes = ("up_projection",)
    return net


def volumes(batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.randn(batch, 1, side, side, side, generator=torch.Generator().manual_seed(1))


def labels(batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.randint(0, 3, (batch, side, side, side), generator=torch.Generator().manual_seed(3))


def randomise(net: nn.Module) -> None:
    """Moves every trainable parameter off its (often zero) start, so that every factor gets a gradient."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), labels(x.shape[0], x.shape[-1]))


@pytest.mark.parametrize("version,method", [("V1", m) for m in METHODS] + [("V3", "ssf")])
def test_targets_get_gradients_frozen_weights_stay_and_merging_is_exact(version, method):
    torch.manual_seed(0)
    net = headed(primus(version, depth=4))
    peft.apply(net, method, **OPTIONS.get(method, {}))
    net.train()
    randomise(net)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable = [p for p in net.parameters() if p.requires_grad]
    x = volumes()
    loss(net, x).backward()
    named = dict(net.named_parameters())
    assert peft.target_parameters(net) or not peft.get_method(method).adds_parameters
    for name in peft.trained_parameter_names(net):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    optimizer.step()
    for _ in range(2):
        optimizer.zero_grad()
        loss(net, x).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)
    if not peft.get_method(method).mergeable:
        return
    net.eval()
    with torch.no_grad():
        before = net(x)
        if version == "V3" and method == "ssf":  # the scale after a stem that sums four convolutions folds nowhere
            with pytest.raises(PeftError, match="down_projection .*PatchEmbedDeeperControlled.*unmerged"):
                peft.merge(net)
            assert torch.equal(net(x), before)
            return
        after = peft.merge(net)(x)
    assert (before - after).abs().max() < 1e-5
    assert peft.target_parameters(net) == {}
    assert not any("lora" in n or "ssf" in n or "apla" in n for n, _ in net.named_parameters())


def test_done_when_primus_takes_lora_and_adapter_and_lora_merges_exactly():
    """The issue's network (192 dims, depth 4, 32^3; 4 heads: EVA's 3-D rotary embedding refuses 3 heads, 192 / 3
    / 1.5 is no integer): LoRA and Adapter train a few percent of the transformer, every target parameter gets a
    gradient, and LoRA's merged output equals the unmerged one."""
    from dynamic_network_architectures.architectures.primus import Primus
    with pytest.raises(AssertionError, match="rope dim"):
        Primus(1, 192, (8, 8, 8), 3, 4, 3, (32, 32, 32))
    for method, share in (("lora", 0.02), ("adapter", 0.12)):
        torch.manual_seed(0)
        net = Primus(1, 192, (8, 8, 8), 3, 4, 4, (32, 32, 32))
        peft.apply(net, method)
        assert net.peft_config.options.get("targets", ("q", "v")) == ("q", "v")
        targets = peft.target_parameters(net)
        summary = peft.trainable_summary(net)
        assert 0 < summary.trainable <= share * summary.total, summary
        randomise(net)
        x = volumes(1, 32)
        loss(net, x).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in targets.values())
        if method == "lora":
            net.eval()
            with torch.no_grad():
                before = net(x)
                after = peft.merge(net)(x)
            assert (before - after).abs().max() < 1e-4


def test_lora_adapts_q_and_v_with_hugging_face_peft_and_starts_as_the_backbone():
    """microsoft/LoRA (W_q and W_v, as LoRA's experiments; B initialised at zero, loralib ``reset_parameters``):
    Primus's separate ``q_proj`` / ``v_proj`` are whole layers, so peft's LoRA wraps them; k and the rest stay plain."""
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    plain = headed(primus()).eval()
    net = headed(primus())
    net.load_state_dict(plain.state_dict())
    peft.apply(net, "lora", rank=2)
    d = describe_primus(plain)
    for i in range(len(d.blocks)):
        assert isinstance(net.get_submodule(d.block_part(i, "attn.q_proj")), PeftLinear)
        assert isinstance(net.get_submodule(d.block_part(i, "attn.v_proj")), PeftLinear)
        assert type(net.get_submodule(d.block_part(i, "attn.k_proj"))) is nn.Linear
        assert type(net.get_submodule(d.block_part(i, "attn.proj"))) is nn.Linear
    assert all(torch.count_nonzero(p) == 0 for n, p in peft.target_parameters(net).items() if ".lora_B." in n)
    with torch.no_grad():
        assert torch.equal(net.eval()(volumes()), plain(volumes()))


def _outputs(module: nn.Module, net: nn.Module, x: torch.Tensor) -> list:
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen


def test_adapter_after_the_attention_and_mlp_outputs_before_layer_scale():
    """google-research/adapter-bert ``feedforward_adapter`` on each sub-layer's output before the residual sum: on
    an EVA block, on ``attn`` (after ``attn.proj``) and ``mlp`` (after ``mlp.fc2``), before ``gamma_1`` / ``gamma_2``."""
    net = headed(primus()).eval()
    d = describe_primus(net)
    block = net.get_submodule(d.blocks[-1])
    raw = {}
    for key in ("attn", "mlp"):
        getattr(block, key).register_forward_hook(lambda m, a, out, key=key: raw.setdefault(key, out.detach()))
    peft.apply(net, "adapter").eval()
    randomise(net)
    for key in ("attn", "mlp"):
        seen = _outputs(getattr(block, key), net, volumes())[-1]
        with torch.no_grad():
            assert torch.allclose(seen, raw[key] + getattr(block, f"adapter_{key}")(raw[key]), atol=1e-6)
    trained = set(net.peft_config.trained_modules)
    assert f"{d.blocks[0]}.attn.norm" in trained and f"{d.blocks[0]}.mlp.norm" in trained and "eva.norm" in trained


def test_adaptformer_reads_the_stream_entering_norm2_and_adds_to_the_block_output():
    """ShoufaChen/AdaptFormer ``models/vit_image.py`` (parallel): the AdaptMLP reads x entering the MLP sub-layer
    (EVA's ``norm2``) and its output joins the block output beside the MLP branch."""
    net = headed(primus()).eval()
    d = describe_primus(net)
    block = net.get_submodule(d.blocks[-1])
    stream, raw = [], []
    block.norm2.register_forward_pre_hook(lambda m, args: stream.append(args[0].detach()))
    block.register_forward_hook(lambda m, a, out: raw.append(out.detach()))
    peft.apply(net, "adaptformer").eval()
    randomise(net)
    seen = _outputs(block, net, volumes())[-1]
    with torch.no_grad():
        assert torch.allclose(seen, raw[-1] + block.adapter_parallel(stream[-1]), atol=1e-6)


def test_ssf_after_every_operation_of_the_eva_blocks():
    """dongzelian/SSF (``tuning_mode='ssf'``): after the patch embedding, every norm, the attention's projections
    (here q, k, v separately), its output projection, the MLP's projections (both SwiGLU inputs) and the final norm."""
    net = peft.apply(headed(primus()), "ssf")
    d = describe_primus(net)
    places = {n.rsplit(".", 1)[0] for n in peft.target_parameters(net)}
    parts = ("norm1", "norm2", "attn.norm", "mlp.norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
             "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")
    assert places == {"down_projection.proj", "eva.norm"} | {f"{b}.{p}" for b in d.blocks for p in parts}


def test_vpt_prompts_follow_the_registers_unrotated_and_leave_before_the_final_norm():
    """KMnP/vpt (``incorporate_prompt``, ``forward_deep_prompt``): prompts after the prefix tokens (Primus's
    registers) before every block, gone after the last. The official prompts join after the position embedding, so
    they carry no position: under EVA's rotary embedding they are unrotated prefix tokens."""
    torch.manual_seed(0)
    net = peft.apply(headed(primus(registers=2)), "vpt", length=3).eval()
    d = describe_primus(net)
    assert all(net.get_submodule(name).num_prefix_tokens == 2 + 3 for name in d.rotary_prefix)
    seen = []
    for name in d.blocks:
        net.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    normed = []
    net.eva.norm.register_forward_pre_hook(lambda m, args: normed.append(args[0].shape))
    with torch.no_grad():
        net(volumes())
    assert all(torch.equal(s[:, 2:5], net.tuner.prompts[i].expand(2, -1, -1)) for i, s in enumerate(seen))
    assert normed == [torch.Size([2, 2 + 8, 24])]


def test_evp_refuses_a_3d_primus():
    with pytest.raises(PeftError, match="evp works on 2-D images.*Primus is a 3-D transformer"):
        peft.apply(headed(primus()), "evp")


def test_apla_trains_rows_of_the_attention_projection_only():
    net = peft.apply(headed(primus()), "apla", rows=4)
    d = describe_primus(net)
    trained = {n for n in peft.trained_parameter_names(net) if not n.startswith("up_projection.")}
    assert trained == {f"{b}.attn.proj.{p}" for b in d.blocks for p in ("apla_weight", "apla_bias")}


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_adapter_only_weights_round_trip(tmp_path, method):
    torch.manual_seed(0)
    backbone = headed(primus()).state_dict()
    net = headed(primus())
    net.load_state_dict(backbone)
    peft.apply(net, method)
    randomise(net)
    peft.save(net, tmp_path / "adapter.pt")
    again = headed(primus())
    again.load_state_dict(backbone)
    peft.apply(again, method)
    peft.load(again, tmp_path / "adapter.pt")
    with torch.no_grad():
        assert torch.equal(net.eval()(volumes()), again.eval()(volumes()))
    assert set(torch.load(tmp_path / "adapter.pt", weights_only=True)["state_dict"]) == set(
        peft.trained_parameter_names(net))
