"""``bench2d`` suites on a small slice of the real PneumoniaMNIST: runs in child processes, results files,
resuming without repeating finished runs, a run killed by SIGKILL resumed to the same weights, a failing run
that does not stop the suite, YAML paths relative to the YAML, missing data caught before anything runs, the
shipped recipes, the upstream MAE checkpoint."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nnunet_tpp.cli import main
from nnunet_tpp.vision2d.bench2d import SuiteError, load_suite
from nnunet_tpp.vision2d.bench2d_run import run_suite
from tests.conftest import REPO, balanced_pneumonia_subset

CONFIGS = REPO / "configs" / "2d"
PAPER_RECIPES = ("mhist", "oct_c8", "chest_xray_pa", "glas", "qata_cov19")
TINY = {"arch": "vit_tiny", "img_size": 28, "patch_size": 4, "epochs": 1, "batch_size": 64, "device": "cpu",
        "arch_options": {"depth": 2, "embed_dim": 48, "num_heads": 3}}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """200 training, 40 validation and 80 test images of PneumoniaMNIST, half of each class."""
    return balanced_pneumonia_subset(tmp_path_factory.mktemp("data") / "pneumonia_small.npz",
                                     {"train": 200, "val": 40, "test": 80})


def write_suite(folder: Path, datasets: dict, methods: list, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": "tiny", "out": str(folder / "out"), "defaults": TINY, "datasets": datasets,
            "methods": methods, "tpp": ["none"], "seeds": [0], **extra}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_suite_runs_writes_results_and_skips_finished_runs_when_run_again(small_npz, tmp_path):
    path = write_suite(tmp_path, {"pneumonia": {"task": "cls", "data": str(small_npz)}}, ["linear_probe", "adapter"])
    lines = []
    result = run_suite(load_suite(path), log=lines.append, progress=False)
    assert result["failed"] == [] and result["ran"] == 2
    assert any(line.startswith("run 2/2: pneumonia adapter seed 0 ... done in") and "(acc " in line for line in lines)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["tpp"], r["seed"]) for r in rows] == [("linear_probe", "none", "0"), ("adapter", "none", "0")]
    for row in rows:
        for key in ("acc", "auc", "f1", "trainable_ratio", "peak_memory_mb", "images_per_s", "seconds"):
            assert np.isfinite(float(row[key])), key
        # the run's own process, not the suite's: the child's own measurement, carried over unchanged
        measured = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert float(row["peak_memory_mb"]) == measured["peak_memory_mb"] > 0
        assert row["memory_kind"] == measured["memory_kind"]
    md = (out / "results.md").read_text()
    assert "| Method | TPP | n | ACC (%) | AUC (%) | F1 (%) | Ratio (%) |" in md and "torch" in md
    for row in rows:  # fractions in the csv, as in metrics.json
        assert 0 <= float(row["acc"]) <= 1 and 0 < float(row["trainable_ratio"]) < 1
    assert (out / "results.png").stat().st_size > 0
    metrics = out / "pneumonia" / "adapter" / "none" / "frac1" / "seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    lines.clear()
    again = run_suite(load_suite(path), log=lines.append, progress=False)
    assert again["ran"] == 0 and again["skipped"] == 2
    assert sum("finished before, skipped" in line for line in lines) == 2
    assert metrics.stat().st_mtime_ns == stamp
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 2


def test_fewer_annotations_runs_train_on_that_share_of_the_labels(small_npz, tmp_path):
    path = write_suite(tmp_path, {"pneumonia": {"task": "cls", "data": str(small_npz)}}, ["linear_probe"],
                       label_fractions=[0.1, 0.5, 1.0])
    result = run_suite(load_suite(path), progress=False, log=lambda _: None)
    assert result["failed"] == [] and result["ran"] == 3
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    # 200 training images, 100 per class, drawn stratified; validation and test sets stay whole
    assert {float(r["label_fraction"]): int(r["train_images"]) for r in rows} == {0.1: 20, 0.5: 100, 1.0: 200}
    assert {int(r["test_images"]) for r in rows} == {80}
    for frac in ("0.1", "0.5", "1"):
        assert (tmp_path / "out" / "pneumonia" / "linear_probe" / "none" / f"frac{frac}" / "seed0"
                / "metrics.json").is_file()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Method | TPP | Labels | n | ACC (%) |" in md
    assert "| linear_probe | none | 0.1 | 1 |" in md
    with pytest.raises(SuiteError, match="label_fractions"):
        load_suite(write_suite(tmp_path / "bad", {"p": {"task": "cls", "data": str(small_npz)}}, ["full"],
                               label_fractions=[0.0]))


def test_a_failing_run_is_reported_and_the_suite_goes_on(small_npz, tmp_path, capsys):
    broken = tmp_path / "broken.npz"
    broken.write_text("not an npz file")
    path = write_suite(tmp_path, {"broken": {"task": "cls", "data": "broken.npz"},
                                  "pneumonia": {"task": "cls", "data": str(small_npz)}}, ["linear_probe"])
    assert main(["bench2d", str(path), "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "run 1/2: broken linear_probe seed 0 ... FAILED" in printed.out
    assert "run 2/2: pneumonia linear_probe seed 0 ... done" in printed.out
    assert "1 of 2 runs failed" in printed.out and "run(s) failed" in printed.err
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["dataset"] for r in rows] == ["pneumonia"]
    assert "## Failed runs" in (tmp_path / "out" / "results.md").read_text()


def test_yaml_paths_are_relative_to_the_yaml_and_a_missing_one_stops_everything(small_npz, tmp_path, monkeypatch,
                                                                                 capsys):
    (tmp_path / "data").mkdir()
    os.symlink(small_npz, tmp_path / "data" / "small.npz")
    path = write_suite(tmp_path / "recipes", {"pneumonia": {"task": "cls", "data": "../data/small.npz"}},
                       ["adapter", {"name": "lora4", "method": "lora", "method_options": {"rank": 4}}],
                       tpp=["none", "mae"], seeds=[0, 1])
    monkeypatch.chdir(tmp_path / "data")  # not the YAML's folder
    suite = load_suite(path)
    assert {r.values["data"] for r in suite.runs} == {str(tmp_path / "data" / "small.npz")}
    assert [r.label for r in suite.runs[:4]] == ["adapter", "adapter+mae", "lora4", "lora4+mae"]
    assert len(suite.runs) == 8
    missing = write_suite(tmp_path / "other", {"pneumonia": {"task": "cls", "data": "../nowhere/x.npz"}}, ["adapter"])
    with pytest.raises(SuiteError, match=r"`datasets\.pneumonia\.data`.*nowhere"):
        load_suite(missing)
    assert main(["bench2d", str(missing)]) == 2
    assert "datasets.pneumonia.data" in capsys.readouterr().err
    assert not (tmp_path / "other" / "out").exists()


def test_tpp_is_left_out_for_methods_without_target_parameters(small_npz, tmp_path):
    path = write_suite(tmp_path, {"p": {"task": "cls", "data": str(small_npz)}}, ["full", "linear_probe", "ssf"],
                       tpp=["none", "mae", "dino"])
    suite = load_suite(path)
    assert [r.label for r in suite.runs] == ["full", "linear_probe", "ssf", "ssf+mae", "ssf+dino"]
    assert any(n.startswith("full+mae left out") for n in suite.notes)


def test_the_shipped_recipes_parse(capsys):
    real = load_suite(CONFIGS / "shared_real.yaml")
    assert real.upstream is not None and Path(real.upstream["data"]).exists()
    assert {r.label for r in real.runs} >= {"linear_probe", "full", "adapter", "adapter+mae", "adapter+dino"}
    assert main(["bench2d", str(CONFIGS / "shared_real.yaml"), "--dry-run", "--out", "/nonexistent/x"]) == 0
    assert "to run" in capsys.readouterr().out
    for name in PAPER_RECIPES:
        recipe = CONFIGS / f"{name}.yaml"
        suite = load_suite(recipe, check_paths=False)
        assert len({r.seed for r in suite.runs}) == 3 and {r.tpp for r in suite.runs} == {"none", "mae"}
        with pytest.raises(SuiteError, match=r"`defaults\.backbone`") as error:
            load_suite(recipe)
        assert f"`datasets.{name}.data`" in str(error.value)


def test_upstream_mae_checkpoint_loads_as_a_backbone_with_its_decoder(small_npz, tmp_path):
    import torch

    from nnunet_tpp.models.vit import build_vit
    from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint, mae_decoder_state_dict
    from nnunet_tpp.vision2d.upstream import pretrain_mae_upstream
    target = tmp_path / "up" / "mae.pth"
    lines = []
    options = dict(arch="vit_tiny", img_size=28, patch_size=4, in_chans=None, epochs=2, batch_size=64, seed=0,
                   device="cpu", arch_options=TINY["arch_options"], progress=False)
    assert pretrain_mae_upstream(small_npz, target, log=lines.append, **options) == target
    assert any(line.startswith("upstream MAE epoch 2/2 loss") for line in lines)
    vit = build_vit("vit_tiny", img_size=28, patch_size=4, in_chans=1, **TINY["arch_options"])
    before = vit.blocks[0].attn.qkv.weight.clone()
    load_vit_checkpoint(vit, target, fmt="timm")
    assert not torch.equal(before, vit.blocks[0].attn.qkv.weight)
    decoder = mae_decoder_state_dict(target)
    assert "mask_token" in decoder and any(k.startswith("decoder_pred") for k in decoder)
    stamp = target.stat().st_mtime_ns
    lines.clear()
    pretrain_mae_upstream(small_npz, target, log=lines.append, **options)
    assert target.stat().st_mtime_ns == stamp and "not trained again" in lines[0]
    with pytest.raises(ValueError, match="other settings"):
        pretrain_mae_upstream(small_npz, target, log=lines.append, **{**options, "epochs": 3})


KILL_HOOK = '''import os
if os.environ.get("NNUNET_TPP_TEST_KILL_AT_STEP"):  # the test's interruption: SIGKILL at this AdamW step
    import signal
    import torch
    _at, _done, _step = int(os.environ["NNUNET_TPP_TEST_KILL_AT_STEP"]), [0], torch.optim.AdamW.step

    def _killing_step(self, *args, **kwargs):
        _done[0] += 1
        if _done[0] == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(self, *args, **kwargs)

    torch.optim.AdamW.step = _killing_step
'''


def test_a_killed_run_resumes_to_the_uninterrupted_runs_weights(small_npz, tmp_path, monkeypatch):
    """The suite's child process is killed with SIGKILL at its 6th optimiser step (epoch 2 of 3, 4 steps an epoch;
    its checkpoint is from epoch 1; a ``sitecustomize`` on the child's path does it), the suite reports the failure,
    the suite run again resumes that run: adapter weights, history and test metrics equal an uninterrupted
    suite's bit for bit."""
    data = {"pneumonia": {"task": "cls", "data": str(small_npz)}}
    straight = run_suite(load_suite(write_suite(tmp_path / "a", data, ["lora"], defaults={**TINY, "epochs": 3})),
                         progress=False, log=lambda _: None)
    assert straight["failed"] == [] and straight["ran"] == 1
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("NNUNET_TPP_TEST_KILL_AT_STEP", "6")
    path = write_suite(tmp_path / "b", data, ["lora"], defaults={**TINY, "epochs": 3})
    killed = run_suite(load_suite(path), progress=False, log=lambda _: None)
    assert len(killed["failed"]) == 1 and "exit 137" in killed["failed"][0]
    run_dir = tmp_path / "b" / "out" / "pneumonia" / "lora" / "none" / "frac1" / "seed0"
    assert (run_dir / "checkpoint.pth").exists() and not (run_dir / "metrics.json").exists()
    monkeypatch.delenv("NNUNET_TPP_TEST_KILL_AT_STEP")
    lines = []
    resumed = run_suite(load_suite(path), progress=False, log=lines.append)
    assert resumed["failed"] == [] and resumed["ran"] == 1
    assert "resuming after epoch 1" in (run_dir / "train.log").read_text()
    other = tmp_path / "a" / "out" / "pneumonia" / "lora" / "none" / "frac1" / "seed0"
    mine = torch.load(run_dir / "adapter.pth", weights_only=True)["state_dict"]
    theirs = torch.load(other / "adapter.pth", weights_only=True)["state_dict"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((run_dir / "history.json").read_text()) == json.loads((other / "history.json").read_text())
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, other))
    assert {k: a[k] for k in ("acc", "auc", "f1")} == {k: b[k] for k in ("acc", "auc", "f1")}
