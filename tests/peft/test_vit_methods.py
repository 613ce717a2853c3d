"""The ViT PEFT methods (VPT, SSF, Adapter, AdaptFormer, LoRA on linear layers, EVP, DTL, APLA, partial,
and the generic ones) on a tiny ViT: they run, train exactly what they should, count, start as the
pre-trained network where zero-initialised, merge where mergeable and save/load."""
import pytest
import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.models.vit import build_vit
from nnunet_tpp.models.vit_heads import ViTClassifier, ViTSegmenter
from nnunet_tpp.peft import PeftError

D, DEPTH, CLASSES = 48, 4, 3
VIT_METHODS = ["vpt", "ssf", "adapter", "adaptformer", "lora", "evp", "dtl", "apla", "partial", "bitfit",
               "linear_probe", "full"]
OPTIONS = {"evp": {"scale_factor": 4}, "partial": {"quarter": 2}}  # random ViTs: auto has no pre-training
# what each method trains besides the head, by parameter name (classifier: backbone.<timm name>)
TRAINS = {
    "vpt": lambda n: n == "backbone.tuner.prompts",
    "ssf": lambda n: n.endswith((".ssf_scale", ".ssf_shift")),
    "adapter": lambda n: ".adapter_attn." in n or ".adapter_mlp." in n or ".norm" in n,  # + every LayerNorm
    "adaptformer": lambda n: ".adapter_parallel." in n,
    "lora": lambda n: ".attn.qkv.lora_" in n,
    "evp": lambda n: n.startswith("backbone.tuner."),
    "dtl": lambda n: n.startswith("backbone.tuner."),
    "apla": lambda n: n.endswith((".attn.proj.apla_weight", ".attn.proj.apla_bias")),
    "partial": lambda n: n.startswith(("backbone.blocks.1.",)),
    "bitfit": lambda n: n.endswith(".bias"),
    "linear_probe": lambda n: False,
    "full": lambda n: True,
}


def vit(depth=DEPTH, seed=0):
    torch.manual_seed(seed)
    return build_vit("vit_tiny", img_size=32, patch_size=4, in_chans=1, depth=depth, embed_dim=D, num_heads=3)


def classifier(depth=DEPTH, seed=0):
    backbone = vit(depth, seed)
    return ViTClassifier(backbone, CLASSES)


def segmenter(seed=0):
    backbone = vit(seed=seed)
    return ViTSegmenter(backbone, CLASSES, feature_size=8)


def image(batch=2, seed=1):
    return torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registry_flags():
    names = set(peft.methods())
    assert set(VIT_METHODS) | {"conv_adapter"} <= names
    for name in ("vpt", "ssf", "adapter", "adaptformer", "lora", "evp", "dtl"):
        assert peft.get_method(name).adds_parameters, name
    for name in ("apla", "partial", "bitfit", "linear_probe", "full"):
        assert not peft.get_method(name).adds_parameters, name
    for name in ("lora", "ssf", "bitfit", "apla", "linear_probe", "full", "partial"):
        assert peft.get_method(name).mergeable, name
    for name in ("vpt", "adapter", "adaptformer", "evp", "dtl"):
        assert not peft.get_method(name).mergeable, name
        with pytest.raises(PeftError, match=f"{name} cannot be merged"):
            peft.merge(peft.apply(classifier(), name, **OPTIONS.get(name, {})))


@pytest.mark.parametrize("method", VIT_METHODS)
def test_forward_on_classifier_and_segmenter(method):
    x = image()
    cls = peft.apply(classifier(), method, **OPTIONS.get(method, {}))
    seg = peft.apply(segmenter(), method, **OPTIONS.get(method, {}))
    assert cls(x).shape == (2, CLASSES)
    assert seg(x).shape == (2, CLASSES, 32, 32)
    tokens = cls.backbone(x)
    assert tokens.shape == (2, 1 + 64, D)  # prompt tokens are stripped
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])  # MAE-style visible patches
    assert cls.backbone.forward_features(x, keep=keep)[0].shape == (2, 17, D)


