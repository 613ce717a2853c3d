"""The evidence split: whole subjects on one side, one fixed test set, seeded labelled draws."""
import pytest

from nnunet_tpp.evidence.split import SplitError, split_cases, subjects

NAMES = [f"pat{i:02d}_{frame}" for i in range(10) for frame in ("ed", "es")]


def test_a_subject_regex_groups_the_frames_of_one_patient():
    groups = subjects(NAMES, r"(pat\d+)")
    assert len(groups) == 10 and groups["pat03"] == ["pat03_ed", "pat03_es"]
    assert subjects(["b", "a"], None) == {"a": ["a"], "b": ["b"]}


@pytest.mark.parametrize("regex, words", [(r"pat\d+", "has no group"), (r"(zz\d+)", "does not match 20"),
                                          ("(pat", "not a regular expression")])
def test_a_regex_that_cannot_name_subjects_is_refused(regex, words):
    with pytest.raises(SplitError, match=words):
        subjects(NAMES, regex)


def test_the_test_set_holds_whole_subjects_and_never_meets_the_pool():
    split = split_cases(NAMES, r"(pat\d+)", 3)
    assert len(split.test) == 6 and len(split.pool) == 14 and not set(split.test) & set(split.pool)
    assert {n[:5] for n in split.test}.isdisjoint({n[:5] for n in split.pool})
    assert split_cases(NAMES, r"(pat\d+)", 3) == split  # fixed, whatever the seed


def test_each_seed_draws_its_own_labelled_cases_from_the_pool_only():
    split = split_cases(NAMES, r"(pat\d+)", 3)
    draws = [split.labelled(4, seed) for seed in range(3)]
    assert all(len(d) == 4 and set(d) <= set(split.pool) for d in draws)
    assert draws[0] == split.labelled(4, 0) and len({tuple(d) for d in draws}) > 1
    assert set(draws[0][:2]) == {draws[0][0][:5] + "_ed", draws[0][0][:5] + "_es"}  # a subject's frames together
    assert not set(split.validation(4, 0)) & set(draws[0])


def test_impossible_sizes_are_refused_with_the_valid_range():
    with pytest.raises(SplitError, match=r"give --test 1\.\.8"):
        split_cases(NAMES, r"(pat\d+)", 9)
    with pytest.raises(SplitError, match=r"give 1\.\.14"):
        split_cases(NAMES, r"(pat\d+)", 3).labelled(15, 0)
