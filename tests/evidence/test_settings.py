"""The evidence settings: shipped YAML = built-in defaults, and every refusal before anything is written."""
import json

import pytest

from nnunet_tpp.cli import main
from nnunet_tpp.evidence.settings import FULL_SCHEDULE, Evidence3D
from nnunet_tpp.evidence.settings2d import FULL_SCHEDULE_2D, Evidence2D
from tests.conftest import REPO


def test_the_shipped_settings_are_the_defaults_and_the_full_schedule():
    import yaml
    folder = REPO / "configs" / "evidence"
    assert Evidence3D.from_yaml(folder / "3d.yaml") == Evidence3D()
    assert yaml.safe_load((folder / "3d_full.yaml").read_text())["evidence"] == FULL_SCHEDULE
    assert Evidence2D.from_yaml(folder / "2d.yaml") == Evidence2D()
    assert yaml.safe_load((folder / "2d_full.yaml").read_text())["evidence"] == FULL_SCHEDULE_2D


def _folder(root, name, labels='{"background": 0, "organ": 1}', cases=3):
    import numpy as np
    import SimpleITK as sitk
    folder = root / name
    folder.mkdir()
    for i in range(cases):
        image = sitk.GetImageFromArray(np.zeros((8, 16, 16), np.int16))
        sitk.WriteImage(image, str(folder / f"case{i}.nii.gz"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(folder / f"case{i}_labels.nii.gz"))
    if labels is not None:
        (folder / "labels.json").write_text(labels)
    return folder


@pytest.mark.parametrize("change, words", [
    (dict(arms="scratch,bogus"), "unknown arm"),
    (dict(labels=None), "labels.json"),
    (dict(group="(nomatch)"), "does not match"),
    (dict(labelled=9), "give 1..2"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
])
def test_bad_settings_and_data_are_refused_before_anything_is_written(tmp_path, capsys, change, words):
    up = _folder(tmp_path, "up")
    down = _folder(tmp_path, "down", labels=change.pop("labels", '{"background": 0, "organ": 1}'))
    out = tmp_path / "out"
    args = ["evidence", "--upstream", str(up), "--downstream", str(down), "--out", str(out)]
    for key, value in {"arms": None, "group": None, "labelled": "1", "epochs": None, **change}.items():
        if value is not None:
            args += [f"--{key}", str(value)]
    assert main(args) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_an_out_folder_of_other_settings_is_refused_and_left_alone(tmp_path, capsys):
    up, down, out = _folder(tmp_path, "up"), _folder(tmp_path, "down"), tmp_path / "out"
    out.mkdir()
    theirs = {**Evidence3D(upstream=up, downstream=down, out=out, labelled=1).to_json(), "epochs": 99}
    (out / "protocol.json").write_text(json.dumps({"settings": theirs}))
    before = (out / "protocol.json").read_text()
    assert main(["evidence", "--upstream", str(up), "--downstream", str(down), "--out", str(out),
                 "--labelled", "1"]) == 2
    assert "epochs: 99 there, 10 now" in capsys.readouterr().err
    assert (out / "protocol.json").read_text() == before and sorted(p.name for p in out.iterdir()) == ["protocol.json"]


def test_full_asks_for_a_gpu_and_keeps_nnunets_own_plan(tmp_path, capsys, monkeypatch):
    import torch
    up, down, out = _folder(tmp_path, "up"), _folder(tmp_path, "down"), tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evidence", "--upstream", str(up), "--downstream", str(down), "--out", str(out), "--full"]) == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err and not out.exists()
    seen = {}
    monkeypatch.setattr("nnunet_tpp.evidence.protocol3d.run_evidence_3d", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["evidence", "--upstream", str(up), "--downstream", str(down), "--full", "--device", "cpu",
                 "--epochs", "7"]) == 0
    cfg = seen["cfg"]
    assert (cfg.voxels, cfg.batch_size, cfg.device, cfg.epochs, cfg.upstream_epochs) == (None, None, "cpu", 7, 250)
