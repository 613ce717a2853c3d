"""Every ViT PEFT method on every described transformer (timm's ViT; LiteMedSAM's TinyViT, a small one of its class):
its modules sit where the method's official code puts them (the file is named in each test), every target parameter
gets a gradient, frozen weights stay bit-identical through training steps, and the mergeable ones merge exactly.
Methods that need one token stream (VPT, EVP, DTL) refuse TinyViT with a clear error."""
import pytest
import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.models.transformer_sites import find_transformers
from nnunet_tpp.models.vit_heads import ViTClassifier
from nnunet_tpp.peft import PeftError
from tests.models.test_transformer_sites import tiny_vit, vit

METHODS = ["vpt", "ssf", "adapter", "adaptformer", "lora", "evp", "dtl", "apla", "partial", "bitfit",
           "linear_probe", "full"]
STREAM_ONLY = {"vpt", "evp", "dtl"}
OPTIONS = {"evp": {"scale_factor": 4}, "partial": {"quarter": 2}, "apla": {"rows": 4}}


class TinyViTClassifier(nn.Module):
    """A TinyViT (its stages and its neck on the 16 x 16 map; the class's own forward wants 256 px) + a linear
    head on the pooled features."""

    head_prefixes = ("head",)
    peft_defaults = {"lora": {"targets": ("q", "v")}}

    def __init__(self, classes: int = 3):
        super().__init__()
        self.encoder = tiny_vit()
        self.head = nn.Linear(256, classes)

    def forward(self, x):
        x = self.encoder.patch_embed(x)
        for layer in self.encoder.layers:
            x = layer(x)
        side = int(x.shape[1] ** 0.5)
        x = self.encoder.neck(x.transpose(1, 2).reshape(x.shape[0], -1, side, side))
        return self.head(x.mean(dim=(2, 3)))


def model(kind: str) -> nn.Module:
    return ViTClassifier(vit(), 3) if kind == "vit" else TinyViTClassifier()


def images(kind: str, batch: int = 2) -> torch.Tensor:
    size = 16 if kind == "vit" else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def settle(net: nn.Module, training: bool) -> nn.Module:
    """Training or eval mode; BatchNorms (TinyViT) always in eval mode (their statistics are not weights)."""
    net.train(training)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return net


def described(net):
    (prefix, module, description), = find_transformers(net)
    return module, description


