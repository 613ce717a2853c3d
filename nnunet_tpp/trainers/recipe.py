"""Trainer recipes: what a trainer builds and how it optimises, as data.

Defaults per trainer family live in ``recipes.yaml`` next to this file; a user recipe (YAML, given with the
environment variable ``NNUNET_TPP_RECIPE``) overrides fields; ``NNUNET_TPP_EPOCHS``,
``NNUNET_TPP_ITERS_PER_EPOCH`` and ``NNUNET_TPP_VAL_ITERS_PER_EPOCH`` override the schedule.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from nnunet_tpp.models.lean import MemoryPaths
from nnunet_tpp.peft import get_method

ENV_RECIPE = "NNUNET_TPP_RECIPE"
ENV_EPOCHS = "NNUNET_TPP_EPOCHS"
ENV_ITERS = "NNUNET_TPP_ITERS_PER_EPOCH"
ENV_VAL_ITERS = "NNUNET_TPP_VAL_ITERS_PER_EPOCH"
ENV_PRETEXT_EPOCHS = "NNUNET_TPP_PRETEXT_EPOCHS"
ENV_PRETEXT_ITERS = "NNUNET_TPP_PRETEXT_ITERS_PER_EPOCH"
PRETEXTS = ("mae", "dino")


class RecipeError(ValueError):
    """An invalid recipe file or environment override."""


@dataclass
class TrainerRecipe:
    """Everything that distinguishes one of our trainers from another.

    Attributes:
        size: the backbone: an STU-Net size (S, B, L, H) or ``nnUNet`` (the network the plans describe).
        method: PEFT method name (``full`` trains every parameter, also from scratch).
        options: the method's options.
        initial_lr: SGD learning rate (nnU-Net's poly schedule).
        weight_decay: SGD weight decay on trainable parameters.
        epochs, iterations_per_epoch, val_iterations_per_epoch: schedule (None: nnU-Net's defaults).
        tpp: whether a TPP pretext stage runs before fine-tuning (set by the ``TPP<family>`` trainers; a user
            recipe cannot switch it).
        pretext: the pretext objective of the TPP stage: ``mae`` (masked reconstruction through the U-Net's
            decoder, after nnssl; :mod:`nnunet_tpp.pretext.masked`) or ``dino``
            (:mod:`nnunet_tpp.pretext.stage`).
        pretext_control: also run the head-only control and write ``tpp_target_check.json``
            (:mod:`nnunet_tpp.pretext.check`); the stage then draws from the training cases outside the evaluation
            set.
        pretext_eval_cases: share of the fold's training cases held out of the stage as the control's evaluation
            set (at least 1; ``pretext_control`` only).
        pretext_eval_samples: samples (views, and masks) of the evaluation set.
        pretext_epochs, pretext_iterations_per_epoch: length of the pretext stage.
        pretext_batch_size: samples per pretext iteration over all processes (its own, not nnU-Net's batch; None:
            the pretext's default, DINO 8, mae 2 as nnssl).
        pretext_view_size: the view size per axis (None: DINO's global views half the plan's patch, rounded to the
            pooling, local views half of them; mae: the plan's patch). Each axis must be a multiple of the plan's
            pooling; DINO views must fit every training case (mae pads smaller cases, as nnU-Net's loader does).
        pretext_lr: the peak learning rate (None: the pretext's default, DINO 5e-4 (AdamW, absolute), mae 1e-2
            (SGD, as nnssl)).
        pretext_workers: background processes cutting the views (None: nnU-Net's ``nnUNet_n_proc_DA``).
        pretext_feature_stages: (DINO) encoder stages pooled into the DINO head's input (negative: counted from the
            bottleneck; the default ``[-2, -1]`` is STU-Net's stages 4 and 5 and the last two stages of any network).
        pretext_min_lr: (DINO) the end of the cosine decay.
        pretext_teacher_temp: (DINO) the teacher's temperature (constant).
        pretext_keep: (DINO) whose target parameters the stage leaves: ``teacher`` (default) or ``student``.
        pretext_teacher_mode: (DINO) ``train`` (official) or ``eval``.
        pretext_clip: (DINO) gradient clipping ``per_parameter`` (official) or ``global``.
        pretext_mask_ratio, pretext_mask_block: (mae) share of blocks masked (0.75) and block edge in voxels (None:
            16 on a CNN U-Net, one token (8) on Primus, as nnssl).
        pretext_cases: the preprocessed cases the stage draws its images from (None: the fold's training cases).
            Unlabelled use of more images than the fold trains on, e.g. a whole training pool of which a few
            cases are labelled (``nnunet-tpp evidence``); their labels are never read by the stage.
        pretext_optimizer: (mae) ``sgd`` or ``adamw`` (None: nnssl's, SGD on a CNN U-Net, AdamW on Primus).
        lean_backward: the exact lean norm/activation memory path of :mod:`nnunet_tpp.models.lean` (norm +
            LeakyReLU (+ residual sum) keep only their output); it acts only where the backbone is frozen.
        activation_checkpointing: ``off``, ``on`` or ``auto`` (on when the estimated training peak does not fit
            the device; :mod:`nnunet_tpp.models.memory`).
    """

    size: str = "B"
    method: str = "conv_adapter"
    options: dict[str, Any] = field(default_factory=dict)
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    tpp: bool = False
    pretext: str = "mae"
    pretext_control: bool = False
    pretext_eval_cases: float = 0.2
    pretext_eval_samples: int = 8
    pretext_epochs: int = 50
    pretext_iterations_per_epoch: int = 100
    pretext_batch_size: int | None = None
    pretext_view_size: list[int] | None = None
    pretext_lr: float | None = None
    pretext_workers: int | None = None
    pretext_feature_stages: list[int] = field(default_factory=lambda: [-2, -1])
    pretext_min_lr: float = 1e-6
    pretext_teacher_temp: float = 0.01
    pretext_keep: str = "teacher"
    pretext_teacher_mode: str = "train"
    pretext_clip: str = "per_parameter"
    pretext_mask_ratio: float = 0.75
    pretext_mask_block: int | None = None
    pretext_optimizer: str | None = None
    pretext_cases: list[str] | None = None
    lean_backward: bool = True
    activation_checkpointing: str = "off"

    def __post_init__(self):
        try:
            MemoryPaths(activation_checkpointing=self.activation_checkpointing)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if not isinstance(self.lean_backward, bool):
            raise RecipeError(f"lean_backward must be true or false, got {self.lean_backward!r}")
        if self.pretext not in PRETEXTS:
            raise RecipeError(f"pretext must be one of {', '.join(PRETEXTS)}, got {self.pretext!r}")
        if not isinstance(self.pretext_control, bool):
            raise RecipeError(f"pretext_control must be true or false, got {self.pretext_control!r}")
        if not 0 < float(self.pretext_eval_cases) < 1 or int(self.pretext_eval_samples) < 1:
            raise RecipeError(f"pretext_eval_cases must lie between 0 and 1 (a share of the training cases) and "
                              f"pretext_eval_samples be >= 1, got {self.pretext_eval_cases}, "
                              f"{self.pretext_eval_samples}")
        if self.pretext_cases is not None and (not isinstance(self.pretext_cases, list) or not self.pretext_cases
                                               or not all(isinstance(c, str) for c in self.pretext_cases)):
            raise RecipeError(f"pretext_cases must be a non-empty list of case names (or null: the fold's "
                              f"training cases), got {self.pretext_cases!r}")
        if self.pretext_workers is not None and int(self.pretext_workers) < 0:
            raise RecipeError(f"pretext_workers must be >= 0 (or null: nnUNet_n_proc_DA), got {self.pretext_workers}")

    def network_spec(self) -> dict[str, Any]:
        """What the network is built from (stored in the plans, so nnUNetv2_predict rebuilds it): the backbone,
        the PEFT method with its resolved options, and the memory paths."""
        opts = dataclasses.asdict(get_method(self.method).parse_options(
            {**backbone_peft_defaults(self.size).get(self.method, {}), **self.options}))
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
        return {"size": self.size, "method": self.method, "options": opts,
                "memory": {"lean_backward": self.lean_backward,
                           "activation_checkpointing": self.activation_checkpointing}}


TPP_PREFIX = "TPP"
PRIMUS_METHODS = ("full", "linear_probe", "lora", "adapter")  # the methods with Primus trainers


def backbone_peft_defaults(key: str) -> dict[str, dict[str, Any]]:
    """The method options a backbone takes when the recipe gives none: a Primus (a transformer) those of the
    transformer descriptions (LoRA on q and v, as the LoRA paper); an STU-Net / nnU-Net network none (the dataclasses'
    own: LoRA on every block convolution)."""
    from nnunet_tpp.models.primus import is_primus_backbone
    from nnunet_tpp.models.transformer_sites import PEFT_DEFAULTS
    return PEFT_DEFAULTS if is_primus_backbone(key) else {}


@lru_cache(maxsize=1)
def recipe_families() -> dict[str, dict[str, Any]]:
    """The packaged families (``recipes.yaml``), plus a ``TPP<family>`` (a pretext stage first) for every family
    whose method adds parameters to a CNN U-Net or to Primus (:data:`PRIMUS_METHODS`): TPP wraps the registry, not
    one method.

    Returns:
        ``{family: its recipe fields}``, read once and cached: do not modify it.
    """
    text = resources.files("nnunet_tpp.trainers").joinpath("recipes.yaml").read_text()
    families = yaml.safe_load(text)
    for family, fields in list(families.items()):
        method = get_method(fields["method"])
        if method.adds_parameters and ("STUNet" in method.models or fields["method"] in PRIMUS_METHODS):
            families[TPP_PREFIX + family] = {**fields, "tpp": True}
    return families


def family_defaults(family: str) -> dict[str, Any]:
    """The packaged defaults of a trainer family (e.g. ``ConvAdapterTrainer``)."""
    return dict(recipe_families()[family])


def read_recipe_file(path: str) -> dict[str, Any]:
    """Reads a YAML recipe and checks its field names against :class:`TrainerRecipe`."""
    if not os.path.isfile(path):
        raise RecipeError(f"{ENV_RECIPE}={path!r}: file not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path!r}: a recipe is a mapping of fields, got {type(data).__name__}")
    data = data.get("trainer", data)
    known = {f.name for f in dataclasses.fields(TrainerRecipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{path!r}: unknown recipe field(s) {unknown}; valid: {sorted(known)}")
    return data


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise RecipeError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise RecipeError(f"{name} must be >= 1, got {value}")
    return value


def _families_running(method: str, tpp) -> str:
    """Advice naming the trainer families that run ``method`` (with or without TPP), or saying none does."""
    families = recipe_families()
    hits = sorted(f for f, d in families.items() if d["method"] == method and bool(d.get("tpp")) == bool(tpp))
    if hits:
        suffixes = "_S, _B, _L, _H or _nnUNet" if "STUNet" in get_method(method).models else \
            "_Primus_S ... _Primus_L, _PrimusV3_S ... _PrimusV3_L or _Primus"
        return f"use {' or '.join(hits)} (with a backbone suffix: {suffixes})"
    known = ", ".join(sorted({d["method"] for d in families.values()}))
    return f"no nnU-Net trainer runs {method!r}; the trainers' methods are {known} (`nnunet-tpp trainers`)"


def _tpp_variant(family: str, want_tpp: bool) -> str:
    """Advice naming the TPP (or plain) variant of ``family``, or saying it has none."""
    base = family[len(TPP_PREFIX):] if family.startswith(TPP_PREFIX) else family
    other = TPP_PREFIX + base if want_tpp else base
    if other != family and other in recipe_families():
        return f"use {other} instead (same backbone suffix), or remove tpp from the recipe"
    return (f"{family} has no TPP variant: its method adds no parameters to pre-train; remove tpp from the recipe"
            if want_tpp else "remove tpp from the recipe")


def resolve_recipe(family: str, size: str) -> TrainerRecipe:
    """Family defaults, then the user's recipe file, then the schedule environment variables.

    Args:
        family: trainer family name (class name without the size suffix).
        size: the class's STU-Net size.
    Returns:
        The validated :class:`TrainerRecipe` (unknown PEFT options raise here, before any training).
    """
    fields = {"size": size, **family_defaults(family)}
    user_file = os.environ.get(ENV_RECIPE)
    if user_file:
        user = read_recipe_file(user_file)
        if "method" in user and user["method"] != fields["method"]:
            raise RecipeError(f"{user_file!r} asks for method {user['method']!r} but this trainer runs "
                              f"{fields['method']!r}; {_families_running(user['method'], fields.get('tpp'))}")
        if "tpp" in user and bool(user["tpp"]) != bool(fields.get("tpp")):
            raise RecipeError(f"{user_file!r} sets tpp={user['tpp']!r}, which {family} does not run; "
                              f"{_tpp_variant(family, bool(user['tpp']))}")
        if "size" in user and str(user["size"]).lower() != size.lower():
            raise RecipeError(f"{user_file!r} asks for backbone {user['size']!r} but this trainer builds "
                              f"{size}; use the trainer with suffix _{user['size']}")
        fields.update({k: v for k, v in user.items() if k not in ("method", "size", "tpp")})
    for key, env in (("epochs", ENV_EPOCHS), ("iterations_per_epoch", ENV_ITERS),
                     ("val_iterations_per_epoch", ENV_VAL_ITERS), ("pretext_epochs", ENV_PRETEXT_EPOCHS),
                     ("pretext_iterations_per_epoch", ENV_PRETEXT_ITERS)):
        value = _env_int(env)
        if value is not None:
            fields[key] = value
    recipe = TrainerRecipe(**fields)
    recipe.network_spec()  # validates method and options now
    return recipe
