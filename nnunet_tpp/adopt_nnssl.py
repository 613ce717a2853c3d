"""``nnunet-tpp adopt-plans NNSSL_CHECKPOINT -d D``: nnU-Net plans for dataset D from an nnssl checkpoint's adaptation
plan, written as nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` writes them, then nnU-Net's preprocessing.

nnU-Net master's route: start from the dataset's own nnU-Net plans (``nnUNetPlans.json`` or a ResEnc preset; when
there are none, ``nnUNetv2_plan_experiment`` writes nnU-Net's defaults first, as master's documentation has the user
do), keep only ``3d_fullres`` and set in it: the architecture the checkpoint names (Primus as master writes it: a
preset name or explicit sizes; ResEnc-L and nnssl's dynamic U-Nets as the full ``dynamic_network_architectures``
class and arguments nnU-Net 2.8.1 builds), the spacing (``like_pretrained``: the pre-training spacing, master's
recommended mode; ``default_nnunet``; ``fixed``), the pre-training normalisation for every channel, the recommended
downstream patch (or ``--patch``), batch size 2, its own data identifier; and master's ``pretrain_info`` block
(checkpoint path, keys, pre-training patch, citations), so that master's ``nnUNetv2_train_pretrained`` can use the
same plans. Everything is checked before the first write.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnunet_tpp.adopt_plans import (AdoptPlansError, TargetDataset, adopt_plans, free_plans_file, preprocess,
                                    run_fingerprint, target_dataset, write_plans)
from nnunet_tpp.nnunet_commands import run_nnunet

SPACING_MODES = ("like_pretrained", "default_nnunet", "fixed")
BASE_PLANS = ("nnUNetPlans", "nnUNetResEncUNetPlans", "nnUNetResEncUNetMPlans", "nnUNetResEncUNetLPlans",
              "nnUNetResEncUNetXLPlans")
UNET = "dynamic_network_architectures.architectures.unet."
IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]
# nnU-Net master's get_network_from_name("ResEncL"), in the form nnU-Net 2.8.1's get_network_from_plans builds
RESENC_L = {"network_class_name": UNET + "ResidualEncoderUNet", "_kw_requires_import": IMPORTS, "arch_kwargs": {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}}


def read_nnssl_checkpoint(path: str | os.PathLike):
    """The adaptation plan of an nnssl checkpoint (read with ``weights_only=True``, memory-mapped).

    Raises:
        AdoptPlansError: not a readable checkpoint, or no complete adaptation plan.
    """
    from nnunet_tpp.models import file_kinds
    from nnunet_tpp.models.nnssl_checkpoint import AdaptationPlanError, read_adaptation_plan
    from nnunet_tpp.models.stunet_checkpoint import CheckpointError, read_checkpoint
    try:
        checkpoint = read_checkpoint(path, mmap=True, expected=file_kinds.NNUNET_CHECKPOINT)
        return read_adaptation_plan(checkpoint, str(path))
    except (CheckpointError, AdaptationPlanError) as e:
        raise AdoptPlansError(str(e)) from None


def architecture_entry(plan) -> dict:
    """The plans' ``architecture`` for the network an adaptation plan names.

    Raises:
        AdoptPlansError: an architecture nnunet_tpp cannot build (named, with the ones it can).
    """
    from nnunet_tpp.models.primus import PrimusError, spec_from_architecture
    name = plan.architecture
    if name.startswith("Primus"):
        entry = {"network_class_name": name, "arch_kwargs": plan.arch_kwargs,
                 "_kw_requires_import": plan.arch_kwargs_requiring_import}
        try:
            spec_from_architecture(entry)
        except PrimusError as e:
            raise AdoptPlansError(str(e)) from None
        return entry
    if name == "ResEncL":
        return json.loads(json.dumps(RESENC_L))
    if name in ("ResidualEncoderUNet", "PlainConvUNet") and plan.arch_kwargs:
        kwargs = dict(plan.arch_kwargs)
        if name == "PlainConvUNet" and "n_blocks_per_stage" in kwargs:  # nnssl's one field for both U-Nets
            kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
        imports = [k for k in IMPORTS if k in kwargs]
        return {"network_class_name": UNET + name, "arch_kwargs": kwargs, "_kw_requires_import": imports}
    raise AdoptPlansError(f"the checkpoint's adaptation plan names {name!r}{' without arguments' * (not plan.arch_kwargs)}"
                          f"; nnunet_tpp builds PrimusS/B/M/L, a Primus with explicit sizes, ResEncL, and "
                          f"ResidualEncoderUNet / PlainConvUNet with their arguments")


def patch_divisor(architecture: dict) -> tuple[int, int, int]:
    """What every patch axis must divide by: the Primus patch embedding, or a U-Net's total stride."""
    from nnunet_tpp.models.primus import spec_from_architecture
    spec = spec_from_architecture(architecture)
    if spec is not None:
        return spec.patch_embed_size
    divisor = [1, 1, 1]
    for stride in architecture["arch_kwargs"]["strides"]:
        stride = [stride] * 3 if isinstance(stride, int) else stride
        divisor = [d * int(s) for d, s in zip(divisor, stride)]
    return tuple(divisor)


