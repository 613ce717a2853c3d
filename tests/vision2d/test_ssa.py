"""Self-supervised adaptation (ESSA): DINOv2 through a mergeable PEFT method, merged back into a plain ViT, or
through one that cannot merge, whose parameters the supervised run starts from."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from nnunet_tpp.models.vit import build_vit
from nnunet_tpp.vision2d.config import Train2dConfig
from nnunet_tpp.vision2d.ssa import (BACKBONE_FILE, PLOT_FILE, STATE_FILE, SSABackbone, build_ssa, carry_ssa_parameters,
                                     run_ssa)
from nnunet_tpp.vision2d.ssa_settings import SSAError, check_ssa_run, ssa_settings
from tests.conftest import SHARED, require

DATA = SHARED / "data" / "2d" / "pneumoniamnist_balanced.npz"
TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=4, embed_dim=48, num_heads=3)
SMALL_HEAD = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64}


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("vit_tiny", **TINY)


@pytest.fixture(scope="module")
def images():
    from nnunet_tpp.vision2d.data import load_dataset
    splits = load_dataset(require(DATA), "cls", 32, seed=0)
    train = getattr(splits, "train_plain", splits.train)
    return Subset(train, range(512))


def make_cfg(tmp_path, method="apla", epochs=3, supervised="adapter", **options) -> Train2dConfig:
    return Train2dConfig(task="cls", data=require(DATA), out=tmp_path, arch="vit_tiny", img_size=32, patch_size=4,
                         ssa="dinov2", ssa_method=method, ssa_epochs=epochs, amp=False, seed=0, method=supervised,
                         ssa_options={**SMALL_HEAD, "batch_size": 32, **options})


@pytest.fixture(scope="module")
def apla_run(images, tmp_path_factory):
    """One short SSA run with APLA (all rows of every attn.proj) on 512 real images."""
    work = tmp_path_factory.mktemp("ssa")
    before = tiny_vit()
    backbone = tiny_vit()
    lines = []
    result = run_ssa(backbone, images, make_cfg(work, iterations_per_epoch=6), work / "ssa", torch.device("cpu"),
                     lines.append)
    return before, backbone, result, work / "ssa", lines


def test_loss_decreases_on_real_images(apla_run):
    _, _, result, _, lines = apla_run
    losses = result["losses"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert result["history"][-1]["dino"] < result["history"][0]["dino"]
    assert sum("SSA epoch" in line for line in lines) == 3


def test_result_is_a_plain_vit_with_only_attention_projections_changed(apla_run, images):
    before, backbone, result, work, _ = apla_run
    fresh = tiny_vit(1)
    assert [n for n, _ in backbone.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert set(backbone.state_dict()) == set(fresh.state_dict())
    assert getattr(backbone, "peft_config", None) is None
    assert all(type(b.attn.proj) is nn.Linear for b in backbone.blocks)
    assert all(p.requires_grad for p in backbone.parameters())
    new, old = backbone.state_dict(), before.state_dict()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(".attn.proj." in k for k in changed)
    x = torch.stack([images[i][0] for i in range(4)])
    with torch.no_grad():
        assert not torch.allclose(before(x), backbone(x))
    assert (work / BACKBONE_FILE).exists() and (work / PLOT_FILE).exists() and not (work / STATE_FILE).exists()
    assert {"images_per_s", "peak_memory_mb", "memory_kind", "trainable_params", "total_params",
            "losses"} <= set(result)
    assert result["trainable_params"] == 4 * (48 * 48 + 48) and result["images_per_s"] > 0


def test_a_finished_stage_is_reused(apla_run, images, tmp_path):
    _, adapted, result, work, _ = apla_run
    backbone, lines = tiny_vit(), []
    again = run_ssa(backbone, images, make_cfg(work.parent, iterations_per_epoch=6), work, torch.device("cpu"),
                    lines.append)
    assert again["reused"] and again["losses"] == result["losses"]
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), adapted.state_dict().values()))
    assert any("reusing" in line for line in lines)
    with pytest.raises(SSAError, match="other settings"):  # the same folder with another recipe
        run_ssa(tiny_vit(), images, make_cfg(work.parent, epochs=4), work, torch.device("cpu"), lines.append)


def test_apla_changes_only_the_chosen_rows(images, tmp_path):
    before, backbone = tiny_vit(), tiny_vit()
    cfg = make_cfg(tmp_path, epochs=1, batch_size=16, iterations_per_epoch=4, method_options={"rows": 4, "seed": 3})
    run_ssa(backbone, images, cfg, tmp_path / "ssa", torch.device("cpu"), lambda _: None)
    probe = SSABackbone(tiny_vit())
    from nnunet_tpp import peft
    peft.apply(probe, "apla", rows=4, seed=3)
    for i, (new, old) in enumerate(zip(backbone.blocks, before.blocks)):
        rows = probe.backbone.blocks[i].attn.proj.apla_index
        others = torch.ones(48, dtype=torch.bool)
        others[rows] = False
        w_new, w_old = new.attn.proj.weight.detach(), old.attn.proj.weight.detach()
        assert torch.equal(w_new[others], w_old[others])
        assert torch.equal(new.attn.proj.bias[others], old.attn.proj.bias[others])
        assert not torch.equal(w_new[rows], w_old[rows])
    old_state, new_state = before.state_dict(), backbone.state_dict()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state if ".attn.proj." not in k)


def test_full_trains_everything_and_apla_the_projections():
    settings = ssa_settings(SMALL_HEAD)
    vit = tiny_vit()
    total = sum(p.numel() for p in vit.parameters())
    full = build_ssa(vit, "full", settings, torch.device("cpu"))
    assert full.summary.trainable == full.summary.total == total
    assert full.student.mask_token.requires_grad
    apla = build_ssa(vit, "apla", settings, torch.device("cpu"))
    assert apla.summary.trainable == 4 * (48 * 48 + 48) and apla.summary.total == total
    assert not apla.student.mask_token.requires_grad
    some_rows = build_ssa(vit, "apla", ssa_settings({**SMALL_HEAD, "method_options": {"rows": 8}}),
                          torch.device("cpu"))
    assert some_rows.summary.trainable == 4 * 8 * (48 + 1)
    assert all(type(b.attn.proj) is nn.Linear for b in vit.blocks)  # the passed backbone is untouched


def test_methods_that_cannot_merge_fail_before_training(images, tmp_path):
    for method, match in (("adapter", "cannot be merged"), ("linear_probe", "trains nothing"), ("nope", "unknown"),
                          ("conv_adapter", "does not adapt a ViT")):
        with pytest.raises(ValueError, match=match):
            run_ssa(tiny_vit(), images, make_cfg(tmp_path, method=method, supervised="lora"), tmp_path / "ssa",
                    torch.device("cpu"))
    carried = dict(method="vpt", supervised="vpt")
    with pytest.raises(SSAError, match="options must be the supervised ones"):
        run_ssa(tiny_vit(), images, make_cfg(tmp_path, method_options={"length": 4}, **carried), tmp_path / "ssa",
                torch.device("cpu"))
    with pytest.raises(SSAError, match="leave out tpp"):
        check_ssa_run(dataclasses.replace(make_cfg(tmp_path, **carried), tpp="mae"))
    with pytest.raises(SSAError, match="unknown ssa_options"):
        run_ssa(tiny_vit(), images, make_cfg(tmp_path, bogus=1), tmp_path / "ssa", torch.device("cpu"))
    assert not (tmp_path / "ssa").exists()


def test_an_interrupted_stage_resumes_to_the_same_weights(images, tmp_path):
    small = Subset(images, range(64))
    cfg = make_cfg(tmp_path, epochs=2, batch_size=16, method_options={"rows": 8}, iterations_per_epoch=4)

    def stop_after_first_epoch(line: str) -> None:
        if "SSA epoch 1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ssa(tiny_vit(), small, cfg, tmp_path / "a", torch.device("cpu"), stop_after_first_epoch)
    assert (tmp_path / "a" / STATE_FILE).exists() and not (tmp_path / "a" / BACKBONE_FILE).exists()
    lines = []
    resumed, straight = tiny_vit(), tiny_vit()
    result = run_ssa(resumed, small, cfg, tmp_path / "a", torch.device("cpu"), lines.append)
    assert any("resuming after epoch 1" in line for line in lines) and len(result["losses"]) == 2
    run_ssa(straight, small, cfg, tmp_path / "b", torch.device("cpu"), lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))


def test_a_method_that_cannot_merge_is_carried_into_the_supervised_run(images, tmp_path):
    """VPT: SSA trains the prompts, the backbone stays as it was, the supervised VPT starts from those prompts."""
    from nnunet_tpp import peft
    from nnunet_tpp.models.vit_heads import ViTClassifier
    before, backbone, lines = tiny_vit(), tiny_vit(), []
    cfg = make_cfg(tmp_path, method="vpt", supervised="vpt", epochs=1, batch_size=16, iterations_per_epoch=3)
    result = run_ssa(backbone, images, cfg, tmp_path / "ssa", torch.device("cpu"), lines.append)
    assert result["merged"] is False and any("go on into the supervised run" in line for line in lines)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), backbone.state_dict().values()))
    saved = torch.load(tmp_path / "ssa" / BACKBONE_FILE, weights_only=True)["target_parameters"]
    again = tiny_vit()
    assert run_ssa(again, images, cfg, tmp_path / "ssa", torch.device("cpu"), lambda _: None)["reused"]
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), again.state_dict().values()))
    fresh = peft.apply(ViTClassifier(backbone, 2), "vpt")
    assert set(saved) == set(peft.target_parameters(fresh))
    assert not all(torch.equal(p, saved[n]) for n, p in peft.target_parameters(fresh).items())
    assert carry_ssa_parameters(fresh, tmp_path / "ssa", lines.append) == len(saved)
    assert all(torch.equal(p, saved[n]) for n, p in peft.target_parameters(fresh).items())
    with pytest.raises(SSAError, match="holds SSA-trained vpt"):
        carry_ssa_parameters(peft.apply(ViTClassifier(tiny_vit(), 2), "vpt", length=4), tmp_path / "ssa")
    merged_run = tmp_path / "apla"
    run_ssa(tiny_vit(), images, make_cfg(merged_run, epochs=1, batch_size=16, iterations_per_epoch=1), merged_run,
            torch.device("cpu"), lambda _: None)
    assert carry_ssa_parameters(peft.apply(ViTClassifier(tiny_vit(), 2), "adapter"), merged_run) == 0


def test_train2d_runs_ssa_through_vpt_then_vpt_from_the_carried_prompts(tmp_path):
    from nnunet_tpp.vision2d.train import run_train2d
    cfg = dataclasses.replace(make_cfg(tmp_path / "run", method="vpt", supervised="vpt", epochs=1, batch_size=16,
                                       iterations_per_epoch=2),
                              arch_options={"depth": 2, "embed_dim": 48, "num_heads": 3}, epochs=1, batch_size=128)
    lines = []
    metrics = run_train2d(cfg, log=lines.append, progress=False)
    assert metrics["ssa"]["merged"] is False and metrics["ssa"]["method"] == "vpt"
    assert any("starts from its SSA-trained parameters" in line for line in lines)
    wrong = dataclasses.replace(cfg, out=tmp_path / "never", method="lora")
    with pytest.raises(SSAError, match="cannot be merged"):
        run_train2d(wrong, log=lambda _: None, progress=False)
    assert not wrong.out.exists()


def test_ssa_follows_dino_teacher_eval_weight_decay_groups_and_last_layer_freezing(images, tmp_path, monkeypatch):
    """As the official DINO / DINOv2: the teacher runs in eval mode, biases / 1-D parameters / the mask token get
    no weight decay, the prototypes do not train in the first epoch."""
    import nnunet_tpp.vision2d.ssa as ssa
    settings = ssa_settings({**SMALL_HEAD, "batch_size": 16})
    m = build_ssa(tiny_vit(), "full", settings, torch.device("cpu"))
    assert not any(module.training for module in m.teacher.modules())
    names = {id(p): n for n, p in m.student.named_parameters()}
    decayed, exempt = m.optimizer.param_groups
    assert exempt["weight_decay"] == 0.0 and exempt.get("no_decay")
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decayed["params"])
    assert {"mask_token", "net.backbone.cls_token"} <= {names[id(p)] for p in exempt["params"]}
    assert all(names[id(p)] in ("mask_token",) or "token" in names[id(p)] or "pos_embed" in names[id(p)]
               or p.ndim <= 1 for p in exempt["params"])
    x = torch.stack([images[i][0] for i in range(16)])
    prototypes = m.student.head.last_layer[0].detach().clone()
    ssa.ssa_step(m, x, settings, 0, 0, 0.04, freeze_last_layer=True, amp=False)
    assert torch.equal(m.student.head.last_layer[0], prototypes)
    ssa.ssa_step(m, x, settings, 1, 0, 0.04, freeze_last_layer=False, amp=False)
    assert not torch.equal(m.student.head.last_layer[0], prototypes)

    modes = []
    original = ssa.dinov2_terms

    def recording(student, teacher, *args, **kwargs):
        modes.append((student.training, any(module.training for module in teacher.modules())))
        return original(student, teacher, *args, **kwargs)

    monkeypatch.setattr(ssa, "dinov2_terms", recording)
    run_ssa(tiny_vit(), Subset(images, range(32)), make_cfg(tmp_path, epochs=1, batch_size=16, iterations_per_epoch=2),
            tmp_path / "ssa", torch.device("cpu"), lambda _: None)
    assert modes == [(True, False)] * 2  # student trains, no module of the teacher is in training mode


def test_a_carried_method_brings_everything_it_trained_into_the_supervised_model(tmp_path):
    """The Houlsby adapter also trains the LayerNorms (as adapter-bert): SSA's norms must reach the supervised run."""
    from nnunet_tpp import peft
    from nnunet_tpp.models.vit_heads import ViTClassifier
    from nnunet_tpp.vision2d.ssa import carry_ssa_parameters
    vit = tiny_vit()
    net = peft.apply(SSABackbone(vit), "adapter")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.fill_(0.5)
    trained = set(peft.trained_parameter_names(net))
    assert any(".norm" in n for n in trained)
    torch.save({"format": "nnunet_tpp.ssa/1", "backbone": {}, "result": {}, "recipe": {},
                "target_parameters": {n: p.detach().clone() for n, p in net.named_parameters() if n in trained},
                "identity": peft.identity(net)}, tmp_path / BACKBONE_FILE)
    model = peft.apply(ViTClassifier(tiny_vit(), 2), "adapter")
    assert carry_ssa_parameters(model, tmp_path, log=lambda _: None) == len(trained)
    params = dict(model.named_parameters())
    assert all(torch.all(params[n] == 0.5) for n in trained)
