"""What per-round ratios can tell (``nnunet_tpp.bench_stats``), on hand-made ratios."""
import subprocess
import sys

import pytest

from nnunet_tpp.bench_stats import RESOLUTION, round_ratios, spread, summarise, verdict


def test_a_spread_within_10_percent_on_one_side_of_1_is_resolved():
    assert verdict([0.80, 0.84, 0.88]) == "faster, resolved to +-5 %"
    assert verdict([1.20, 1.25, 1.30], "smaller", "larger") == "larger, resolved to +-4 %"


def test_a_spread_that_straddles_1_tells_no_difference_or_nothing():
    assert verdict([0.95, 1.04, 1.02]) == "no difference: the spread 0.95-1.04 includes 1.0, within +-4 %"
    assert verdict([0.8, 1.0, 1.3]) == "too wide to tell: the spread 0.80-1.30 straddles 1.0"


def test_a_spread_wider_than_the_resolution_is_not_resolved():
    text = verdict([0.6, 0.7, 0.9])
    assert text.startswith("faster, but the spread +-21 %") and "not resolved" in text
    assert RESOLUTION == 0.10


def test_one_round_has_no_spread():
    assert "one round" in verdict([0.8]) and "--rounds" in verdict([0.8])


def test_ratios_pair_the_rounds_and_summaries_take_medians():
    method = {0: {"t": 2.0}, 1: {"t": 6.0}, 3: {"t": 1.0}}
    full = {0: {"t": 4.0}, 1: {"t": 6.0}, 2: {"t": 9.0}}
    assert round_ratios(method, full, "t") == [0.5, 1.0]  # rounds 2 and 3 lack a partner
    s = spread([0.5, 1.0, 0.8])
    assert s["ratio"] == 0.8 and s["range"] == [0.5, 1.0] and s["half_width"] == pytest.approx(0.3125)
    assert summarise(method, ("t", "missing")) == {"rounds_measured": 3, "t": 2.0}


def test_import_is_cheap():
    code = "import sys, nnunet_tpp.bench_stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