def check_patch(patch, architecture: dict) -> list[int]:
    """``patch`` as a list, or :class:`AdoptPlansError` when an axis does not divide by :func:`patch_divisor`."""
    divisor = patch_divisor(architecture)
    patch = [int(p) for p in patch]
    if len(patch) != 3 or any(p <= 0 or p % d for p, d in zip(patch, divisor)):
        kind = "Primus embeds 8x8x8 patches" if architecture["network_class_name"].startswith("Primus") else \
            "the U-Net's strides"
        raise AdoptPlansError(f"patch {patch} does not fit the checkpoint's {architecture['network_class_name']}: every "
                              f"axis must be divisible by {list(divisor)} ({kind}); pass --patch X Y Z")
    return patch


def new_spacing(mode: str, plan, base_spacing, spacing=None, echo=print) -> list[float]:
    """The 3d_fullres spacing: the pre-training one (``like_pretrained``; nnU-Net's when the pre-training did not
    resample), nnU-Net's own (``default_nnunet``) or ``spacing`` (``fixed``)."""
    if mode == "fixed":
        if spacing is None or len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
            raise AdoptPlansError("--spacing-mode fixed needs --spacing X Y Z (three positive spacings in mm, in the "
                                  "plans' axis order)")
        return [float(s) for s in spacing]
    if mode == "like_pretrained":
        if plan.pretrain_spacing is not None:
            return list(plan.pretrain_spacing)
        echo("the pre-training did not resample (spacing None): using nnU-Net's spacing for the dataset")
    elif mode != "default_nnunet":
        raise AdoptPlansError(f"spacing mode {mode!r}: choose one of {', '.join(SPACING_MODES)}")
    return [float(s) for s in base_spacing]


def normalization(plan, channels: int) -> list[str]:
    """The pre-training normalisation for each of the dataset's channels (one scheme repeated)."""
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
    scheme = plan.pretrain_normalization[0]
    if not hasattr(schemes, scheme):
        raise AdoptPlansError(f"the pre-training used normalisation {scheme!r}, which nnU-Net does not have")
    return [scheme] * channels


def base_plans(target: TargetDataset, num_processes: int, echo=print) -> dict:
    """The dataset's own nnU-Net plans (nnU-Net master looks for the same files); when it has none, nnU-Net's
    fingerprint extraction and ``nnUNetv2_plan_experiment`` write its default ``nnUNetPlans.json`` first."""
    for name in BASE_PLANS:
        if (target.preprocessed / f"{name}.json").is_file():
            return json.loads((target.preprocessed / f"{name}.json").read_text())
    run_fingerprint(target, num_processes, echo)
    run_nnunet(["nnUNetv2_plan_experiment", "-d", target.dataset_id], dict(os.environ), target.log, echo)
    return json.loads((target.preprocessed / "nnUNetPlans.json").read_text())


def nnssl_plans(plan, base: dict, target: TargetDataset, plans_name: str, checkpoint: str, architecture: dict,
                patch, spacing: list[float]) -> dict:
    """The plans for D: ``base`` with only ``3d_fullres``, set from the adaptation plan, and ``pretrain_info``."""
    if "3d_fullres" not in base.get("configurations", {}):
        raise AdoptPlansError(f"{target.name}'s nnU-Net plans have no 3d_fullres configuration (2-D data?); nnssl "
                              f"checkpoints are 3-D")
    plans = json.loads(json.dumps(base))
    config = plans["configurations"]["3d_fullres"]
    config.update(spacing=spacing, batch_size=2, normalization_schemes=normalization(plan, target.channels),
                  data_identifier=f"{plans_name}_3d_fullres", preprocessor_name="DefaultPreprocessor",
                  architecture=architecture, patch_size=list(patch))
    plans.update(plans_name=plans_name, configurations={"3d_fullres": config})
    plans["pretrain_info"] = {
        "checkpoint_path": os.path.abspath(checkpoint), "checkpoint_name": plans_name,
        "key_to_encoder": plan.key_to_encoder, "key_to_stem": plan.key_to_stem,
        "keys_to_in_proj": list(plan.keys_to_in_proj), "key_to_lpe": plan.key_to_lpe,
        "pt_num_in_channels": plan.pretrain_channels, "pt_used_patchsize": list(plan.pretrain_patch),
        "pt_recommended_downstream_patchsize": list(plan.recommended_patch),
        "citations": json.loads(json.dumps(list(plan.citations), default=str)), "trainer_name": plan.trainer_name}
    return plans


def default_nnssl_plans_name(plan, patch_override=None) -> str:
    """``nnsslPlans_<architecture>_<nnssl trainer>`` (``_p<patch>`` with ``--patch``)."""
    name = f"nnsslPlans_{plan.architecture}_{plan.trainer_name or 'nnssl'}".replace("__", "_")
    return name + (f"_p{'x'.join(map(str, patch_override))}" if patch_override else "")


