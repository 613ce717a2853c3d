"""Paired differences with bootstrap intervals, arm summaries and the 'learnt' rule."""
import numpy as np

from nnunet_tpp.evidence.stats import arm_summary, learnt, paired_difference


def records(values, seeds=(0, 1, 2)):
    """Per-case records: values[seed][case] is the Dice of the one label."""
    return [{"seed": s, "case": f"c{i}", "dice": {"organ": float(v)}, "hd95": {"organ": 5.0}}
            for s, row in zip(seeds, values) for i, v in enumerate(row)]


def test_a_constant_gain_has_a_point_interval_and_noise_straddles_zero():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.8, (3, 10))
    gain = paired_difference(records(base + 0.1), records(base))
    assert gain["n"] == 30 and np.isclose(gain["mean_difference"], 0.1)
    assert np.allclose(gain["ci95"], [0.1, 0.1])
    noise = paired_difference(records(base + rng.normal(0, 0.05, base.shape)), records(base))
    assert noise["ci95"][0] < 0 < noise["ci95"][1]


def test_only_shared_seed_and_case_pairs_count():
    a = records([[0.5, 0.6]], seeds=(0,)) + records([[0.9, 0.9]], seeds=(5,))
    b = records([[0.4, 0.4]], seeds=(0,))
    assert paired_difference(a, b)["n"] == 2 and np.isclose(paired_difference(a, b)["mean_difference"], 0.15)
    assert paired_difference(a, [])["n"] == 0


def test_the_spread_is_over_the_seeds_means():
    summary = arm_summary(records([[0.2, 0.4], [0.4, 0.6], [0.6, 0.8]]))
    assert np.isclose(summary["dice_mean"], 0.5) and np.isclose(summary["dice_std"], 0.2)
    assert summary["seeds"] == [0, 1, 2] and summary["hd95_mean"] == 5.0


def test_an_arm_learnt_only_when_clearly_above_the_untrained_network():
    rng = np.random.default_rng(1)
    untrained = rng.uniform(0.0, 0.2, (3, 8))
    assert learnt(records(untrained + 0.5), records(untrained))
    assert not learnt(records(untrained + rng.normal(0, 0.05, untrained.shape)), records(untrained))
