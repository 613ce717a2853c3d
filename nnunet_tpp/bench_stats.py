"""The statistics of ``nnunet-tpp bench``'s interleaved rounds: per method the median over rounds, per-round ratios
to full fine-tuning, their median and min-max spread, and whether that spread resolves the ratio.

Every round measures every method once, each in a fresh process, so that a method's ratio to full fine-tuning is
taken between two measurements made close together in time: the machine's load, which drifts over minutes, moves
both. The spread of the per-round ratios is what the machine's noise did to the ratio; when it straddles 1.0 the run
cannot say whether the method is faster or slower, and when it is wider than :data:`RESOLUTION` around the median
it cannot resolve an effect of that size. Importing this module imports neither torch nor the package.
"""
from __future__ import annotations

import statistics

RESOLUTION = 0.10  # the effect a benchmark must resolve: a spread wider than +-10 % around the median cannot


def median(values) -> float:
    """The median of a non-empty sequence of numbers."""
    return float(statistics.median(values))


def round_ratios(rounds: dict[int, dict], reference: dict[int, dict], key: str) -> list[float]:
    """``rounds[r][key] / reference[r][key]`` for every round both measured (rounds keyed by round index)."""
    return [rounds[r][key] / reference[r][key] for r in sorted(rounds) if r in reference and reference[r][key]]


def spread(ratios: list[float]) -> dict:
    """``{"ratio": median, "range": [min, max], "half_width": (max - min) / 2 / median}`` of per-round ratios."""
    mid = median(ratios)
    lo, hi = min(ratios), max(ratios)
    return {"ratio": mid, "range": [lo, hi], "half_width": (hi - lo) / 2 / mid if mid else float("inf")}


def verdict(ratios: list[float], lower: str = "faster", higher: str = "slower",
            resolution: float = RESOLUTION) -> str:
    """What per-round ratios (method / full fine-tuning) can tell.

    Args:
        ratios: one ratio per round.
        lower, higher: the words for a ratio below / above 1 (``faster`` / ``slower`` for time).
        resolution: the largest spread half-width (fraction of the median) that counts as resolved.
    Returns:
        ``"<lower|higher>, resolved to +-X %"``; ``"<lower|higher>, but the spread +-X % is wider than +-10 %: not
        resolved"``; ``"no difference: the spread A-B includes 1.0, within +-X %"`` (X at most 10);
        ``"too wide to tell: the spread A-B straddles 1.0"``; or, with fewer than two rounds, a sentence saying that
        one round has no spread.
    """
    if len(ratios) < 2:
        return "one round, no spread: run --rounds 3 or more to tell"
    s = spread(ratios)
    lo, hi = s["range"]
    width = 100 * s["half_width"]
    if lo <= 1.0 <= hi:
        if s["half_width"] <= resolution:
            return f"no difference: the spread {lo:.2f}-{hi:.2f} includes 1.0, within +-{width:.0f} %"
        return f"too wide to tell: the spread {lo:.2f}-{hi:.2f} straddles 1.0"
    side = lower if hi < 1.0 else higher
    if s["half_width"] > resolution:
        return f"{side}, but the spread +-{width:.0f} % is wider than +-{100 * resolution:.0f} %: not resolved"
    return f"{side}, resolved to +-{width:.0f} %"


def summarise(per_round: dict[int, dict], keys: tuple[str, ...]) -> dict:
    """The median over rounds of each of ``keys`` (those every round has), plus ``"rounds_measured"``."""
    out = {"rounds_measured": len(per_round)}
    for key in keys:
        values = [m[key] for m in per_round.values() if m.get(key) is not None]
        if values:
            out[key] = median(values)
    return out
