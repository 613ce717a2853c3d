"""The settings of self-supervised adaptation (:mod:`nnunet_tpp.vision2d.ssa`) and their checks: the recipe
(:class:`SSASettings`, ESSA's defaults), which PEFT methods may adapt a ViT during SSA, and whether a run's SSA
settings fit its supervised stage. ``train2d`` runs these checks once, before anything is written
(:mod:`nnunet_tpp.vision2d.checks`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nnunet_tpp import peft
from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS as VIT_PEFT_DEFAULTS
from nnunet_tpp.pretext.dino import INPUT_NORMS
from nnunet_tpp.pretext.dinov2 import CENTERINGS, MASK_MODES

KEEP = ("teacher", "student")


class SSAError(ValueError):
    """SSA settings that cannot run, or a work folder that belongs to other settings."""


@dataclass
class SSASettings:
    """The SSA recipe, ESSA's defaults (``Train2dConfig.ssa_options`` overrides any field).

    ``iterations_per_epoch`` None: one pass over the images; ``lr`` None: 1e-3, 1e-4 for ``full``; warm-ups
    (``warmup_epochs`` of the lr, ``warmup_teacher_temp_epochs`` of the teacher temperature) are at most a tenth
    of the run; weight decay applies to weights, not to biases / norms / tokens; ``centering``,
    ``student_temp``, ``center_momentum``, ``*_weight``: see :class:`~nnunet_tpp.pretext.dinov2.DINOv2Loss`;
    ``out_dim`` / ``hidden_dim`` / ``bottleneck_dim``: the shared head; ``mask_*``: iBOT masking of the global
    views; ``n_local`` local views (always 2 global); ``*_scale``: crop areas; ``local_size_fraction``: local
    side / image side, rounded to a multiple of the patch; ``freeze_last_layer_epochs``: prototypes frozen;
    ``method_options``: options of ``ssa_method`` (``apla``: ``rows=-1`` unless given); ``keep``: ``teacher``
    (ESSA) or ``student`` weights become the backbone; ``seed``: crops and masks (None: the run's seed);
    ``head_input_norm``: ``batch`` (each head call's tokens standardised with their own statistics, in the
    teacher too; SSA's batches are large), ``none`` (DINOv2's own head) or ``running`` (see
    :class:`~nnunet_tpp.pretext.dino.DINOConfig`; one set of statistics for class and patch tokens).
    """

    batch_size: int = 64
    iterations_per_epoch: int | None = None
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-5
    weight_decay_end: float = 1e-4
    momentum_teacher: float = 0.994
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30.0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "centering"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_mode: str = "block"
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    local_size_fraction: float = 98 / 224
    grad_clip: float = 1.0
    freeze_last_layer_epochs: int = 1
    method_options: dict[str, Any] = field(default_factory=dict)
    keep: str = "teacher"
    seed: int | None = None
    head_input_norm: str = "batch"

    def validate(self) -> None:
        """Raises :class:`SSAError` for values that cannot run."""
        if self.batch_size < 2:
            raise SSAError(f"ssa batch_size must be >= 2 (KoLeo needs a nearest neighbour), got {self.batch_size}")
        if self.centering not in CENTERINGS or self.mask_mode not in MASK_MODES or self.keep not in KEEP:
            raise SSAError(f"ssa: centering must be one of {CENTERINGS}, mask_mode one of {MASK_MODES}, keep teacher "
                           f"or student (got {self.centering!r}, {self.mask_mode!r}, {self.keep!r})")
        if self.head_input_norm not in INPUT_NORMS:
            raise SSAError(f"ssa: head_input_norm must be one of {', '.join(INPUT_NORMS)}, got "
                           f"{self.head_input_norm!r}")
        if self.n_local < 0 or not 0 < self.local_size_fraction <= 1 or not 0 <= self.mask_probability <= 1:
            raise SSAError("ssa: need n_local >= 0, 0 < local_size_fraction <= 1, 0 <= mask_probability <= 1")

    def peak_lr(self, method: str) -> float:
        """``lr``, or ESSA's default for the method (1e-4 for ``full``, 1e-3 otherwise)."""
        return float(self.lr) if self.lr is not None else (1e-4 if method == "full" else 1e-3)


def ssa_settings(options: dict[str, Any] | None = None) -> SSASettings:
    """:class:`SSASettings` from ``Train2dConfig.ssa_options``; unknown keys raise :class:`SSAError`."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(SSASettings)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise SSAError(f"unknown ssa_options {unknown}; known: {sorted(fields)}")
    for key, value in options.items():
        if isinstance(fields[key].default, tuple):
            options[key] = tuple(float(v) for v in value)
    settings = SSASettings(**options)
    settings.validate()
    return settings


SSA_PEFT_DEFAULTS = {**VIT_PEFT_DEFAULTS, "apla": {"rows": -1}}  # ESSA's APLA trains every row of attn.proj


def check_method(method: str, options: dict[str, Any] | None = None, supervised: str | None = None) -> bool:
    """Raises ValueError unless ``method`` (with ``options``) can adapt a ViT during SSA.

    Args:
        supervised: the method of the supervised run that follows (None: measuring only, no run follows).
    Returns:
        True when the method is merged into the backbone after SSA (any supervised method may follow); False when
        it cannot merge and its parameters are carried into the supervised run instead, which needs
        ``supervised`` to be the same method.
    """
    entry = peft.get_method(method)  # PeftError (a ValueError) for an unknown name
    usable = sorted(m for m in peft.methods() if m != "linear_probe" and "ViT" in peft.get_method(m).models)
    if method not in usable:
        why = "trains nothing in the backbone" if method == "linear_probe" else "does not adapt a ViT"
        raise SSAError(f"ssa_method {method!r} {why}; use one of: {', '.join(usable)}")
    entry.parse_options({**SSA_PEFT_DEFAULTS.get(method, {}), **(options or {})})
    if entry.mergeable:
        return True
    if supervised is not None and supervised != method:
        mergeable = [m for m in usable if peft.get_method(m).mergeable]
        raise SSAError(f"ssa_method {method!r} cannot be merged into the backbone, so the supervised run must go on "
                       f"from its SSA-trained parameters with the same method (method {method!r}, not {supervised!r}); "
                       f"or use a mergeable ssa_method: {', '.join(mergeable)}")
    return False


def check_ssa_run(cfg) -> SSASettings:
    """Checks a run's SSA settings against its supervised stage, before anything is written.

    ``cfg`` is a :class:`~nnunet_tpp.vision2d.config.Train2dConfig` (``ssa_method``, ``ssa_options``, ``method``,
    ``method_options``, ``tpp``, ``target_parameters``). For a method that is carried rather than merged the SSA
    options default to the supervised ones and must equal them, and neither ``tpp`` nor ``target_parameters``
    may set the same parameters again.

    Returns:
        The SSA settings. Raises :class:`SSAError`.
    """
    settings = ssa_settings(cfg.ssa_options)
    method, supervised = cfg.ssa_method, getattr(cfg, "method", None)
    if check_method(method, settings.method_options, supervised) or supervised is None:
        return settings
    given = dict(getattr(cfg, "method_options", None) or {})
    settings.method_options = dict(settings.method_options or given)
    entry = peft.get_method(method)
    ssa_opts = entry.parse_options({**SSA_PEFT_DEFAULTS.get(method, {}), **settings.method_options})
    supervised_opts = entry.parse_options({**VIT_PEFT_DEFAULTS.get(method, {}), **given})
    if ssa_opts != supervised_opts:
        raise SSAError(f"ssa_method {method!r} carries its parameters into the supervised run, so its options must be "
                       f"the supervised ones: ssa {ssa_opts} vs {supervised_opts} (leave ssa method_options out)")
    if getattr(cfg, "tpp", "none") != "none" or getattr(cfg, "target_parameters", None) is not None:
        raise SSAError(f"ssa_method {method!r} already pre-trains the method's parameters (they are carried into the "
                       f"supervised run); leave out tpp / target_parameters, or use a mergeable ssa_method")
    return settings
