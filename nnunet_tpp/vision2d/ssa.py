"""Self-supervised adaptation (ESSA, Sorkhei et al.): DINOv2 training continued on the target images through a
PEFT method before the supervised run. A mergeable method (apla, lora, ssf, bitfit, partial, full) is then merged,
so the task model starts from a plain ViT with adapted weights and any supervised method can follow. A method
that adds parameters but cannot merge (vpt, adapter, adaptformer, evp, dtl) keeps the backbone as it was; its
SSA-trained parameters are carried into the supervised run, which must use the same method and options and
starts from them (:func:`carry_ssa_parameters`).

Recipe (MoeinSorkhei/APLA ``params/pretrain/dinov2/ISIC2019/vit_b/{__common__,apla}.yml``,
``src/self_supervised/dinov2/{models,trainer,wrappers,augmentation_strategy.json}``): DINO + iBOT (shared head,
block masks on half of the global views, ratio 0.1-0.5) + KoLeo 0.1 (:mod:`nnunet_tpp.pretext.dinov2`), 65,536
prototypes (head 2048 / 256), centring, teacher momentum 0.994 -> 1, teacher temperature 0.04 -> 0.07, 2 global
views at the image size (area 0.32-1) + 8 local at 98/224 of it (area 0.05-0.32), batch 64, AdamW lr 1e-3 (1e-4
for ``full``), warm-up + cosine to 1e-6, weight decay 1e-5 -> 1e-4, clipping 1.0, prototypes frozen in epoch 1.
APLA trains the whole ``attn.proj`` (``rows=-1``) as ESSA's code does; the mask token trains only with ``full``
(APLA freezes everything else). The adapted weights are the EMA teacher's (ESSA evaluates ``teacher.backbone``).
Warm-ups are capped at a tenth of the run (ESSA: 10 and 30 of 300 epochs). The multi-crop is this module's own
(random resized crop, flip, brightness / contrast jitter; ESSA's colour jitter, blur, solarisation are not
reproduced).

Files in ``work_dir``: ``ssa_state.pth`` (every epoch; a killed stage resumes), ``ssa_progress.png`` and
``ssa_backbone.pth`` (the merged backbone or the carried parameters, and the result; when present the stage is
skipped and its weights loaded).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import DINOHead, cancel_last_layer_gradients, cosine_schedule, ema_update
from nnunet_tpp.pretext.dinov2 import DINOv2Loss, dinov2_terms, sample_masks
from nnunet_tpp.pretext.crops2d import random_views, view_sizes
from nnunet_tpp.pretext.optim import set_weight_decay, weight_decay_groups
from nnunet_tpp.pretext.stage import teacher_of
from nnunet_tpp.vision2d.metrics import peak_memory_mb
from nnunet_tpp.vision2d.ssa_settings import (KEEP, SSA_PEFT_DEFAULTS, SSAError, SSASettings,  # noqa: F401
                                              check_method, check_ssa_run, ssa_settings)  # (also re-exported)

STATE_FILE, BACKBONE_FILE, PLOT_FILE = "ssa_state.pth", "ssa_backbone.pth", "ssa_progress.png"
FORMAT = "nnunet_tpp.ssa/1"


class SSABackbone(nn.Module):
    """The thin wrapper the PEFT method is applied to (``backbone`` is the ViT; no heads)."""

    peft_defaults = SSA_PEFT_DEFAULTS

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone, c = backbone, backbone.config
        self.size_name = f"d{c.embed_dim}x{c.depth}-p{c.patch_size}-r{c.num_register_tokens}"


class SSAStudent(nn.Module):
    """PEFT backbone + shared DINO/iBOT head + iBOT mask token (1, D); the teacher is an EMA copy of it."""

    def __init__(self, net: SSABackbone, head: DINOHead, mask_token: torch.Tensor):
        super().__init__()
        self.net, self.head = net, head
        self.mask_token = nn.Parameter(mask_token.detach().clone().reshape(1, -1))

    def tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D); masked patches see the mask token."""
        return self.net.backbone.forward_features(images, masked=masks, mask_token=self.mask_token)[0]


@dataclass
class SSAModels:
    """Everything one SSA step needs (see :func:`build_ssa`)."""

    student: SSAStudent
    teacher: SSAStudent
    objective: DINOv2Loss
    optimizer: torch.optim.Optimizer
    params: list
    summary: peft.TrainableSummary
    global_size: int
    local_size: int


