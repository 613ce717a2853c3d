"""``nnunet-tpp tpp-probe``: a linear probe of pooled encoder features of views of the real CT before and after the
pretext stage, for a frozen random and a frozen pre-trained backbone (tiny settings here; the README reports the
STU-Net-S run)."""
import json

import pytest

from nnunet_tpp.cli import build_parser
from nnunet_tpp.pretext.dino import PretextSettingsError
from nnunet_tpp.pretext.probe import ProbeConfig, format_table, probe_views, run_probe
from tests.conftest import CT_IMAGE, CT_LABELS, require


def _cfg(tmp_path, **kw):
    return ProbeConfig(image=str(require(CT_IMAGE)), labels=str(require(CT_LABELS)), out=str(tmp_path / "probe"),
                       dims=[4, 8, 16, 16, 16, 16], upstream_steps=4, upstream_patch=32, upstream_cases=1, per_class=24,
                       epochs=1, iterations=2, batch=2, out_dim=256, **kw)


def test_probe_reports_both_backbones_before_and_after_the_stage(tmp_path):
    lines = []
    result = run_probe(_cfg(tmp_path), log=lines.append)
    assert set(result["accuracy"]) == {"random init", "pre-trained"}
    for acc in result["accuracy"].values():
        assert set(acc) == {"plain", "init", "after", "after_student"} and all(0 <= v <= 1 for v in acc.values())
    assert result["overlap"]["disjoint"] == 0.0
    assert set(result["diagnostics"]["pre-trained"]) == {"epoch", "loss", "teacher_entropy", "batch_mean_entropy",
                                                         "kl", "log_k"}
    table = format_table(result)
    assert "| random init |" in table and "| pre-trained |" in table and "after TPP" in table
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["accuracy"] == result["accuracy"]
    assert (tmp_path / "probe" / "upstream_stunet.pth").exists()  # the small pre-trained backbone, reused next time
    assert any("upstream pre-training" in line for line in lines)


def test_probe_views_are_balanced_and_split_by_z_slabs():
    import numpy as np
    import SimpleITK as sitk
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(require(CT_LABELS))))
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(require(CT_IMAGE))))
    centres, ys, train = probe_views(labels, hu, 32, 30, seed=0)
    assert np.bincount(ys).tolist() == [30, 30, 30]
    assert all(labels[tuple(c)] == y for c, y in zip(centres, ys))  # the label of a view is the organ at its centre
    for c in (0, 1, 2):  # every label on both sides of the split
        assert train[ys == c].any() and (~train[ys == c]).any()


def test_probe_is_a_command_and_refuses_bad_input_before_writing(tmp_path):
    args = build_parser().parse_args(["tpp-probe", "--image", "a.nii.gz", "--labels", "b.nii.gz", "--view", "24"])
    assert args.func.__name__ == "probe_main" and args.view == 24
    with pytest.raises(PretextSettingsError, match="does not fit the plan's pooling"):
        run_probe(_cfg(tmp_path, view=24))
    with pytest.raises(PretextSettingsError, match="must be > 0"):
        run_probe(_cfg(tmp_path, lr=-1.0))
    with pytest.raises(FileNotFoundError):
        run_probe(ProbeConfig(image=str(tmp_path / "missing.nii.gz"), labels=str(require(CT_LABELS)),
                              out=str(tmp_path / "probe")))
    assert not (tmp_path / "probe").exists()
