"""Memory and throughput of the ESSA self-supervised adaptation step (:mod:`nnunet_tpp.vision2d.ssa`), all
parameters (``full``) against PEFT methods, measured side by side in one run: ``nnunet-tpp bench-ssa``.

Every method is measured in a fresh spawned process on CPU (peak RSS, VmHWM, is then that method's alone) and in
this process on CUDA after resetting the allocator's peak (``torch.cuda.max_memory_allocated``). A step is the
whole SSA step: 2 global + ``n_local`` local views through student and teacher, DINO + iBOT + KoLeo, backward,
clipping, AdamW, EMA update of the teacher. The images are random: the cost of a step does not depend on them.
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from nnunet_tpp.measuring import load_average, machine_description, short_count, synchronize
from nnunet_tpp.pretext.dino import ema_update
from nnunet_tpp.vision2d.ssa import build_ssa, ssa_step
from nnunet_tpp.vision2d.ssa_settings import SSAError, SSASettings, check_method, ssa_settings

REFERENCE = "full"
DEFAULT_METHODS = ("full", "apla", "lora", "ssf")


def _peak_rss_mb() -> float:
    """This process' peak resident set in MiB: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak over into a spawned child)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _measure(backbone_factory, method: str, batch: int, steps: int, device: str, settings: SSASettings,
             warmup: int, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    m = build_ssa(backbone_factory(), method, settings, dev)
    cfg = m.student.net.backbone.config
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    images = images.to(dev)
    for group in m.optimizer.param_groups:
        group["lr"] = settings.peak_lr(method)
    times = []
    for step in range(warmup + steps):
        synchronize(dev)
        start = time.perf_counter()
        ssa_step(m, images, settings, step, 0, settings.teacher_temp, False, True)
        ema_update(m.student, m.teacher, settings.momentum_teacher)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times[warmup:])
    return {"method": method, "step_time_s": step_time, "images_per_s": batch / step_time,
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20 if cuda else _peak_rss_mb(),
            "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of a fresh child process",
            "trainable_params": m.summary.trainable, "total_params": m.summary.total, "batch": batch, "steps": steps}