def build_ssa(backbone: nn.Module, method: str, settings: SSASettings, device: torch.device,
              mask_token: torch.Tensor | None = None) -> SSAModels:
    """A student (a copy of ``backbone`` with ``method`` applied, the head, the mask token), its EMA teacher (in
    eval mode), the objective and AdamW (weights decay; biases, 1-D parameters, tokens and position embeddings do
    not: :func:`~nnunet_tpp.pretext.optim.weight_decay_groups`)."""
    check_method(method, settings.method_options)
    cfg = backbone.config
    net = SSABackbone(copy.deepcopy(backbone))
    peft.apply(net, method, **settings.method_options)
    head = DINOHead(cfg.embed_dim, settings.out_dim, settings.hidden_dim, settings.bottleneck_dim,
                    settings.head_input_norm)
    token = mask_token if mask_token is not None else torch.zeros(1, cfg.embed_dim)
    student = SSAStudent(net, head, token).to(device)
    student.mask_token.requires_grad_(method == "full")
    teacher = teacher_of(student)
    objective = DINOv2Loss(settings.out_dim, settings.student_temp, settings.center_momentum, settings.centering,
                           settings.dino_weight, settings.ibot_weight, settings.koleo_weight).to(device)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weight_decay_groups(named, settings.weight_decay))
    return SSAModels(student, teacher, objective, optimizer, [p for _, p in named], peft.trainable_summary(net),
                     *view_sizes(cfg.img_size, cfg.patch_size, settings.local_size_fraction))


