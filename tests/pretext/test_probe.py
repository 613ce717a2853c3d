"""``nnunet-tpp tpp-probe --data``: a linear probe across cases of real MRI (CHAOS T2), trained on views of some
cases and tested on others, per seed, for every arm (tiny settings here; the README reports the STU-Net-S run)."""
import json

import numpy as np
import pytest

from nnunet_tpp.cli import build_parser
from nnunet_tpp.pretext.dino import PretextSettingsError
from nnunet_tpp.pretext.probe import ARMS, ProbeConfig, format_table, probe_views, read_cases, run_probe
from tests.conftest import SHARED, require

CHAOS = SHARED / "data" / "mri3d" / "chaos_t2"


def _cfg(tmp_path, **kw):
    return ProbeConfig(**{**dict(data=str(require(CHAOS)), out=str(tmp_path / "probe"), dims=[4, 8, 8, 8, 8, 8],
                                 upstream_steps=2, upstream_patch=32, upstream_cases=1, per_class=2, view=(8, 32, 32),
                                 seeds=2, epochs=1, iterations=1, batch=2, max_cases=4, test_share=0.5), **kw})


def test_every_arm_is_scored_on_held_out_cases_per_seed(tmp_path):
    lines = []
    result = run_probe(_cfg(tmp_path), log=lines.append)
    assert tuple(result["accuracy"]) == ARMS
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in result["accuracy"].values())
    for split in result["splits"]:  # training and test cases never overlap
        assert not set(split["train"]) & set(split["test"]) and len(split["test"]) == 2
    # the head-only control cannot change the encoder: its probe is the one at the PEFT method's initialisation
    assert result["accuracy"]["head-only control"] == result["accuracy"]["+ PEFT at init"]
    table = format_table(result)
    assert all(f"| {arm} |" in table for arm in ARMS) and "± " in table
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["summary"] == result["summary"]
    assert any("upstream pre-training" in line for line in lines)


def test_views_are_centred_on_their_label_inside_the_volume():
    images, labels = read_cases(str(require(CHAOS)), (7.7, 2.5, 2.5), max_cases=3)
    name = sorted(images)[0]
    centres, ys = probe_views(labels[name], images[name][0], (8, 32, 32), 5, np.random.default_rng(0))
    assert set(ys.tolist()) == {0, 1, 2, 3, 4} and np.bincount(ys).max() <= 5
    assert all(labels[name][tuple(c)] == y for c, y in zip(centres, ys))
    shape = labels[name].shape
    assert all(c[a] - v // 2 >= 0 and c[a] - v // 2 + v <= shape[a] for c in centres for a, v in enumerate((8, 32, 32)))


def test_probe_is_a_command_and_refuses_bad_input_before_writing(tmp_path):
    args = build_parser().parse_args(["tpp-probe", "--data", "d", "--view", "8", "32", "32", "--seeds", "5"])
    assert args.func.__name__ == "probe_main" and args.view == [8, 32, 32] and args.seeds == 5
    with pytest.raises(PretextSettingsError, match="does not fit the plan's pooling"):
        run_probe(_cfg(tmp_path, view=(8, 24, 32)))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_probe(_cfg(tmp_path, data=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="larger than cases"):
        run_probe(_cfg(tmp_path, view=(64, 32, 32), max_cases=3))
    assert not (tmp_path / "probe").exists()
