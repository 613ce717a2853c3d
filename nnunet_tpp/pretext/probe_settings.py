"""Settings of the TPP probe (:class:`ProbeConfig`), apart from :mod:`nnunet_tpp.pretext.probe` so that its command
line (:mod:`nnunet_tpp.pretext.probe_cli`) reads the defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProbeConfig:
    """Settings of :func:`nnunet_tpp.pretext.probe.run_probe` (see that module's docstring)."""

    data: str = ""
    out: str = "tpp_probe"
    size: str = "S"
    method: str = "conv_adapter"
    backbone: str | None = None
    upstream_steps: int = 200
    upstream_patch: int = 32
    upstream_cases: int = 4
    spacing: tuple[float, float, float] = (7.7, 2.5, 2.5)
    view: tuple[int, int, int] = (16, 48, 48)
    per_class: int = 6
    test_share: float = 0.4
    seeds: int = 3
    epochs: int = 6
    iterations: int = 10
    batch: int = 2
    max_cases: int | None = None
    feature_stages: tuple[int, ...] = (-2, -1)
    seed: int = 0
    threads: int | None = None
    dims: list[int] | None = field(default=None)  # (tests) custom STU-Net widths instead of ``size``