def adopt_nnssl_plans(checkpoint: str | os.PathLike, dataset: str, plans_name: str | None = None,
                      spacing_mode: str = "like_pretrained", spacing=None, patch=None, num_processes: int = 4,
                      run_preprocessing: bool = True, echo=print) -> Path:
    """Writes plans for ``dataset`` from an nnssl checkpoint's adaptation plan and preprocesses it.

    Args:
        checkpoint: the nnssl ``checkpoint_final.pth``.
        dataset: target dataset id or name (raw, under ``$nnUNet_raw``).
        plans_name: the new plans identifier (default :func:`default_nnssl_plans_name`).
        spacing_mode: ``like_pretrained`` (default), ``default_nnunet`` or ``fixed`` (with ``spacing``).
        patch: the patch (default: the checkpoint's recommended downstream patch); each axis must divide by the
            patch embedding (8, Primus) or the U-Net's total stride.
        num_processes: nnU-Net's ``-np``.
        run_preprocessing: False writes the plans only (still running nnU-Net's planning when D has no plans).
    Returns:
        The written plans file.
    Raises:
        AdoptPlansError: before anything is written, when the checkpoint has no usable adaptation plan, D's
            channels do not fit (fewer than pre-trained, or several channels pre-trained and another number here),
            the patch does not fit, the spacing mode is unknown or the plans name is taken.
    """
    plan = read_nnssl_checkpoint(checkpoint)
    target = target_dataset(dataset)
    channels = target.channels
    if channels < plan.pretrain_channels or (plan.pretrain_channels != 1 and channels != plan.pretrain_channels):
        raise AdoptPlansError(f"{target.name} has {channels} input channel(s), the checkpoint was pre-trained on "
                              f"{plan.pretrain_channels}: only a 1-channel stem can be repeated over more channels")
    if spacing_mode not in SPACING_MODES:
        raise AdoptPlansError(f"spacing mode {spacing_mode!r}: choose one of {', '.join(SPACING_MODES)}")
    architecture = architecture_entry(plan)
    patch = check_patch(patch if patch is not None else plan.recommended_patch, architecture)
    new_spacing(spacing_mode, plan, [1.0, 1.0, 1.0], spacing, echo=lambda m: None)  # checks --spacing now
    normalization(plan, channels)
    plans_file = free_plans_file(target, plans_name or default_nnssl_plans_name(plan, None if patch == list(
        plan.recommended_patch) else patch))
    base = base_plans(target, num_processes, echo)
    spacing = new_spacing(spacing_mode, plan, base["configurations"].get("3d_fullres", {}).get("spacing", [1] * 3),
                          spacing, echo)
    plans = nnssl_plans(plan, base, target, plans_file.stem, str(checkpoint), architecture, patch, spacing)
    write_plans(plans, target, plans_file, echo)
    echo(f"wrote {plans_file}: {plan.architecture} of {checkpoint} ({plan.trainer_name}), spacing {spacing} "
         f"({spacing_mode}), patch {patch}, normalisation {plans['configurations']['3d_fullres']['normalization_schemes']}")
    if run_preprocessing:
        preprocess(target, plans_file, ("3d_fullres",), num_processes, echo)
    return plans_file


def is_nnssl_file(source: str | os.PathLike) -> bool:
    """True when ``source`` is a file with an nnssl adaptation plan (read safely; False for anything else)."""
    path = Path(source)
    if not path.is_file():
        return False
    from nnunet_tpp.models import file_kinds
    try:
        obj, _ = file_kinds.read(path, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and "nnssl_adaptation_plan" in obj


def adopt(source: str | os.PathLike, dataset: str, plans_name: str | None = None,
          configurations: tuple[str, ...] = ("3d_fullres",), num_processes: int = 4, run_preprocessing: bool = True,
          spacing_mode: str = "like_pretrained", spacing=None, patch=None, echo=print) -> Path:
    """``nnunet-tpp adopt-plans``: an nnssl checkpoint goes to :func:`adopt_nnssl_plans` (3d_fullres only), any
    other model folder or checkpoint to :func:`nnunet_tpp.adopt_plans.adopt_plans` (where ``--patch`` and the
    spacing options do not apply)."""
    if is_nnssl_file(source):
        if tuple(configurations) != ("3d_fullres",):
            raise AdoptPlansError(f"an nnssl checkpoint gives plans for 3d_fullres only, not {list(configurations)}")
        return adopt_nnssl_plans(source, dataset, plans_name, spacing_mode, spacing, patch, num_processes,
                                 run_preprocessing, echo)
    if patch is not None or spacing is not None or spacing_mode != "like_pretrained":
        raise AdoptPlansError("--patch, --spacing-mode and --spacing apply to nnssl checkpoints; an nnU-Net model "
                              "keeps its plans' patch and spacing (its network was built for them)")
    return adopt_plans(source, dataset, plans_name, configurations, num_processes, run_preprocessing, echo)