def measure_ssa(backbone_factory: Callable[[], torch.nn.Module], method: str, batch: int, steps: int,
                device: str | torch.device = "cpu", settings: SSASettings | None = None, warmup: int = 1,
                in_child: bool | None = None, threads: int | None = None) -> dict:
    """Times ``steps`` SSA steps (after ``warmup``) of one method (``full``: all parameters) on random images of
    ``batch`` and measures the peak memory.

    ``backbone_factory`` must be picklable (e.g. ``functools.partial(build_vit, ...)``); ``settings`` default to
    :class:`SSASettings` (shrink ``out_dim`` on small machines). ``in_child`` (default: on CPU) runs it in a
    fresh spawned process so that the peak RSS is this method's alone; on CUDA the allocator's peak is reset.

    Returns:
        ``{"method", "step_time_s", "images_per_s", "peak_memory_mb", "memory_kind", "trainable_params",
        "total_params", "batch", "steps"}``.
    """
    settings = settings or SSASettings()
    settings.validate()
    check_method(method, settings.method_options)
    device = str(device)
    if in_child is None:
        in_child = torch.device(device).type == "cpu"
    args = (backbone_factory, method, batch, steps, device, settings, warmup, threads)
    if not in_child:
        return _measure(*args)
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def run_ssa_bench(arch: str = "vit_base", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                  arch_options: dict | None = None, methods=DEFAULT_METHODS, batch: int = 8, steps: int = 3,
                  warmup: int = 1, device: str = "cpu", ssa_options: dict | None = None,
                  threads: int | None = None, json_out: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Measures the SSA step of every method (``full`` always first, the reference of the ratios) on one ViT.

    Args:
        arch, img_size, patch_size, in_chans, arch_options: the ViT (:func:`~nnunet_tpp.models.vit.build_vit`).
        methods: ViT methods that train something (``full`` is added when missing).
        batch, steps, warmup: images per step, measured steps (median), unmeasured first steps.
        ssa_options: :class:`SSASettings` fields (e.g. ``{"out_dim": 4096}`` on small machines).
        threads: torch threads in each measuring process (None: torch's default).
        json_out: also write the result there.

    Returns:
        ``{"machine", "device", "arch", ..., "load_before", "load_after", "methods": {name: {measure_ssa's keys,
        "trainable_ratio", "memory_ratio", "speed_ratio"}}, "units"}``; ratios are against ``full``;
        ``trainable_ratio`` is a fraction (``units`` names it).
    """
    settings = ssa_settings(ssa_options)
    methods = [REFERENCE] + [m for m in dict.fromkeys(methods) if m != REFERENCE]
    for method in methods:
        check_method(method, settings.method_options)
    if batch < 2 or steps < 1 or warmup < 0:
        raise SSAError(f"need batch >= 2, steps >= 1, warmup >= 0 (got {batch}, {steps}, {warmup})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SSAError(f"device {device!r} asked for, but torch sees no CUDA device")
    from nnunet_tpp.models.vit import build_vit
    factory = functools.partial(build_vit, arch, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                **(arch_options or {}))
    result = {"machine": machine_description("cuda" if device.startswith("cuda") else "cpu", threads),
              "device": device, "arch": arch, "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans,
              "arch_options": arch_options or {}, "batch": batch, "steps": steps, "warmup": warmup,
              "n_local": settings.n_local, "out_dim": settings.out_dim, "load_before": load_average(), "methods": {}}
    for method in methods:
        log(f"SSA step, {method}: {warmup} warm-up + {steps} measured steps of {batch} images ...")
        row = measure_ssa(factory, method, batch, steps, device, settings, warmup, threads=threads)
        result["methods"][method] = row
        log(f"SSA step, {method}: {row['step_time_s']:.2f} s/step, {row['peak_memory_mb']:.0f} MiB")
    result["load_after"] = load_average()
    ref = result["methods"][REFERENCE]
    for row in result["methods"].values():
        row["trainable_ratio"] = row["trainable_params"] / row["total_params"]
        row["memory_ratio"] = row["peak_memory_mb"] / ref["peak_memory_mb"]
        row["speed_ratio"] = row["images_per_s"] / ref["images_per_s"]
    result["units"] = {"trainable_ratio": "fraction", "peak_memory_mb": "MiB", "images_per_s": "images/s",
                       "step_time_s": "s"}
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


def format_ssa_report(result: dict) -> str:
    """The markdown table of :func:`run_ssa_bench`'s result, with the machine and settings above it."""
    r = result
    lines = [f"Machine: {r['machine']}; device {r['device']}; load average {r['load_before']} before, "
             f"{r['load_after']} after.",
             f"SSA step of {r['arch']} (patch {r['patch_size']}, {r['img_size']} px, {r['in_chans']} channels"
             + (f", {r['arch_options']}" if r["arch_options"] else "") + f"): batch {r['batch']}, 2 global + "
             f"{r['n_local']} local views, head {r['out_dim']} prototypes; median of {r['steps']} steps after "
             f"{r['warmup']} warm-up.", "",
             "| SSA method | Trainable | Ratio (%) | s/step | Images/s | Peak memory (MiB) | Memory vs full | "
             "Speed vs full |", "|---|---|---|---|---|---|---|---|"]
    for name, row in r["methods"].items():
        lines.append(f"| {name} | {short_count(row['trainable_params'])} | {100 * row['trainable_ratio']:.2f} | "
                     f"{row['step_time_s']:.2f} | {row['images_per_s']:.2f} | {row['peak_memory_mb']:.0f} | "
                     f"{row['memory_ratio']:.2f}x | {row['speed_ratio']:.2f}x |")
    kind = next(iter(r["methods"].values()))["memory_kind"]
    lines += ["", f"Memory: {kind}. Trainable / Ratio: backbone parameters the method trains (the DINO/iBOT head, "
              "trained by every method, is not counted)."]
    return "\n".join(lines)


