"""``train2d`` end to end on the real 2D sets: metrics file, adapter weights that reproduce the model,
resume after a kill to the same weights, refusal to overwrite, bad input caught before anything is written."""
import json

import numpy as np
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.cli import main
from nnunet_tpp.vision2d.config import Train2dConfig
from nnunet_tpp.vision2d.train import RunExistsError, run_train2d
from tests.conftest import SHARED, require

PNEUMONIA = SHARED / "data" / "2d" / "pneumoniamnist_balanced.npz"
GLAS = SHARED / "data" / "2d" / "glas_mini"
TINY = {"depth": 4, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """300/60/120 random images of PneumoniaMNIST, both classes (keeps the CPU run short)."""
    data = np.load(require(PNEUMONIA))
    path = tmp_path_factory.mktemp("npz") / "pneumonia_small.npz"
    rng = np.random.default_rng(0)
    picks = {s: rng.choice(len(data[f"{s}_labels"]), n, replace=False)
             for s, n in (("train", 300), ("val", 60), ("test", 120))}
    np.savez(path, **{f"{s}_{k}": data[f"{s}_{k}"][idx] for s, idx in picks.items() for k in ("images", "labels")})
    return path


def cls_config(data, out, **kw):
    base = dict(task="cls", data=data, out=out, arch="vit_tiny", img_size=28, patch_size=4, arch_options=TINY,
                method="adapter", epochs=2, batch_size=32, device="cpu")
    return Train2dConfig(**{**base, **kw})


def test_classification_run_writes_metrics_and_adapter_weights(small_npz, tmp_path):
    out = tmp_path / "run"
    metrics = run_train2d(cls_config(small_npz, out), progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert {k: on_disk[k] for k in ("acc", "auc", "f1")} == pytest.approx({k: metrics[k] for k in ("acc", "auc", "f1")})
    for key in ("acc", "auc", "f1", "trainable_ratio", "peak_memory_mb", "images_per_s"):
        assert np.isfinite(on_disk[key]), key
    assert 0 < on_disk["trainable_ratio"] < 1 and on_disk["test_images"] == 120  # fractions, named in "units"
    assert on_disk["units"] == {"acc": "fraction", "auc": "fraction", "f1": "fraction",
                                "trainable_ratio": "fraction", "peak_memory_mb": "MiB", "images_per_s": "images/s"}
    assert all(0 <= on_disk[k] <= 1 for k in ("acc", "auc", "f1")) and 0 <= on_disk["val"]["acc"] <= 1
    assert (out / "progress.png").stat().st_size > 0 and not (out / "checkpoint.pth").exists()
    # the adapter file alone (plus the same random backbone, seed 0) reproduces the test accuracy
    from nnunet_tpp.vision2d.data import load_dataset
    from nnunet_tpp.vision2d.model import build_backbone, build_model
    from nnunet_tpp.vision2d.train import evaluate
    cfg = cls_config(small_npz, out)
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.data, "cls", cfg.img_size, seed=cfg.seed)
    model = build_model(cfg, build_backbone(cfg, splits.in_chans), splits.num_classes)
    peft.load(model, out / "adapter.pth")
    again = evaluate(model, splits.test, "cls", splits.num_classes, torch.device("cpu"), 64)
    assert again["acc"] == pytest.approx(metrics["acc"])
    with pytest.raises(RunExistsError, match="finished run"):
        run_train2d(cls_config(small_npz, out), progress=False)


class Killed(Exception):
    """The interruption injected into a run."""


def trained_weights_per_step(monkeypatch, kill_at: int | None = None) -> list[dict]:
    """Records the trained tensors after every optimiser step of a run (AdamW.step wrapped); with ``kill_at``,
    raises :class:`Killed` instead of the step with that (1-based) number, before it changes anything."""
    steps: list[dict] = []
    step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        if kill_at is not None and len(steps) + 1 == kill_at:
            raise Killed
        out = step(self, *args, **kwargs)
        steps.append({id(p): p.detach().clone() for g in self.param_groups for p in g["params"]})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    return steps


def test_a_killed_run_resumes_to_the_same_weights(small_npz, tmp_path, monkeypatch):
    """Killed in the middle of epoch 2 of 3 (step 14 of 30; checkpoint after epoch 1), then resumed: the last
    step's weights, the adapter file, the history and the test metrics equal an uninterrupted run's bit for bit."""
    cfg = dict(epochs=3, method="lora")
    whole = trained_weights_per_step(monkeypatch)
    reference = run_train2d(cls_config(small_npz, tmp_path / "whole", **cfg), log=lambda _: None, progress=False)
    per_epoch = len(whole) // 3
    assert per_epoch >= 4
    monkeypatch.undo()
    killed = trained_weights_per_step(monkeypatch, kill_at=per_epoch + per_epoch // 2)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_train2d(cls_config(small_npz, out, **cfg), log=lambda _: None, progress=False)
    assert (out / "checkpoint.pth").exists() and not (out / "metrics.json").exists()
    monkeypatch.undo()
    resumed = trained_weights_per_step(monkeypatch)
    lines = []
    metrics = run_train2d(cls_config(small_npz, out, **cfg), log=lines.append, progress=False)
    assert any("resuming after epoch 1" in line for line in lines)
    assert len(resumed) == 2 * per_epoch  # epochs 2 and 3 again, from the start of epoch 2
    last, last_whole = list(resumed[-1].values()), list(whole[-1].values())
    assert len(last) == len(last_whole) and all(torch.equal(a, b) for a, b in zip(last, last_whole))
    assert not all(torch.equal(a, b) for a, b in zip(list(killed[-1].values()), last_whole))  # it did stop early
    mine = torch.load(out / "adapter.pth", weights_only=True)["state_dict"]
    theirs = torch.load(tmp_path / "whole" / "adapter.pth", weights_only=True)["state_dict"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    history = json.loads((out / "history.json").read_text())
    assert history == json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3] and history["units"]["acc"] == "fraction"
    assert {k: metrics[k] for k in ("acc", "auc", "f1")} == {k: reference[k] for k in ("acc", "auc", "f1")}


def test_segmentation_run_on_glas(tmp_path):
    out = tmp_path / "seg"
    code = main(["train2d", "--task", "seg", "--data", str(require(GLAS)), "--out", str(out), "--arch", "vit_tiny",
                 "--img-size", "64", "--patch-size", "8", "--method", "lora", "--method-option", "rank=4",
                 "--arch-option", "depth=4", "--arch-option", "embed_dim=48", "--arch-option", "num_heads=3",
                 "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["dice"] <= 1 and metrics["hd95"] >= 0
    assert metrics["units"]["dice"] == "fraction" and metrics["units"]["hd95"] == "pixel"
    saved = torch.load(out / "adapter.pth", weights_only=True)
    assert saved["method"] == "lora" and saved["options"]["rank"] == 4


def test_bad_input_fails_before_anything_is_written(small_npz, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train2d", "--task", "cls", "--data", str(small_npz), "--out", str(out), "--method", "nope"]) == 2
    assert "unknown PEFT method 'nope'" in capsys.readouterr().err and not out.exists()
    assert main(["train2d", "--task", "cls", "--data", str(small_npz), "--out", str(out), "--method", "lora",
                 "--method-option", "rnak=4", "--arch", "vit_tiny", "--img-size", "28", "--patch-size", "4"]) == 2
    assert "rnak" in capsys.readouterr().err
    assert main(["train2d", "--task", "cls", "--data", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert "data not found" in capsys.readouterr().err and not (out / "metrics.json").exists()


def test_packaged_train2d_recipe_parses(monkeypatch, tmp_path):
    from tests.conftest import REPO
    monkeypatch.chdir(REPO)
    cfg = Train2dConfig.from_yaml(REPO / "configs" / "2d" / "train2d" / "pneumonia_tiny.yaml",
                                  data=require(PNEUMONIA), out=tmp_path / "run")
    assert (cfg.task, cfg.arch, cfg.method, cfg.method_options) == ("cls", "vit_tiny", "adapter", {"bottleneck": 16})
    with pytest.raises(ValueError, match="unknown setting"):
        (tmp_path / "bad.yaml").write_text("task: cls\nmethdo: lora\n")
        Train2dConfig.from_yaml(tmp_path / "bad.yaml")


def test_tpp_then_fine_tuning_from_the_command_line(small_npz, tmp_path):
    out = tmp_path / "tpp_run"
    assert main(["train2d", "--task", "cls", "--data", str(small_npz), "--out", str(out), "--arch", "vit_tiny",
                 "--img-size", "28", "--patch-size", "4", "--arch-option", "depth=2", "--arch-option", "embed_dim=48",
                 "--arch-option", "num_heads=3", "--method", "lora", "--tpp", "mae", "--tpp-epochs", "1",
                 "--epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tpp"] == "mae" and metrics["target_parameters"] == str(out / "tpp" / "tpp_target_parameters.pth")
    assert (out / "tpp" / "tpp_progress.png").exists()


@pytest.mark.parametrize("mode,method", [("concat", "partial"), ("average", "adapter")])
def test_two_ssl_backbones_combined_in_one_run(small_npz, tmp_path, mode, method):
    """Khan & Fang: two upstream MAE checkpoints (other seeds) in one classifier, every backbone adapted."""
    from nnunet_tpp.vision2d.upstream import pretrain_mae_upstream
    checkpoints = [pretrain_mae_upstream(small_npz, tmp_path / f"mae_{seed}.pth", arch="vit_tiny", img_size=28,
                                         patch_size=4, epochs=1, batch_size=64, seed=seed, device="cpu",
                                         arch_options=TINY, progress=False, log=lambda _: None)
                   for seed in (0, 1)]
    out = tmp_path / "combined"
    args = ["train2d", "--task", "cls", "--data", str(small_npz), "--out", str(out), "--arch", "vit_tiny",
            "--img-size", "28", "--patch-size", "4", "--arch-option", "depth=4", "--arch-option", "embed_dim=48",
            "--arch-option", "num_heads=3", "--backbone", str(checkpoints[0]), "--combine-backbone",
            str(checkpoints[1]), "--combine", mode, "--method", method, "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["acc"]) and 0 < metrics["trainable_ratio"] < 1
    saved = torch.load(out / "adapter.pth", weights_only=True)
    assert {n.split(".")[1] for n in saved["state_dict"] if n.startswith("backbones.")} == {"0", "1"}
    # the adapter file plus the two checkpoints reproduce the test accuracy
    from nnunet_tpp.vision2d.data import load_dataset
    from nnunet_tpp.vision2d.model import build_backbone, build_model
    from nnunet_tpp.vision2d.train import evaluate
    cfg = Train2dConfig(task="cls", data=small_npz, out=tmp_path / "again", arch="vit_tiny", img_size=28,
                        patch_size=4, arch_options=TINY, backbone=checkpoints[0], combine_backbones=[checkpoints[1]],
                        combine=mode, method=method, device="cpu")
    splits = load_dataset(cfg.data, "cls", cfg.img_size, seed=cfg.seed)
    model = build_model(cfg, build_backbone(cfg, splits.in_chans, log=lambda _: None), splits.num_classes,
                        log=lambda _: None)
    peft.load(model, out / "adapter.pth")
    again = evaluate(model, splits.test, "cls", splits.num_classes, torch.device("cpu"), 64)
    assert again["acc"] == pytest.approx(metrics["acc"])
    with pytest.raises(ValueError, match="combine_backbones needs task cls"):
        Train2dConfig(task="seg", data=small_npz, out=tmp_path / "x", backbone=checkpoints[0],
                      combine_backbones=[checkpoints[1]])
