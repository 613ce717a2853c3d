"""``train2d --arch litemedsam``: LiteMedSAM's pre-trained encoder from the installed package on a folder it has never
seen (images of any size, PNG and JPEG, grey and RGB; masks with one or three channels, PNG and JPEG); what it
refuses before writing anything; ``train2d --help`` lists the architectures without importing timm."""
import json
import subprocess
import sys

import numpy as np
import pytest

from nnunet_tpp.cli import main
from tests.vision2d.test_train2d_checks import refused

# (image file, image mode, mask file, mask mode, height, width): every kind the issue names, once
KINDS = [("a.png", "L", "a.png", "L", 300, 200), ("b.jpg", "RGB", "b.png", "RGB", 180, 260),
         ("c.png", "RGB", "c.jpg", "L", 97, 143), ("d.jpeg", "L", "d.png", "RGB", 256, 256),
         ("e.png", "RGB", "e.png", "L", 400, 330)]


@pytest.fixture(scope="module")
def unseen_folder(tmp_path_factory):
    """``images/`` + ``masks/``: a dark disc (the lesion) on a noisy background, one file of each kind."""
    from PIL import Image
    root = tmp_path_factory.mktemp("unseen")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for image_name, image_mode, mask_name, mask_mode, h, w in KINDS:
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
        pixels = rng.integers(120, 255, (h, w, 3)).astype(np.uint8)
        pixels[disc] //= 3
        Image.fromarray(pixels).convert(image_mode).save(root / "images" / image_name)
        Image.fromarray((disc * 255).astype(np.uint8)).convert(mask_mode).save(root / "masks" / mask_name)
    return root


def test_lora_on_an_unseen_folder_writes_its_metrics(unseen_folder, tmp_path):
    out = tmp_path / "run"
    code = main(["train2d", "--task", "seg", "--data", str(unseen_folder), "--method", "lora", "--arch", "litemedsam",
                 "--epochs", "1", "--out", str(out), "--batch-size", "3", "--device", "cpu", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == "litemedsam" and metrics["img_size"] == 256 and metrics["method"] == "lora"
    assert metrics["backbone"].endswith("lite_medsam.pth")  # the installed package's checkpoint, by default
    assert 0 <= metrics["dice"] <= 1 and metrics["train_images"] + metrics["test_images"] <= len(KINDS)
    assert 0 < metrics["trainable_ratio"] < 0.05 and (out / "adapter.pth").exists()
    assert [r["image"] for r in metrics["per_image"]] == [str(i) for i in range(metrics["test_images"])]
    assert np.mean([r["dice"]["foreground"] for r in metrics["per_image"]]) == pytest.approx(metrics["dice"])


def test_the_untrained_evaluation_is_the_runs_starting_point(unseen_folder, tmp_path):
    """A run whose learning rate is 0 ends where it started: its test scores are evaluate_untrained's."""
    from nnunet_tpp.vision2d.config import Train2dConfig
    from nnunet_tpp.vision2d.train import evaluate_untrained, run_train2d
    cfg = Train2dConfig(task="seg", data=unseen_folder, out=tmp_path / "run", arch="litemedsam", method="adapter",
                        epochs=1, batch_size=3, lr=0.0, device="cpu")
    untrained = evaluate_untrained(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()  # it writes nothing
    trained = run_train2d(cfg, log=lambda _: None, progress=False)
    assert untrained["per_image"] == trained["per_image"] and untrained["dice"] == trained["dice"]


@pytest.mark.parametrize("extra,message", [
    (["--method", "vpt"], "one token sequence"),
    (["--img-size", "224"], "litemedsam takes 256 x 256 RGB images"),
    (["--ssa", "dinov2"], "litemedsam does not support ssa"),
    (["--tpp", "mae", "--method", "adapter"], "litemedsam does not support tpp mae"),
])
def test_refusals_leave_the_folder_untouched(unseen_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = ["train2d", "--task", "seg", "--data", str(unseen_folder), "--arch", "litemedsam", "--out", str(out),
               "--device", "cpu", "--no-progress", *extra]
    refused(command, out, capsys, message)


def test_help_lists_the_architectures_without_importing_timm():
    code = ("import sys\nfrom nnunet_tpp.cli import main\ntry:\n    main(['train2d', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('TIMM' if 'timm' in sys.modules else 'NO-TIMM')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "NO-TIMM" in result.stdout
    assert "vit_tiny" in result.stdout and "litemedsam" in result.stdout


def test_the_listed_architectures_are_the_built_ones():
    from nnunet_tpp.models.vit import ARCHS
    from nnunet_tpp.vision2d.config import ARCHS as listed, LITEMEDSAM, VIT_ARCHS
    assert VIT_ARCHS == tuple(ARCHS) and listed == VIT_ARCHS + (LITEMEDSAM,)