@pytest.mark.parametrize("method", VIT_METHODS)
def test_training_changes_exactly_the_trained_parameters(method):
    net = peft.apply(classifier(), method, **OPTIONS.get(method, {}))
    expected = {n for n, _ in net.named_parameters() if TRAINS[method](n) or n.startswith("head.")}
    trained = set(peft.trained_parameter_names(net))
    assert trained == expected
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    x, y = image(4), torch.tensor([0, 1, 2, 1])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    after = dict(net.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= expected and all(after[n].grad is None for n in set(before) - expected)
    own = {n for n in expected if not n.startswith("head.")}
    assert own == set() or changed & own, "the method's own parameters did not train"
    if method not in ("bitfit", "full"):  # some biases get exactly zero gradient (softmax ignores k's bias)
        assert changed == expected


def test_trainable_counts():
    head = D * CLASSES + CLASSES
    r, m, rows, length = 4, 16, 8, 5
    counts = {
        ("lora", (("rank", r),)): DEPTH * 2 * r * (D + D),
        ("lora", (("rank", r), ("targets", ("fc1",)))): DEPTH * r * (D + 4 * D),
        ("adapter", (("bottleneck", m), ("train_norms", False))): DEPTH * 2 * (D * m + m + m * D + D),
        ("adaptformer", (("bottleneck", m),)): DEPTH * (D * m + m + m * D + D),
        ("vpt", (("length", length), ("deep", False))): length * D,
        ("vpt", (("length", length), ("deep", True))): DEPTH * length * D,
        ("apla", (("rows", rows),)): DEPTH * rows * (D + 1),
        ("apla", (("rows", rows), ("bias", False))): DEPTH * rows * D,
        ("apla", (("rows", "all"),)): DEPTH * D * (D + 1),
        ("dtl", (("rank", 2),)): DEPTH * 2 * 2 * D,
        ("ssf", ()): 2 * (D + DEPTH * (D + 3 * D + D + D + 4 * D + D) + D),
        ("evp", (("scale_factor", 4),)): (D * 12 + 12) + (16 * 12 + 12) + DEPTH * (12 * 12 + 12) + (12 * D + D),
    }
    norms = (2 * DEPTH + 1) * 2 * D  # norm1 + norm2 of every block and the output norm, weight + bias
    for (method, options), count in counts.items():
        summary = peft.trainable_summary(peft.apply(classifier(), method, **dict(options)))
        assert summary.trainable == count + head, (method, options)
        if method == "adapter":  # the official default also trains the LayerNorms (not target parameters)
            with_norms = peft.trainable_summary(peft.apply(classifier(), method, bottleneck=m))
            assert (with_norms.trainable, with_norms.target) == (count + norms + head, count)
        assert summary.heads == head
        assert summary.target == (0 if method == "apla" else count), (method, options)
        plain_total = sum(p.numel() for p in classifier().parameters())
        added = 0 if method == "apla" else count  # APLA's rows replace existing rows: the size is unchanged
        assert summary.total == plain_total + added, (method, options)


@pytest.mark.parametrize("method,options", [("adapter", {"init": "zero_up"}), ("adaptformer", {}), ("lora", {}),
                                            ("lora", {"targets": ["fc1", "proj", "k"]}), ("dtl", {})])
def test_zero_initialised_methods_start_as_the_plain_model(method, options):
    x = image()
    plain, adapted = classifier(seed=3).eval(), peft.apply(classifier(seed=3), method, **options).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted(x), atol=1e-6)
    seg_plain, seg = segmenter(seed=3).eval(), peft.apply(segmenter(seed=3), method, **options).eval()
    with torch.no_grad():
        assert torch.allclose(seg_plain(x), seg(x), atol=1e-5)


def _randomise(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method,options", [("lora", {"rank": 4, "alpha": 8}), ("lora", {"targets": ["fc1"]}),
                                            ("lora", {"targets": ["q", "k", "v", "proj", "fc2"]}),
                                            ("ssf", {}), ("bitfit", {}), ("apla", {}), ("apla", {"rows": -1}),
                                            ("partial", {"quarter": 2})])