def ssa_step(m: SSAModels, images: torch.Tensor, settings: SSASettings, step: int, seed: int, teacher_temp: float,
             freeze_last_layer: bool, amp: bool) -> dict[str, float]:
    """One DINOv2 step on a batch of images (on the models' device): views, masks, losses, update of the
    student (not of the teacher: see :func:`ema_update`). Returns the loss terms as floats."""
    device = images.device
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    globals_ = torch.cat(random_views(images, 2, m.global_size, settings.global_scale, generator))
    locals_ = random_views(images, settings.n_local, m.local_size, settings.local_scale, generator)
    backbone = m.student.net.backbone
    masks = sample_masks(globals_.shape[0], backbone.grid_for(globals_), settings.mask_ratio, settings.mask_probability,
                         settings.mask_mode, random.Random(seed * 1_000_003 + step)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        losses = dinov2_terms(m.student, m.teacher, m.objective, globals_, locals_, masks, teacher_temp,
                              backbone.num_prefix_tokens)
    m.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(m.params, settings.grad_clip)
    if freeze_last_layer:
        cancel_last_layer_gradients(m.student.head)
    m.optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _schedules(s: SSASettings, method: str, epochs: int, steps: int) -> dict[str, list[float]]:
    total = epochs * steps
    warmup = int(round(min(s.warmup_epochs, epochs / 10) * steps))
    temp_warmup = int(round(min(s.warmup_teacher_temp_epochs, epochs / 10) * steps))
    return {"lr": cosine_schedule(s.peak_lr(method), s.min_lr, total, warmup),
            "wd": cosine_schedule(s.weight_decay, s.weight_decay_end, total),
            "momentum": cosine_schedule(s.momentum_teacher, 1.0, total),
            "temp": cosine_schedule(s.teacher_temp, s.teacher_temp, total, temp_warmup, s.warmup_teacher_temp)}


def _batches(dataset, batch: int, seed: int, steps: int, num_workers: int):
    """``steps`` full batches of images, reshuffled (seeded) whenever the data runs out."""
    from nnunet_tpp.vision2d.data import make_loader
    produced, rounds = 0, 0
    while produced < steps:  # (there is a full batch: batch <= len(dataset))
        for images, _ in make_loader(dataset, batch, shuffle=True, seed=seed + 7919 * rounds, num_workers=num_workers):
            if images.shape[0] == batch:
                yield images
                produced += 1
                if produced == steps:
                    return
        rounds += 1


def _checkpoint_mask_token(cfg, dim: int) -> torch.Tensor | None:
    """A DINOv2 checkpoint's mask token (1, D), if ``cfg.backbone`` has one."""
    if getattr(cfg, "backbone", None) is None:
        return None
    from nnunet_tpp.models.vit_checkpoint import mae_decoder_state_dict
    token = mae_decoder_state_dict(cfg.backbone).get("mask_token")
    return token.float().reshape(1, dim) if token is not None and token.ndim == 2 and token.numel() == dim else None


def run_ssa(backbone: nn.Module, train_set, cfg, work_dir: str | os.PathLike, device: torch.device,
            log: Callable[[str], None] = print) -> dict:
    """Adapts ``backbone`` in place by DINOv2 training through ``cfg.ssa_method``, then merges the method:
    on return ``backbone`` is still a plain ViT (every parameter ``requires_grad``) holding the adapted weights.

    ``train_set`` yields ``(image (C, H, W), target)`` (targets unused); ``cfg`` is the run's ``Train2dConfig``
    (``ssa_method``, ``ssa_epochs``, ``ssa_options``, ``seed``, ``amp``, ``num_workers``; a DINOv2 checkpoint in
    ``backbone`` gives the iBOT mask token its start). Raises ValueError for unknown settings, a method that
    cannot be merged, or a ``work_dir`` of other settings, before anything trains.

    Returns:
        ``{"images_per_s", "peak_memory_mb", "memory_kind", "trainable_params", "total_params", "losses" (mean
        total loss per epoch), "history" (every term per epoch), "method", "epochs", "reused"}``.
    """
    method, epochs = cfg.ssa_method, int(cfg.ssa_epochs)
    settings = check_ssa_run(cfg)
    merged = peft.get_method(method).mergeable
    if epochs < 1:
        raise SSAError(f"ssa_epochs must be >= 1, got {epochs}")
    work = Path(work_dir)
    recipe = {"method": method, "epochs": epochs, "backbone": str(getattr(cfg, "backbone", None)),
              "arch": dataclasses.asdict(backbone.config), "data": str(getattr(cfg, "data", "")), "seed": getattr(cfg, "seed", 0),
              "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}}
    done = work / BACKBONE_FILE
    if done.exists():
        saved = torch.load(done, map_location="cpu", weights_only=True)
        _same_recipe(saved, recipe, done)
        if saved["backbone"]:  # empty when the method was carried: the backbone did not change
            backbone.load_state_dict(saved["backbone"])
        log(f"SSA: reusing the adapted backbone in {done}")
        return {**saved["result"], "reused": True}
    work.mkdir(parents=True, exist_ok=True)
    n = len(train_set)
    if n < 2:
        raise SSAError(f"SSA needs at least 2 training images, got {n}")
    batch = min(settings.batch_size, n)
    steps = settings.iterations_per_epoch or n // batch
    seed = int(settings.seed if settings.seed is not None else getattr(cfg, "seed", 0))
    torch.manual_seed(seed)
    m = build_ssa(backbone, method, settings, device, _checkpoint_mask_token(cfg, backbone.embed_dim))
    log(f"SSA (dinov2 through {method}): {m.summary}; {epochs} epochs x {steps} steps of {batch} images, views "
        f"2 x {m.global_size}px + {settings.n_local} x {m.local_size}px, {settings.out_dim} prototypes")
    sched = _schedules(settings, method, epochs, steps)
    state = {"epoch": 0, "history": [], "images": 0, "seconds": 0.0}
    if (work / STATE_FILE).exists():
        state = _load_state(work / STATE_FILE, m, recipe, device)
        log(f"SSA: resuming after epoch {state['epoch']} from {work / STATE_FILE}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    amp = bool(getattr(cfg, "amp", True))
    for epoch in range(state["epoch"], epochs):
        m.student.train()
        m.teacher.eval()  # no stochastic depth or dropout in the teacher (DINO builds it without)
        sums, started = {}, time.perf_counter()
        batches = _batches(train_set, batch, seed * 1000 + epoch, steps, int(getattr(cfg, "num_workers", 0)))
        for i, images in enumerate(batches):
            step = epoch * steps + i
            for group in m.optimizer.param_groups:
                group["lr"] = sched["lr"][step]
            set_weight_decay(m.optimizer, sched["wd"][step])
            terms = ssa_step(m, images.to(device, non_blocking=True), settings, step, seed, sched["temp"][step],
                             epoch < settings.freeze_last_layer_epochs, amp)
            ema_update(m.student, m.teacher, sched["momentum"][step])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            state["images"] += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        state["seconds"] += seconds
        last = (epoch + 1) * steps - 1
        row = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}, "lr": sched["lr"][last],
               "teacher_temp": sched["temp"][last], "momentum": sched["momentum"][last]}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        _save_state(work / STATE_FILE, m, recipe, state)
        plot_ssa(state["history"], work / PLOT_FILE)
        log(f"SSA epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} (dino {row['dino']:.4f}, ibot {row['ibot']:.4f}, "
            f"koleo {row['koleo']:.4f}) lr {row['lr']:.2e} teacher temp {row['teacher_temp']:.3f} momentum "
            f"{row['momentum']:.4f}, {steps * batch / max(seconds, 1e-9):.1f} img/s ({seconds:.1f} s)")
    result = dict(zip(("peak_memory_mb", "memory_kind"), peak_memory_mb(device)),
                  images_per_s=state["images"] / max(state["seconds"], 1e-9), trainable_params=m.summary.trainable,
                  total_params=m.summary.total, losses=[h["loss"] for h in state["history"]],
                  history=state["history"], method=method, epochs=epochs, merged=merged)
    adapted = m.teacher if settings.keep == "teacher" else m.student
    weights, carried = {}, {}
    if merged:
        peft.merge(adapted.net)
        weights = {k: v.detach().cpu().clone() for k, v in adapted.net.backbone.state_dict().items()}
        backbone.load_state_dict(weights)
    else:  # the backbone stayed frozen (not stored again); what the method trained goes on into the supervised run
        trained = set(peft.trained_parameter_names(adapted.net))  # its own parameters and e.g. the adapter's norms
        carried = {n: p.detach().cpu().clone() for n, p in adapted.net.named_parameters() if n in trained}
    backbone.requires_grad_(True)
    peft.atomic_torch_save({"format": FORMAT, "recipe": recipe, "backbone": weights, "result": result,
                            "target_parameters": carried, "identity": peft.identity(adapted.net)}, done)
    (work / STATE_FILE).unlink(missing_ok=True)
    what = "merged into the backbone" if merged else "trained; its parameters go on into the supervised run"
    log(f"SSA done: {method} {what} ({settings.keep}); saved {done}")
    return {**result, "reused": False}


def carry_ssa_parameters(model: nn.Module, work_dir: str | os.PathLike, log: Callable[[str], None] = print) -> int:
    """Copies the SSA-trained parameters of a method that was not merged (see :func:`run_ssa`) into the supervised
    task model, which has the same method and options applied.

    Returns:
        The number of tensors copied (0 when the SSA method was merged). Raises :class:`SSAError` for a model with
        another method or other options.
    """
    path = Path(work_dir) / BACKBONE_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    carried = saved.get("target_parameters") or {}
    if not carried:
        return 0
    theirs, ours = saved["identity"], peft.identity(model)
    if (theirs["method"], theirs["options"]) != (ours["method"], ours["options"]):
        raise SSAError(f"{path} holds SSA-trained {theirs['method']} {theirs['options']}; the supervised model has "
                       f"{ours['method']} {ours['options']}")
    params = dict(model.named_parameters())
    unknown = sorted(set(carried) - set(params))
    bad = [n for n in carried if n in params and carried[n].shape != params[n].shape]
    if unknown or bad or not set(peft.target_parameters(model)) <= set(carried):
        raise SSAError(f"{path}: the SSA-trained parameters do not fit this model (unknown {unknown[:3]}, other "
                       f"shapes {bad[:3]}); run SSA again for this model")
    with torch.no_grad():
        for name, value in carried.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    log(f"supervised {ours['method']} starts from its SSA-trained parameters in {path} ({len(carried)} tensors)")
    return len(carried)


def _same_recipe(saved: dict, recipe: dict, path: Path) -> None:
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise SSAError(f"{path} is not an SSA file of nnunet_tpp")
    if saved["recipe"] != recipe:
        changed = sorted(k for k in recipe if saved["recipe"].get(k) != recipe[k])
        raise SSAError(f"{path} belongs to SSA with other settings ({', '.join(changed)}); remove {path.parent} "
                       f"or choose another --out")


def _saved_names(m: SSAModels) -> set[str]:
    """What the state file holds: the student's trained parameters and every buffer (the head's running input
    statistics, APLA's row indices); frozen weights are rebuilt from the backbone."""
    return {n for n, p in m.student.named_parameters() if p.requires_grad} | {n for n, _ in m.student.named_buffers()}


def _save_state(path: Path, m: SSAModels, recipe: dict, state: dict) -> None:
    names = _saved_names(m)
    student, teacher = ({k: v.detach().cpu().clone() for k, v in mod.state_dict().items() if k in names}
                        for mod in (m.student, m.teacher))
    peft.atomic_torch_save({"format": FORMAT, "recipe": recipe, "student": student, "teacher": teacher,
                            "optimizer": m.optimizer.state_dict(), "objective": m.objective.state_dict(), **state},
                           path)


def _load_state(path: Path, m: SSAModels, recipe: dict, device: torch.device) -> dict:
    saved = torch.load(path, map_location=device, weights_only=True)
    _same_recipe(saved, recipe, path)
    names = _saved_names(m)
    for module, key in ((m.student, "student"), (m.teacher, "teacher")):
        if set(saved[key]) != names:
            raise SSAError(f"{path}: the saved {key} does not fit this model; remove it to start SSA afresh")
        module.load_state_dict(saved[key], strict=False)
    m.optimizer.load_state_dict(saved["optimizer"])
    m.objective.load_state_dict(saved["objective"])
    return {k: saved[k] for k in ("epoch", "history", "images", "seconds")}


def plot_ssa(history: list[dict], path: Path) -> None:
    """A PNG of the SSA loss terms per epoch (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, style in (("loss", "b-o"), ("dino", "g--"), ("ibot", "r--"), ("koleo", "k:")):
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], style, label=key)
    ax.set(xlabel="SSA epoch", ylabel="loss", title="self-supervised adaptation (DINOv2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(f".tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
