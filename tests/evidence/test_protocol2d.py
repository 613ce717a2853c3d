"""``nnunet-tpp evidence --protocol 2d`` end to end on real dermoscopy images (PH2, two views per subject so that
``--group`` matters), a very short schedule: the report's format, whole test subjects, the TPP stage's images, the
untouched user folder, resume; and every refusal before anything is written."""
import json

import numpy as np
import pytest

from nnunet_tpp.cli import main
from tests.conftest import SHARED, require

PH2 = SHARED / "data" / "2d" / "ph2"
ARGS = ["--protocol", "2d", "--seeds", "1", "--labelled", "2", "--validation", "2", "--epochs", "2",
        "--pretext-images", "3", "--arms", "adapter,adapter_tpp", "--group", r"(IMD\d+)_"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 PH2 subjects, each as two images (``_a`` as it is, ``_b`` mirrored), shrunk to 192 x 256."""
    from PIL import Image
    root = tmp_path_factory.mktemp("ph2_views")
    for part in ("images", "masks"):
        (root / part).mkdir()
    for path in sorted(require(PH2 / "images").glob("*.png"))[:6]:
        image = Image.open(path).convert("RGB").resize((256, 192))
        mask = Image.open(PH2 / "masks" / path.name).resize((256, 192), Image.NEAREST)
        for view, flip in (("a", False), ("b", True)):
            name = f"{path.stem}_{view}.png"
            (image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image).save(root / "images" / name)
            (mask.transpose(Image.FLIP_LEFT_RIGHT) if flip else mask).save(root / "masks" / name)
    return root


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_the_protocol_reports_both_arms_on_whole_test_subjects_and_resumes(folder, tmp_path, capsys):
    out, before = tmp_path / "out", _listing(folder)
    assert main(["evidence", "--downstream", str(folder), "--out", str(out), *ARGS]) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    test, pool = evidence["split"]["test"], evidence["split"]["pool"]
    subject = {name.split("_")[0] for name in test}
    assert len(test) == 2 and len(subject) == 1 and not subject & {p.split("_")[0] for p in pool}
    assert set(evidence["arms"]) == {"adapter", "adapter_tpp"} and evidence["hd95_unit"] == "px"
    for arm in evidence["arms"].values():
        assert sorted(r["case"] for r in arm["per_case"]) == sorted(test)
        assert set(arm["dice"]) == {"foreground"} and 0 <= arm["dice_mean"] <= 1 and arm["hd95_mean"] >= 0
        assert {"dice_std", "per_case", "learnt"} <= set(arm)
    paired = evidence["paired"]["adapter_tpp - adapter"]
    assert paired["n"] == 2 and len(paired["ci95"]) == 2 and paired["mean_difference"] is not None
    assert sorted(r["case"] for r in evidence["untrained"]["per_case"]) == sorted(test)
    assert 0 < evidence["chance_dice"]["foreground"] < 1 and evidence["minutes"] > 0
    pretext = sorted(p.stem for p in (out / "data" / "seed_0" / "pretext").iterdir())
    assert len(pretext) == 3 and set(pretext) <= set(pool)  # the TPP stage never sees a test image
    run = out / "runs" / "adapter_tpp" / "seed_0" / "train2d"
    assert json.loads((run / "metrics.json").read_text())["tpp"] == "simmim"
    assert (run / "tpp" / "tpp_target_parameters.pth").exists()
    assert _listing(folder) == before  # the user's files are only linked, never written
    assert (out / "evidence.md").exists() and (out / "evidence.png").stat().st_size > 0
    capsys.readouterr()

    assert main(["evidence", "--downstream", str(folder), "--out", str(out), *ARGS]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    again = json.loads((out / "evidence.json").read_text())
    assert all(np.isclose(again["arms"][a]["dice_mean"], evidence["arms"][a]["dice_mean"]) for a in again["arms"])


@pytest.mark.parametrize("extra,words", [
    (["--iters", "3"], "--iters do(es) not apply to --protocol 2d"),
    (["--arms", "conv_adapter"], "unknown arm(s) ['conv_adapter'] for the 2-D protocol"),
    (["--labelled", "8", "--validation", "4"], "the training pool has 10"),
    (["--group", "IMD"], "has no group"),
])
def test_bad_settings_are_refused_before_anything_is_written(folder, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    args = ["evidence", "--protocol", "2d", "--downstream", str(folder), "--out", str(out), "--group", r"(IMD\d+)_"]
    assert main([*args, *extra]) == 2
    captured = capsys.readouterr()
    assert words in captured.err + captured.out and not out.exists()


def test_a_folder_of_unmatched_masks_and_an_out_of_other_settings_are_refused(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    for part in ("images", "masks"):
        (broken / part).mkdir(parents=True)
        for path in sorted((folder / part).iterdir())[:6]:
            (broken / part / path.name).symlink_to(path)
    (broken / "masks" / sorted((folder / "masks").iterdir())[0].name).unlink()
    out = tmp_path / "out"
    assert main(["evidence", "--protocol", "2d", "--downstream", str(broken), "--out", str(out)]) == 2
    assert "no mask for" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    (out / "protocol.json").write_text(json.dumps({"settings": {"downstream": str(folder), "epochs": 99}}))
    before = _listing(out)
    assert main(["evidence", "--downstream", str(folder), "--out", str(out), *ARGS]) == 2
    assert "epochs: 99 there, 2 now" in capsys.readouterr().err and _listing(out) == before


def test_full_asks_for_a_gpu_and_takes_the_longer_schedule(folder, tmp_path, capsys, monkeypatch):
    import torch

    from nnunet_tpp.evidence.settings2d import FULL_SCHEDULE_2D
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evidence", "--protocol", "2d", "--downstream", str(folder), "--out", str(out), "--full"]) == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err and not out.exists()
    seen = {}
    monkeypatch.setattr("nnunet_tpp.evidence.protocol2d.run_evidence_2d", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["evidence", "--protocol", "2d", "--downstream", str(folder), "--out", str(out), "--full",
                 "--device", "cpu", "--epochs", "3"]) == 0
    cfg = seen["cfg"]
    assert cfg.device == "cpu" and cfg.epochs == 3 and cfg.labelled == FULL_SCHEDULE_2D["labelled"]
    assert cfg.pretext_images is None and cfg.pretext_epochs == FULL_SCHEDULE_2D["pretext_epochs"]
