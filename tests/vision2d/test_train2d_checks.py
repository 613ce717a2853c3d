"""``train2d`` validates everything before its first write into ``--out``: each refused command names the
problem and leaves the folder byte-identical (hashed before and after)."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_tpp.cli import main
from nnunet_tpp.vision2d.config import Train2dConfig
from nnunet_tpp.vision2d.train import run_train2d
from tests.conftest import SHARED, require

PNEUMONIA = SHARED / "data" / "2d" / "pneumoniamnist_balanced.npz"
TINY = ["--arch", "vit_tiny", "--img-size", "28", "--patch-size", "4", "--arch-option", "depth=2",
        "--arch-option", "embed_dim=48", "--arch-option", "num_heads=3", "--batch-size", "64", "--device", "cpu",
        "--no-progress"]


def folder_hash(folder: Path) -> str:
    """One hash of every path and file's bytes under ``folder`` ('absent' when it does not exist)."""
    if not folder.exists():
        return "absent"
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    data = np.load(require(PNEUMONIA))
    rng = np.random.default_rng(0)
    picks = {s: rng.choice(len(data[f"{s}_labels"]), n, replace=False)
             for s, n in (("train", 128), ("val", 32), ("test", 32))}
    path = tmp_path_factory.mktemp("npz") / "small.npz"
    np.savez(path, **{f"{s}_{k}": data[f"{s}_{k}"][i] for s, i in picks.items() for k in ("images", "labels")})
    return path


def args(data, out, *extra):
    return ["train2d", "--task", "cls", "--data", str(data), "--out", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def killed_run(small_npz, tmp_path_factory):
    """A run folder of a run killed in its 2nd of 3 epochs (config.yaml, checkpoint.pth after epoch 1)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    cfg = Train2dConfig(task="cls", data=small_npz, out=out, arch="vit_tiny", img_size=28, patch_size=4,
                        arch_options={"depth": 2, "embed_dim": 48, "num_heads": 3}, method="adapter", epochs=3,
                        batch_size=64, device="cpu")

    def killed(line):
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train2d(cfg, log=killed, progress=False)
    assert (out / "checkpoint.pth").exists() and (out / "config.yaml").exists()
    return out


def refused(command, folder, capsys, message):
    """Runs ``command``, asserts exit code 2, ``message`` in stderr and an unchanged ``folder``."""
    before = folder_hash(folder)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert folder_hash(folder) == before


@pytest.fixture
def used_out(tmp_path):
    """An --out folder that already holds a file of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def test_an_image_size_that_the_patch_does_not_divide(small_npz, used_out, capsys):
    refused(args(small_npz, used_out, "--img-size", "30", "--method", "adapter"), used_out, capsys,
            "img_size 30 is not a multiple of patch_size 4")


def test_tpp_with_a_method_that_adds_nothing(small_npz, used_out, capsys):
    refused(args(small_npz, used_out, "--method", "bitfit", "--tpp", "mae"), used_out, capsys,
            "'bitfit' adds none")


def test_a_resume_with_other_settings_leaves_the_run_untouched(killed_run, tmp_path, small_npz, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    refused(args(small_npz, out, "--method", "adapter", "--epochs", "4"), out, capsys, "epochs differ")
    (out / "checkpoint.pth").unlink()  # killed before its first checkpoint: config.yaml alone still counts
    refused(args(small_npz, out, "--method", "adapter", "--epochs", "4"), out, capsys, "holds a run with other settings")


def test_a_resume_on_another_device_is_the_same_run(killed_run, tmp_path, small_npz, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    lines = []
    cfg = Train2dConfig(task="cls", data=small_npz, out=out, arch="vit_tiny", img_size=28, patch_size=4,
                        arch_options={"depth": 2, "embed_dim": 48, "num_heads": 3}, method="adapter", epochs=3,
                        batch_size=64, device="auto", num_workers=0)  # auto: the same CPU here, another name
    run_train2d(cfg, log=lines.append, progress=False)
    assert any("resuming after epoch 1" in line for line in lines) and (out / "metrics.json").exists()
    refused(args(small_npz, out, "--method", "adapter", "--epochs", "3"), out, capsys, "already holds a finished run")


def test_an_empty_data_folder_says_it_found_no_images(tmp_path, used_out, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for task in ("cls", "seg"):
        command = ["train2d", "--task", task, "--data", str(empty), "--out", str(used_out), *TINY]
        refused(command, used_out, capsys, "found no images")


def test_partial_auto_without_a_known_pre_training(small_npz, used_out, capsys):
    refused(args(small_npz, used_out, "--method", "partial"), used_out, capsys,
            "--method-option quarter=N")


def test_a_device_that_does_not_exist(small_npz, used_out, capsys):
    import torch
    message = "does not exist" if torch.cuda.is_available() else "sees no CUDA device"
    refused(args(small_npz, used_out, "--method", "adapter", "--device", "cuda:3" if not torch.cuda.is_available()
                 else f"cuda:{torch.cuda.device_count()}"), used_out, capsys, message)
    refused(args(small_npz, used_out, "--method", "adapter", "--device", "tpu"), used_out, capsys, "device")