def test_merge_gives_a_plain_model_with_the_same_outputs(method, options):
    x = image()
    plain = classifier(seed=5)
    net = peft.apply(classifier(seed=5), method, **options)
    _randomise(net)
    net.eval()
    with torch.no_grad():
        before = net(x)
        peft.merge(net)
        after = net(x)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert list(net.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert all(type(m).__module__.startswith(("torch.", "timm.", "nnunet_tpp.models")) for m in net.modules())
    assert peft.target_parameters(net) == {}


def test_apla_rows_are_seeded_stored_and_survive_save_and_load(tmp_path):
    net = peft.apply(classifier(), "apla", rows=8, seed=7)
    index = net.backbone.blocks[0].attn.proj.apla_index
    assert index.shape == (8,) and "backbone.blocks.0.attn.proj.apla_index" in net.state_dict()
    assert not torch.equal(index, net.backbone.blocks[1].attn.proj.apla_index)  # drawn per block
    other_seed = peft.apply(classifier(), "apla", rows=8, seed=8)
    assert not torch.equal(index, other_seed.backbone.blocks[0].attn.proj.apla_index)
    _randomise(net)
    peft.save(net, tmp_path / "apla.pth")
    fresh = peft.apply(classifier(), "apla", rows=8, seed=7)
    peft.load(fresh, tmp_path / "apla.pth")
    for a, b in zip(net.backbone.blocks, fresh.backbone.blocks):
        assert torch.equal(a.attn.proj.apla_index, b.attn.proj.apla_index)
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(net(image()), fresh(image()))
    # frozen rows of the projection are untouched; the merged weight differs only in the chosen rows
    plain_w = classifier().backbone.blocks[0].attn.proj.weight
    merged = peft.merge(fresh).backbone.blocks[0].attn.proj.weight
    differs = (merged != plain_w).any(dim=1).nonzero().flatten()
    assert set(differs.tolist()) <= set(index.tolist())


def test_partial_trains_one_quarter_of_the_blocks(tiny_stunet):
    net = peft.apply(classifier(depth=8), "partial", quarter=2)
    blocks = {int(n.split(".")[2]) for n in peft.trained_parameter_names(net) if n.startswith("backbone.blocks.")}
    assert blocks == {2, 3}
    assert {n for n in peft.trained_parameter_names(net) if not n.startswith("backbone.blocks.")} == \
        {"head.weight", "head.bias"}
    assert peft.trainable_summary(net).heads == D * CLASSES + CLASSES
    last = peft.apply(classifier(depth=8), "partial", quarter=4)
    assert {int(n.split(".")[2]) for n in peft.trained_parameter_names(last) if ".blocks." in n} == {6, 7}
    with pytest.raises(PeftError, match="quarter must be 1, 2, 3, 4 or auto"):
        peft.apply(classifier(), "partial", quarter=5)
    with pytest.raises(PeftError, match="adapts Vision Transformers.*STUNet"):
        peft.apply(tiny_stunet(), "partial", quarter=2)


def _block_inputs(net, x):
    """The input of every block of ``net.backbone`` in one forward pass (hooks registered after the method's)."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for b in net.backbone.blocks]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return seen


def test_vpt_places_and_strips_prompts():
    x = image()
    net = peft.apply(classifier(), "vpt", length=3, deep=False).eval()
    tuner = net.backbone.tuner
    inputs = _block_inputs(net, x)
    tokens = net.backbone.embed(x)
    assert inputs[0].shape[1] == 1 + 3 + 64 and all(i.shape[1] == 1 + 3 + 64 for i in inputs)
    assert torch.equal(inputs[0][:, 1:4], tuner.prompts[0].expand(2, -1, -1))
    assert torch.equal(inputs[0][:, :1], tokens[:, :1]) and torch.equal(inputs[0][:, 4:], tokens[:, 1:])
    assert net.backbone(x).shape == (2, 1 + 64, D)  # stripped after the last block
    bound = (6 / (3 * 4 * 4 + D)) ** 0.5
    assert tuner.prompts.abs().max() <= bound
    deep = peft.apply(classifier(), "vpt", length=3, deep=True).eval()
    replaced = _block_inputs(deep, x)
    assert all(torch.equal(replaced[i][:, 1:4], deep.backbone.tuner.prompts[i].expand(2, -1, -1)) for i in range(4))
    assert replaced[2].shape[1] == 1 + 3 + 64


def test_errors_are_clear(tiny_stunet):
    with pytest.raises(PeftError, match=r"unknown option\(s\) \['depth'\] for PEFT method 'vpt'"):
        peft.apply(classifier(), "vpt", depth=3)
    for method in ("vpt", "ssf", "adapter", "adaptformer", "evp", "dtl", "apla"):
        with pytest.raises(PeftError, match=f"'{method}' adapts Vision Transformers.*STUNet"):
            peft.apply(tiny_stunet(), method)
    with pytest.raises(PeftError, match="slices of a fused attention projection"):
        peft.apply(tiny_stunet(), "lora", targets=["q", "v"])
    with pytest.raises(PeftError, match="not both"):
        peft.apply(classifier(), "lora", targets=["qkv", "q"])
    with pytest.raises(PeftError, match="no convolution named.*nor a linear layer"):
        peft.apply(classifier(), "lora", targets=["fc9"])
    with pytest.raises(PeftError, match="rows=100 exceeds"):
        peft.apply(classifier(), "apla", rows=100)
    with pytest.raises(PeftError, match="rows must be"):
        peft.apply(classifier(), "apla", rows=0)
    with pytest.raises(PeftError, match="mask_rate"):
        peft.apply(classifier(), "evp", mask_rate=1.5)
    with pytest.raises(PeftError, match="start_block 4 is not a block"):
        peft.apply(classifier(), "dtl", start_block=4)
    with pytest.raises(PeftError, match="bottleneck must be a positive integer"):
        peft.apply(classifier(), "adapter", bottleneck=0)


def test_lora_on_linear_layers_and_stunet_convs_share_one_entry(tiny_stunet):
    net = peft.apply(classifier(), "lora", rank=2, targets=["q", "v", "proj"])
    qkv, proj = net.backbone.blocks[0].attn.qkv, net.backbone.blocks[0].attn.proj
    assert set(qkv.lora_A) == {"q", "v"} and proj.lora_A["default"].weight.shape == (2, D)  # proj: HF peft's
    assert type(net.backbone.patch_embed.proj) is nn.Conv2d  # a bare "proj" leaves the patch embedding alone
    embed = peft.apply(classifier(), "lora", targets=["patch_embed.proj"])
    assert hasattr(embed.backbone.patch_embed.proj, "lora_A")
    # a LoRA on the k slice changes only the k rows of the fused projection's output
    only_k = peft.apply(classifier(), "lora", targets=["k"])
    layer = only_k.backbone.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["k"].weight.normal_()
        tokens = torch.randn(2, 5, D)
        delta = layer(tokens) - nn.functional.linear(tokens, layer.weight, layer.bias)
    assert delta[..., :D].abs().max() == 0 and delta[..., 2 * D:].abs().max() == 0
    assert delta[..., D:2 * D].abs().max() > 0
    conv = peft.apply(tiny_stunet(), "lora")  # STU-Net keeps its conv defaults
    assert any(".lora_A." in n for n in peft.target_parameters(conv))


def test_methods_adapt_every_backbone_of_a_combined_classifier():
    from nnunet_tpp.models.vit_combine import CombinedClassifier
    x = image()
    for method in ("vpt", "ssf", "apla", "partial"):
        net = peft.apply(CombinedClassifier([vit(seed=1), vit(seed=2)], CLASSES), method, **OPTIONS.get(method, {}))
        names = peft.trained_parameter_names(net)
        assert any(n.startswith("backbones.0.") for n in names) and any(n.startswith("backbones.1.") for n in names)
        assert net(x).shape == (2, CLASSES)


def test_ssf_and_evp_follow_the_papers():
    net = peft.apply(classifier(depth=2), "ssf")
    scales = torch.cat([p for n, p in net.named_parameters() if n.endswith("ssf_scale")])
    assert abs(scales.mean().item() - 1) < 0.01 and 0.01 < scales.std().item() < 0.03
    wrapped = {n.rsplit(".", 1)[0] for n, _ in net.named_parameters() if n.endswith("ssf_scale")}
    assert wrapped == {"backbone.patch_embed.proj", "backbone.norm"} | {
        f"backbone.blocks.{i}.{m}" for i in range(2) for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                                 "mlp.fc1", "mlp.fc2")}
    from nnunet_tpp.peft.evp import high_frequency
    flat = torch.ones(1, 1, 16, 16)
    assert high_frequency(flat, 0.25).abs().max() < 1e-6  # a constant image has no high frequencies
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1
    assert high_frequency(edge, 0.25).abs().max() > 0.1


@pytest.mark.parametrize("method", ["vpt", "ssf", "adapter", "adaptformer", "lora", "evp", "dtl", "apla"])
def test_under_ibot_masking_the_hidden_pixels_do_not_reach_the_output(method):
    """What a masked-token objective relies on: the tokens cannot see the pixels of the masked patches (EVP's
    frequency branch filters the whole image, so it must hide them itself)."""
    net = peft.apply(classifier(), method, **OPTIONS.get(method, {})).eval()
    backbone = net.backbone
    masked = torch.zeros(2, 64, dtype=torch.bool)
    masked[:, 18:22] = True  # patches (2, 2)-(2, 5): rows 8-11, columns 8-23
    x = image()
    y = x.clone()
    y[..., 8:12, 8:24] = torch.randn(2, 1, 4, 16)
    token = torch.zeros(1, 1, D)
    with torch.no_grad():
        a = backbone.forward_features(x, masked=masked, mask_token=token)[0]
        b = backbone.forward_features(y, masked=masked, mask_token=token)[0]
        assert torch.equal(a, b)
        assert not torch.equal(backbone.forward_features(x)[0], backbone.forward_features(y)[0])


# ---- the four methods as their official code (issue 14) ----

def test_adapter_is_houlsby_by_default_and_keeps_the_old_variant_as_options():
    from nnunet_tpp.models.vit_checkpoint import medcoss_config
    torch.manual_seed(0)
    net = peft.apply(classifier(), "adapter")
    adapters = [m for b in net.backbone.blocks for m in (b.adapter_attn, b.adapter_mlp)]
    assert len(adapters) == 2 * DEPTH and all(a.down.weight.shape == (64, D) for a in adapters)
    weights = torch.cat([w.flatten() for a in adapters for w in (a.down.weight, a.up.weight)])
    assert weights.abs().max() <= 2e-3 and 0.8e-3 < weights.std() < 1.0e-3  # N(0, 1e-3) truncated at 2 std
    assert all(torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0 for a in adapters)
    norms = {n for n, m in net.backbone.named_modules() if isinstance(m, nn.LayerNorm)}
    assert len(norms) == 2 * DEPTH + 1
    trained = set(peft.trained_parameter_names(net))
    assert {n.rsplit(".", 1)[0] for n in trained if ".adapter_" not in n and not n.startswith("head.")} == \
        {f"backbone.{n}" for n in norms}
    assert set(peft.target_parameters(net)) == {n for n in trained if ".adapter_" in n}  # TPP: adapters only
    frozen = peft.apply(classifier(), "adapter", train_norms=False)
    assert {n for n in peft.trained_parameter_names(frozen) if ".adapter_" not in n} == {"head.weight", "head.bias"}
    old = peft.apply(classifier(), "adapter", init="zero_up").backbone.blocks[0].adapter_attn
    assert torch.count_nonzero(old.up.weight) == 0 and old.down.weight.abs().max() > 0.05
    medcoss = peft.apply(ViTClassifier(build_vit(medcoss_config(img_size=32, patch_size=4, embed_dim=D, depth=2,
                                                                num_heads=3)), 2), "adapter")
    assert {n for n in peft.trained_parameter_names(medcoss) if "norm" in n} == {
        "backbone.norm_pre.weight", "backbone.norm_pre.bias"} | {
        f"backbone.blocks.{i}.{m}.{p}" for i in range(2) for m in ("norm1", "norm2") for p in ("weight", "bias")}
    for bad, match in (({"init": "xavier"}, "init must be"), ({"init_scale": 0}, "init_scale"),
                       ({"train_norms": "yes"}, "train_norms")):
        with pytest.raises(PeftError, match=match):
            peft.apply(classifier(), "adapter", **bad)


@pytest.mark.parametrize("pretraining,quarter", [("mae", 3), ("dino", 2), ("dinov2", 2), ("path_dino", 2)])
def test_partial_auto_picks_the_quarter_from_each_checkpoint_format(tmp_path, pretraining, quarter):
    """Khan & Fang: the 3rd quarter after restorative SSL, the 2nd after contrastive; the format given to the
    loader (or found in the file) decides; an explicit quarter always wins. (MedCoSS, with its own layout:
    tests/models/test_vit_checkpoint.py.)"""
    from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint
    path = tmp_path / "backbone.pth"
    torch.save(vit(depth=8).state_dict(), path)
    backbone = vit(depth=8, seed=1)
    load_vit_checkpoint(backbone, path, fmt=pretraining)
    net = peft.apply(ViTClassifier(backbone, CLASSES), "partial")
    assert net.peft_config.options == {"quarter": "auto"}
    blocks = {int(n.split(".")[2]) for n in peft.trained_parameter_names(net) if ".blocks." in n}
    assert blocks == set(range((quarter - 1) * 2, quarter * 2))
    explicit = peft.apply(ViTClassifier(backbone, CLASSES), "partial", quarter=4)
    assert {int(n.split(".")[2]) for n in peft.trained_parameter_names(explicit) if ".blocks." in n} == {6, 7}


def test_partial_auto_without_a_known_pre_training_is_a_clear_error(tmp_path):
    from nnunet_tpp.models.vit_checkpoint import checkpoint_pretraining, load_vit_checkpoint, save_vit_checkpoint
    with pytest.raises(PeftError, match=r"unknown \(random initialisation.*quarter=N.*--backbone-format"):
        peft.apply(classifier(), "partial")
    supervised = tmp_path / "supervised.pth"
    torch.save({**vit().state_dict(), "head.weight": torch.zeros(5, D)}, supervised)  # a plain timm checkpoint
    for fmt in ("auto", "timm"):
        assert checkpoint_pretraining(supervised, fmt) is None
        backbone = vit()
        load_vit_checkpoint(backbone, supervised, fmt=fmt)
        with pytest.raises(PeftError, match="quarter auto"):
            peft.apply(ViTClassifier(backbone, CLASSES), "partial")
    # what the file itself says: an MAE decoder, a DINO teacher, a recorded pre-training
    mae = tmp_path / "mae.pth"
    torch.save({"model": {**vit().state_dict(), "decoder_embed.weight": torch.zeros(8, D)}}, mae)
    dino = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit().state_dict().items()}, "student": {}}, dino)
    ours = tmp_path / "ours.pth"
    save_vit_checkpoint(vit(), ours, pretraining="dinov2")
    assert [checkpoint_pretraining(p) for p in (mae, dino, ours)] == ["mae", "dino", "dinov2"]
    combined_parts = [vit(seed=1), vit(seed=2)]
    load_vit_checkpoint(combined_parts[0], mae)
    load_vit_checkpoint(combined_parts[1], dino)
    from nnunet_tpp.models.vit_combine import CombinedClassifier
    net = peft.apply(CombinedClassifier(combined_parts, CLASSES), "partial")  # each backbone its own quarter
    assert net.peft_config.trained_modules == ("backbones.0.blocks.2", "backbones.1.blocks.1")


def _evp_features(net, x):
    """The EVP tuner's summed features for image ``x``, read through its hooks' inputs."""
    vit_, tuner = net.backbone, net.backbone.tuner
    tuner.read_hook(vit_.patch_embed, (x,), vit_.patch_embed(x))
    return tuner.features(vit_.embed(x))


def test_evp_embedding_tune_reads_the_patch_embeddings_before_the_position_embedding():
    x = image()
    net = peft.apply(classifier(), "evp", scale_factor=4).eval()
    vit_, tuner = net.backbone, net.backbone.tuner
    from nnunet_tpp.peft.evp import high_frequency
    with torch.no_grad():
        hand = tuner.handcrafted_generator(high_frequency(x, tuner.mask_rate)).flatten(2).transpose(1, 2)
        expected = hand + tuner.embedding_generator(vit_.patch_embed(x).reshape(2, 64, D))  # official: no position
        feature = _evp_features(net, x)
        assert torch.allclose(feature, expected, atol=1e-6)
        inputs = _block_inputs(net, x)
        prompt = tuner.shared_mlp(tuner.lightweight_mlps[0](feature))
        assert torch.allclose(inputs[0][:, 1:], vit_.embed(x)[:, 1:] + prompt, atol=1e-6)  # before block 0
        before = net(x)
        vit_.pos_embed.add_(1.0)  # the prompts do not depend on the position embedding...
        assert torch.equal(_evp_features(net, x), feature) and not torch.equal(net(x), before)
    old = peft.apply(classifier(), "evp", scale_factor=4, embedding_input="tokens").eval()  # the variant
    with torch.no_grad():
        tokens = old.backbone.embed(x)
        hand = old.backbone.tuner.handcrafted_generator(high_frequency(x, 0.25)).flatten(2).transpose(1, 2)
        assert torch.allclose(_evp_features(old, x), hand + old.backbone.tuner.embedding_generator(tokens[:, 1:]),
                              atol=1e-6)
    with pytest.raises(PeftError, match="embedding_input"):
        peft.apply(classifier(), "evp", embedding_input="pixels")


def test_vpt_dropout_is_drawn_per_sample():
    net = peft.apply(classifier(), "vpt", length=6, dropout=0.5, deep=False)
    tuner, x = net.backbone.tuner, torch.zeros(8, 65, D)
    torch.manual_seed(0)
    prompts = tuner.insert_hook(None, (x,))[0][:, 1:7]
    kept = prompts != 0
    assert not all(torch.equal(kept[0], kept[i]) for i in range(1, 8))  # another mask per sample
    assert torch.allclose(prompts[kept], (2 * tuner.prompts[0].expand(8, -1, -1))[kept])
    tuner.eval()
    assert torch.equal(tuner.insert_hook(None, (x,))[0][:, 1:7], tuner.prompts[0].expand(8, -1, -1))
    assert peft.get_method("vpt").parse_options({}) == peft.get_method("vpt").options(length=10, deep=True)
