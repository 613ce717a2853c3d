"""Everything ``train2d`` checks before its first write into ``--out``: a refused run leaves the folder
byte-identical.

:func:`check_settings` runs the checks that need no data (method and options, SSA, a finished run, the
ViT's shape, the device, a run folder that belongs to other settings); :func:`check_backbones` the ones that
need the built backbones (``partial``'s ``quarter: auto`` needs each backbone's pre-training). The data and
the checkpoints are read by the caller before anything is written, so their errors come first as well.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import yaml
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.vision2d.config import LITEMEDSAM, Train2dConfig, identity_of
from nnunet_tpp.vision2d.model import build_task_model
from nnunet_tpp.vision2d.ssa_settings import check_ssa_run

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pth"
CONFIG_FILE = "config.yaml"


class RunExistsError(RuntimeError):
    """The run folder holds a finished run, or a run with other settings."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; other names as given.

    Raises:
        RuntimeError: a CUDA device that this machine does not have (no CUDA at all, or an index past the last).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RuntimeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but this torch sees no CUDA device (a CPU build or no "
                               f"GPU); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"device {name!r} does not exist: this machine has {count} CUDA device(s) "
                               f"(cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        raise RuntimeError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _changed(saved: dict, cfg: Train2dConfig) -> list[str]:
    ours, theirs = cfg.identity(), identity_of(saved)
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def check_vit_shape(cfg: Train2dConfig) -> None:
    """Raises ValueError for an unknown option, or an image size the patch does not divide (ViT archs)."""
    if cfg.arch == LITEMEDSAM:
        return  # its fixed input is checked by the config
    from nnunet_tpp.models.vit import ViTConfig, vit_config
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(cfg.arch_options) - known)
    if unknown:
        raise ValueError(f"unknown arch option(s) {unknown}; known: {sorted(known - {'img_size', 'patch_size'})}")
    overrides = dict(cfg.arch_options)
    if cfg.patch_size:
        overrides["patch_size"] = cfg.patch_size
    try:
        vit_config(cfg.arch, img_size=cfg.img_size, **overrides)
    except ValueError as e:
        raise ValueError(f"{e}: choose --img-size as a multiple of --patch-size" if "multiple" in str(e)
                         else str(e)) from None


def check_run_folder(cfg: Train2dConfig) -> dict | None:
    """Checks that ``cfg.out`` is new, or an unfinished run with the same settings (runtime fields such as the
    device may differ).

    Returns:
        The unfinished run's checkpoint (``checkpoint.pth``, read once here for the resume), or None.
    Raises:
        RunExistsError: a finished run, or a folder whose ``config.yaml`` / ``checkpoint.pth`` holds other settings.
    """
    out = cfg.out
    if (out / METRICS_FILE).exists():
        raise RunExistsError(f"{out} already holds a finished run ({METRICS_FILE}); choose another --out")
    written = out / CONFIG_FILE
    if written.exists():
        try:
            saved = yaml.safe_load(written.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RunExistsError(f"{written} is unreadable ({e}); choose another --out") from None
        changed = _changed(saved, cfg) if isinstance(saved, dict) else ["(not a mapping)"]
        if changed:
            raise RunExistsError(f"{out} holds a run with other settings ({', '.join(changed)} differ from "
                                 f"{written}); resume it with the same settings or choose another --out")
    checkpoint = out / CHECKPOINT_FILE
    if not checkpoint.exists():
        return None
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    changed = _changed(saved.get("config", {}), cfg)
    if changed:
        raise RunExistsError(f"{checkpoint} belongs to an unfinished run with other settings ({', '.join(changed)}); "
                             f"resume it with the same settings or choose another --out")
    return saved


def check_settings(cfg: Train2dConfig) -> tuple[torch.device, dict | None]:
    """The checks that need no data: method and options, SSA against the supervised stage, the ViT's shape, the
    device and the run folder.

    Returns:
        ``(device, checkpoint of an unfinished run or None)``. Raises ValueError / RuntimeError naming the fix.
    """
    method = peft.get_method(cfg.method)
    method.parse_options(cfg.method_options)
    if "ViT" not in method.models:
        raise peft.PeftError(f"PEFT method {cfg.method!r} adapts {', '.join(method.models)}, not a ViT; see "
                             f"nnunet-tpp methods")
    if cfg.ssa != "none":
        check_ssa_run(cfg)
    check_vit_shape(cfg)
    device = resolve_device(cfg.device)
    return device, check_run_folder(cfg)


def check_backbones(cfg: Train2dConfig, backbones: list[nn.Module], num_classes: int = 2) -> None:
    """The method's checks on the built backbones before anything is written: it is applied to a copy of the task
    model (``partial``'s ``quarter: auto`` needs a known pre-training of each backbone; ``vpt``, ``evp`` and ``dtl``
    need one token stream, which LiteMedSAM's encoder has not); raises :class:`~nnunet_tpp.peft.PeftError`."""
    with torch.random.fork_rng(devices=[]):  # the run's random numbers do not depend on this check
        copies = [copy.deepcopy(b) for b in backbones]
        peft.apply(build_task_model(cfg, copies[0], num_classes, copies[1:]), cfg.method, **cfg.method_options)
