"""The evidence protocol's data split: test subjects chosen once, each seed's labelled cases drawn from the rest.

A *subject* is what ``--group REGEX``'s first group reads from a case name (``la_012_ed`` and ``la_012_es`` with
``(la_\\d+)``), so several volumes of one subject never sit on both sides; without a regex every case is its own
subject.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 20261204  # the test split is fixed: one split for every seed and arm


class SplitError(ValueError):
    """A split that cannot be made as asked; the message says what to change."""


def subjects(names: list[str], group: str | None, match_on: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Groups case names by subject.

    Args:
        names: case names.
        group: a regular expression whose first group names the subject (searched in each name); None: each case
            is its own subject.
        match_on: the text the regex is searched in per case name (e.g. its file name; default: the name).
    Returns:
        ``{subject: [case names, sorted]}``. Raises :class:`SplitError` naming the cases the regex does not match.
    """
    if group is None:
        return {n: [n] for n in sorted(names)}
    try:
        pattern = re.compile(group)
    except re.error as e:
        raise SplitError(f"--group {group!r} is not a regular expression: {e}") from None
    if pattern.groups < 1:
        raise SplitError(f"--group {group!r} has no group: put the subject part in parentheses, e.g. '(la_\\d+)'")
    out: dict[str, list[str]] = {}
    unmatched = []
    for name in sorted(names):
        text = (match_on or {}).get(name, name)
        match = pattern.search(text)
        if match is None or match.group(1) is None:
            unmatched.append(text)
            continue
        out.setdefault(match.group(1), []).append(name)
    if unmatched:
        raise SplitError(f"--group {group!r} does not match {len(unmatched)} case name(s): "
                         f"{', '.join(unmatched[:10])}; its first group must name each case's subject")
    return out


@dataclass(frozen=True)
class Split:
    """The test cases and the training pool (case names), and the subjects behind them."""

    test: list[str]
    pool: list[str]
    subject_of: dict[str, str]

    def labelled(self, n: int, seed: int) -> list[str]:
        """The ``n`` labelled training cases of a seed: whole subjects in a seeded order, until ``n`` cases (the
        last subject's volumes may be cut to keep exactly ``n``)."""
        if not 1 <= n <= len(self.pool):
            raise SplitError(f"--labelled {n}: the training pool has {len(self.pool)} case(s); give 1..{len(self.pool)}")
        return self._ordered(seed)[:n]

    def validation(self, n: int, seed: int, count: int = 1) -> list[str]:
        """``count`` pool cases outside the seed's labelled ones, for nnU-Net's fold bookkeeping (validation is
        skipped; these cases are never scored)."""
        rest = self._ordered(seed)[n:]
        return rest[:count] if rest else self._ordered(seed)[:count]

    def record(self, n: int, seeds: list[int]) -> dict:
        """``{"test", "pool", "labelled": {seed: cases}}`` for the report."""
        return {"test": self.test, "pool": self.pool, "labelled": {str(s): self.labelled(n, s) for s in seeds}}

    def _ordered(self, seed: int) -> list[str]:
        by_subject: dict[str, list[str]] = {}
        for case in self.pool:
            by_subject.setdefault(self.subject_of[case], []).append(case)
        order = np.random.default_rng([SPLIT_SEED, seed + 1]).permutation(sorted(by_subject))
        return [case for subject in order for case in sorted(by_subject[subject])]


def split_cases(names: list[str], group: str | None, test_subjects: int, match_on: dict[str, str] | None = None
                ) -> Split:
    """Chooses ``test_subjects`` whole subjects as the test set (a fixed seeded draw) and leaves the rest as the
    training pool (``match_on``: see :func:`subjects`).

    Returns:
        A :class:`Split`. Raises :class:`SplitError` when the regex fails or fewer than two subjects would remain
        for training.
    """
    groups = subjects(names, group, match_on)
    if test_subjects < 1 or test_subjects > len(groups) - 2:
        raise SplitError(f"--test {test_subjects}: the folder has {len(groups)} subject(s); the test set needs at "
                         f"least 1 and the training pool at least 2 (give --test 1..{max(1, len(groups) - 2)})")
    order = np.random.default_rng(SPLIT_SEED).permutation(sorted(groups))
    test_ids = set(order[:test_subjects])
    test = sorted(c for s in test_ids for c in groups[s])
    pool = sorted(c for s in groups if s not in test_ids for c in groups[s])
    return Split(test, pool, {c: s for s, cases in groups.items() for c in cases})