def randomise(net):
    """Moves every trainable parameter off its (often zero) start, so that every factor gets a gradient."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


CASES = [(kind, m) for kind in ("vit", "tinyvit") for m in METHODS]


@pytest.mark.parametrize("kind,method", CASES)
def test_targets_get_gradients_frozen_weights_stay_and_merging_is_exact(kind, method):
    net = model(kind)
    if kind == "tinyvit" and method in STREAM_ONLY:
        with pytest.raises(PeftError, match="one token sequence.*TinyViT"):
            peft.apply(net, method, **OPTIONS.get(method, {}))
        return
    peft.apply(net, method, **OPTIONS.get(method, {}))
    settle(net, True)  # training mode: TinyViT's attention reads its bias table only then
    randomise(net)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable = [p for p in net.parameters() if p.requires_grad]
    x, y = images(kind, 4), torch.tensor([0, 1, 2, 1])
    nn.functional.cross_entropy(net(x), y).backward()
    named = dict(net.named_parameters())
    for name in peft.target_parameters(net):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    optimizer.step()
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)
    if peft.get_method(method).mergeable:
        settle(net, False)
        with torch.no_grad():
            before = net(x)
            after = peft.merge(net)(x)
        assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
        assert peft.target_parameters(net) == {}
        assert not any("lora" in n or "ssf" in n or "apla" in n for n, _ in net.named_parameters())


def _outputs(module: nn.Module, net: nn.Module, x: torch.Tensor) -> list:
    """What ``module`` returns in a forward pass of ``net`` (a hook registered now runs after the method's hooks)."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_adapter_after_attention_and_mlp_outputs(kind):
    """google-research/adapter-bert ``modeling.py``: ``feedforward_adapter`` on the output of the attention's dense
    projection and of the feed-forward's, before the residual sum: each sub-layer's output h becomes h + a(h)."""
    net = model(kind).eval()
    module, d = described(net)
    last = len(d.blocks) - 1
    parts = {"attn": module.get_submodule(d.block_part(last, d.layout.attention)),
             "mlp": module.get_submodule(d.block_part(last, d.layout.mlp))}
    x = images(kind)
    raw = {}
    for key, part in parts.items():
        part.register_forward_hook(lambda m, a, out, key=key: raw.setdefault(key, out.detach()))
    settle(peft.apply(net, "adapter"), False)
    randomise(net)
    block = module.get_submodule(d.blocks[last])
    for key, part in parts.items():
        seen = _outputs(part, net, x)[-1]
        adapter = getattr(block, f"adapter_{key}")
        with torch.no_grad():
            assert torch.allclose(seen, raw[key] + adapter(raw[key]), atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_adaptformer_beside_the_mlp(kind):
    """ShoufaChen/AdaptFormer ``models/vit_image.py`` (``ffn_option='parallel'``): the AdaptMLP reads the residual
    stream x entering the MLP sub-layer and its output is added to the block's output, beside the MLP branch."""
    net = model(kind).eval()
    module, d = described(net)
    i = len(d.blocks) - 1
    block, entry = module.get_submodule(d.blocks[i]), module.get_submodule(d.block_part(i, d.layout.mlp_input))
    x = images(kind)
    stream, raw = [], []
    entry.register_forward_pre_hook(lambda m, args: stream.append(args[0].detach()))
    block.register_forward_hook(lambda m, a, out: raw.append(out.detach()))
    settle(peft.apply(net, "adaptformer"), False)
    randomise(net)
    seen = _outputs(block, net, x)[-1]
    with torch.no_grad():
        assert torch.allclose(seen, raw[-1] + block.adapter_parallel(stream[-1]), atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_lora_adapts_the_q_and_v_rows_only(kind):
    """microsoft/LoRA ``loralib/layers.py`` ``MergedLinear`` (``enable_lora=[True, False, True]``, as LoRA's ViT
    experiments adapt W_q and W_v): a low-rank update on the q and v rows of the fused projection; timm stacks
    [q; k; v], TinyViT interleaves them per head."""
    net = settle(peft.apply(model(kind), "lora", rank=2), False)
    randomise(net)
    module, d = described(net)
    for i in range(len(d.blocks)):
        layer = module.get_submodule(d.block_part(i, d.layout.qkv))
        assert set(layer.lora_A) == {"q", "v"}
        tokens = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            delta = layer(tokens) - nn.functional.linear(tokens, layer.weight, layer.bias)
        changed = set(torch.nonzero(delta.abs().amax((0, 1)) > 0).flatten().tolist())
        assert changed == set(d.qkv_rows(i, "q").tolist()) | set(d.qkv_rows(i, "v").tolist())


def test_lora_on_whole_layers_is_hugging_face_peft():
    """Whole linear layers (``proj``, ``fc1``, ...) get Hugging Face peft's LoRA (``base_layer`` + ``lora_A.default``);
    merging gives the plain layer back with the update folded in."""
    from peft.tuners.lora import Linear as PeftLinear
    for kind in ("vit", "tinyvit"):
        net = settle(peft.apply(model(kind), "lora", targets=["proj", "fc1"]), False)
        module, d = described(net)
        assert isinstance(module.get_submodule(d.block_part(0, d.layout.attention_out)), PeftLinear)
        assert isinstance(module.get_submodule(d.block_part(0, d.layout.mlp_in[0])), PeftLinear)
        randomise(net)
        x = images(kind)
        with torch.no_grad():
            before = net(x)
            peft.merge(net)
            assert torch.allclose(net(x), before, atol=1e-5)
        assert type(module.get_submodule(d.block_part(0, d.layout.attention_out))) is nn.Linear


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_ssf_after_every_operation(kind):
    """dongzelian/SSF ``models/vision_transformer.py`` (``tuning_mode='ssf'``): scale and shift after the patch
    embedding, every norm, qkv, the attention projection, fc1, fc2 and the final norm; each output is x * g + b."""
    net = settle(peft.apply(model(kind), "ssf"), False)
    module, d = described(net)
    places = {n.rsplit(".", 1)[0] for n in peft.target_parameters(net)}
    prefix = "backbone." if kind == "vit" else "encoder."
    expected = {prefix + d.patch_embed_out} | {prefix + n for n in d.outer_norms} | {
        prefix + d.block_part(i, p) for i in range(len(d.blocks))
        for p in (*d.layout.norms, "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert places == expected
    layer = module.get_submodule(d.block_part(0, "mlp.fc1"))
    tokens = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        plain = nn.functional.linear(tokens, layer.weight, layer.bias)
        assert torch.allclose(layer(tokens), plain * layer.ssf_scale + layer.ssf_shift)


def test_vpt_prompts_enter_every_block_after_the_prefix():
    """KMnP/vpt ``src/models/vit_prompt/vit.py`` (``incorporate_prompt``, ``forward_deep_prompt``): prompts after
    the class token before block 0; VPT-Deep replaces them before every later block; removed before the head."""
    net = settle(peft.apply(model("vit"), "vpt", length=2), False)
    module, d = described(net)
    seen = []
    for name in d.blocks:
        module.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        tokens = module(images("vit"))
    assert all(torch.equal(s[:, 1:3], module.tuner.prompts[i].expand(2, -1, -1)) for i, s in enumerate(seen))
    assert tokens.shape[1] == 1 + 16


def test_evp_prompts_are_added_to_the_patch_tokens_before_every_block():
    """NiFangBaAGe/Explicit-Visual-Prompt ``vit_evp.py`` (``PromptGenerator``): before block i, the prompt of block
    i is added to the patch tokens (not to the class token)."""
    net = settle(peft.apply(model("vit"), "evp", scale_factor=4), False)
    randomise(net)
    module, d = described(net)
    raw = net.backbone.embed(images("vit")).detach()
    seen = []
    module.get_submodule(d.blocks[0]).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        net(images("vit"))
    assert torch.equal(seen[0][:, 0], raw[:, 0]) and not torch.allclose(seen[0][:, 1:], raw[:, 1:])


def test_dtl_side_network_adds_from_block_m_on():
    """heekhero/DTL ``models/vision_transformer.py``: the side network reads every block's input; its activated
    output is added to the outputs of blocks M..depth-1 only (M = depth / 2)."""
    net = settle(peft.apply(model("vit"), "dtl"), False)
    randomise(net)
    module, d = described(net)
    changed = []
    for i, name in enumerate(d.blocks):
        block = module.get_submodule(name)
        block.register_forward_hook(lambda m, a, out, i=i: changed.append((i, torch.equal(out, m.__class__.forward(
            m, *a)))))
    with torch.no_grad():
        net(images("vit"))
    assert [i for i, same in changed if not same] == [2, 3]


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_apla_replaces_rows_of_the_attention_projection(kind):
    """MoeinSorkhei/APLA ``src/apla/apla_vit.py``: a random subset of the rows of every attention output projection
    trains, nothing else of the backbone."""
    net = settle(peft.apply(model(kind), "apla", rows=4), False)
    module, d = described(net)
    trained = {n for n in peft.trained_parameter_names(net) if not n.startswith("head.")}
    prefix = "backbone." if kind == "vit" else "encoder."
    assert trained == {prefix + d.block_part(i, f"attn.proj.{p}") for i in range(len(d.blocks))
                       for p in ("apla_weight", "apla_bias")}


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_partial_trains_one_quarter_of_the_described_blocks(kind):
    """Khan & Fang (fine-tuning a quarter of the blocks): quarter 2 of the described blocks, whole blocks."""
    net = peft.apply(model(kind), "partial", quarter=2)
    module, d = described(net)
    prefix = "backbone." if kind == "vit" else "encoder."
    n = len(d.blocks)
    assert set(net.peft_config.trained_modules) == {prefix + d.blocks[i] for i in range(n // 4, 2 * n // 4)}
