"""The measurements of ``nnunet-tpp bench``, each run in its own fresh process, on CPU and CUDA alike
(``python -m nnunet_tpp.bench_workers KIND CFG_JSON OUT_JSON``), so that its peak memory is its own and no
allocator, cuDNN autotuning or cache is inherited from another method (the latencies share one process: they
compare time only, in alternating rounds).

* ``training``: a method's training step (nnU-Net's SGD, deep-supervision cross-entropy), time and peak memory;
* ``latency``: inference latency (batch 1, no grad) of LoRA unmerged and merged against the plain network, timed
  in alternating rounds in one process;
* ``pretext``: the TPP pretext step of ``conv_adapter``: masked reconstruction (``mae``, the 3-D default) or
  DINO.

Every network is the same seeded random one: STU-Net of a size, or the network an nnU-Net plan describes.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from nnunet_tpp.measuring import synchronize

NUM_CLASSES = 3
SEED = 1234
LATENCY_METHOD = "lora"
MiB = 2 ** 20
TINY = "tiny"
TINY_POOLS = [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _current_rss_mib() -> float:
    """Resident set size now (MiB), from /proc; falls back to the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(cfg: dict, method: str | None, deep_supervision: bool = True):
    """The seeded random network of ``cfg`` (``network``: ``stunet`` with ``size`` (S/B/L/H, or ``tiny`` for smoke
    runs) and ``pools``, or ``plans`` with ``plans_file`` and ``configuration``), with ``method`` and
    ``cfg['memory']`` (memory paths) applied."""
    import torch
    from nnunet_tpp import peft
    from nnunet_tpp.models.lean import MemoryPaths, apply_memory_paths
    torch.manual_seed(SEED)
    if cfg.get("network") == "primus":  # nnU-Net's transformer: a preset or EMBED:DEPTH:HEADS at the patch
        from nnunet_tpp.models.primus import bench_network
        net = bench_network(cfg["size"], cfg["patch"], int(cfg.get("channels", 1)), NUM_CLASSES)
    elif cfg.get("network", "stunet") == "plans":
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunet_tpp.models.nnunet_networks import build_from_plans
        with open(cfg["plans_file"]) as f:
            manager = PlansManager(json.load(f)).get_configuration(cfg["configuration"])
        net = build_from_plans(manager, int(cfg.get("channels", 1)), NUM_CLASSES, deep_supervision)
    elif cfg.get("size") == TINY:  # the smoke runs' STU-Net: the published layout at a fraction of S's width
        from nnunet_tpp.models.stunet import STUNet
        net = STUNet(int(cfg.get("channels", 1)), NUM_CLASSES, [1] * 6, [8, 16, 16, 16, 16, 16],
                     cfg.get("pools") or TINY_POOLS, deep_supervision, size_name=TINY, fast_cpu_kernels=True)
    else:
        from nnunet_tpp.models.stunet import build_stunet
        net = build_stunet(cfg["size"], int(cfg.get("channels", 1)), NUM_CLASSES, cfg.get("pools"),
                           enable_deep_supervision=deep_supervision, fast_cpu_kernels=True)
    if method is not None:
        peft.apply(net, method)
        memory = cfg.get("memory") or {}
        if cfg.get("network") != "primus" and memory.get("lean_backward") or memory.get("activation_checkpointing", "off") != "off":
            apply_memory_paths(net, MemoryPaths.from_settings({"lean_backward": False, **memory}))
    return net


def _setup(cfg: dict):
    import gc
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    if device.type == "cuda":  # like nnU-Net; start each measurement's peak from what is left now
        torch.backends.cudnn.benchmark = True
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return device


def _peak_mib(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_reserved_mib(device) -> float | None:
    """What CUDA's caching allocator reserved at its peak (MiB); None on CPU."""
    import torch
    return torch.cuda.max_memory_reserved(device) / MiB if device.type == "cuda" else None


def measure_training(cfg: dict) -> dict:
    """Times ``cfg['warmup'] + cfg['steps']`` training steps of ``cfg['method']`` and measures its memory.

    Args:
        cfg: ``{"network", "size"/"plans_file", "method", "memory", "patch", "batch", "device", "steps", "warmup",
            "threads"}``, optionally ``"autocast"`` (default: on for CUDA, float16 with a gradient scaler as nnU-Net;
            on the CPU bfloat16 when asked), ``"compile"`` (``torch.compile`` with Inductor, before DDP, as nnU-Net)
            and ``"ddp"`` (wrap in DistributedDataParallel; the process group must exist).
    Returns:
        ``{"step_times_s", "step_time_s", "warmup_times_s", "losses", "peak_memory_mib", "peak_reserved_mib" (CUDA;
        None on CPU), "baseline_memory_mib", "trainable", "total"}``, or ``{"out_of_memory": True, "error"}`` when
        the device ran out of memory.
    """
    import contextlib
    import torch
    import torch.nn.functional as F
    from nnunet_tpp import peft

    device = _setup(cfg)
    cuda = device.type == "cuda"
    use_autocast = bool(cfg.get("autocast", cuda))
    try:
        net = build(cfg, cfg["method"]).to(device).train()
        summary = peft.trainable_summary(net)
        trainable = [p for p in net.parameters() if p.requires_grad]
        optimizer = (torch.optim.AdamW(trainable, 1e-4, betas=(0.9, 0.98), weight_decay=5e-2)  # nnU-Net's Primus
                     if cfg.get("network") == "primus" else
                     torch.optim.SGD(trainable, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5))
        model = torch.compile(net) if cfg.get("compile") else net
        if cfg.get("ddp"):
            from nnunet_tpp.trainers.base import settle_cpu_layout
            settle_cpu_layout(net)
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        gen = torch.Generator().manual_seed(SEED + 1)
        shape = (int(cfg["batch"]), int(cfg.get("channels", 1)), *map(int, cfg["patch"]))
        x = torch.randn(shape, generator=gen).to(device)
        labels = torch.randint(0, NUM_CLASSES, (shape[0], 1, *shape[2:]), generator=gen).float().to(device)
        targets: list = []
        scaler = torch.amp.GradScaler("cuda") if cuda and use_autocast else None
        autocast = (lambda: torch.autocast(device.type)) if use_autocast else contextlib.nullcontext
        baseline = torch.cuda.memory_allocated(device) / MiB if cuda else _current_rss_mib()

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                outputs = model(x)
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]  # Primus: one output
                if not targets:  # labels downsampled to each deep-supervision output, once
                    targets.extend(F.interpolate(labels, size=o.shape[2:], mode="nearest")[:, 0].long()
                                   for o in outputs)
                loss = sum(F.cross_entropy(o.float(), t) for o, t in zip(outputs, targets))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            return loss.detach()

        name, times, warmups, losses = f"{cfg.get('label', cfg['method'])}", [], [], []
        for i in range(int(cfg["warmup"]) + int(cfg["steps"])):
            synchronize(device)
            start = time.perf_counter()
            losses.append(step())
            synchronize(device)
            seconds = time.perf_counter() - start
            warm = i < int(cfg["warmup"])
            (warmups if warm else times).append(seconds)
            _log(f"{name}: {'warm-up' if warm else 'step'} {i + 1} ({seconds:.3f} s)")
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        return {"out_of_memory": True, "error": str(e).splitlines()[0]}
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
            return {"out_of_memory": True, "error": str(e).splitlines()[0]}
        raise
    return {"step_times_s": times, "step_time_s": statistics.median(times), "warmup_times_s": warmups,
            "losses": [float(v) for v in losses], "peak_memory_mib": _peak_mib(device),
            "peak_reserved_mib": _peak_reserved_mib(device), "baseline_memory_mib": baseline,
            "trainable": summary.trainable, "total": summary.total}


def measure_latency(cfg: dict) -> dict:
    """Inference latency (batch 1, eval, no grad, no deep supervision) of LoRA unmerged and merged against the
    plain network, all in this one process and timed in alternating rounds (plain, LoRA, plain, LoRA, ...), so
    that the ratios compare the networks and not two processes' allocators or the machine's load at two times.
    LoRA gets non-zero updates first, so merging is checked (largest output difference merged vs unmerged).

    Returns:
        ``{"plain_s", "unmerged_s", "merged_s", "merge_max_abs_diff", "rounds", "unmerged_vs_plain",
        "merged_vs_plain"}``: median seconds per forward; each ratio is the median of per-round ratios against
        the plain forward of the same round.
    """
    import contextlib
    import torch
    from nnunet_tpp import peft

    device = _setup(cfg)
    plain = build(cfg, None, deep_supervision=False).to(device).eval()
    lora = build(cfg, LATENCY_METHOD, deep_supervision=False)
    with torch.no_grad():  # LoRA's B starts at zero: make the update non-trivial so merging is checked
        gen = torch.Generator().manual_seed(SEED + 3)
        for p in peft.target_parameters(lora).values():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    lora = lora.to(device).eval()
    x = torch.randn((1, int(cfg.get("channels", 1)), *cfg["patch"]),
                    generator=torch.Generator().manual_seed(SEED + 2)).to(device)
    autocast = (lambda: torch.autocast("cuda")) if device.type == "cuda" else contextlib.nullcontext
    rounds = max(5, int(cfg["steps"]))

    def timed(net) -> float:
        synchronize(device)
        start = time.perf_counter()
        net(x)
        synchronize(device)
        return time.perf_counter() - start

    def alternate(net, label: str) -> tuple[list[float], list[float]]:
        for _ in range(max(1, int(cfg["warmup"]))):
            plain(x), net(x)
        pairs = [(timed(plain), timed(net)) for _ in range(rounds)]
        _log(f"latency {label}: {statistics.median(b for _, b in pairs):.4f} s "
             f"(plain {statistics.median(a for a, _ in pairs):.4f} s)")
        return [a for a, _ in pairs], [b for _, b in pairs]

    with torch.no_grad(), autocast():
        plain_unmerged, unmerged = alternate(lora, "unmerged")
        before = lora(x).float()
        peft.merge(lora)
        diff = (lora(x).float() - before).abs().max().item()
        del before
        plain_merged, merged = alternate(lora, "merged")
    plains = plain_unmerged + plain_merged
    return {"plain_s": statistics.median(plains), "unmerged_s": statistics.median(unmerged),
            "merged_s": statistics.median(merged), "merge_max_abs_diff": diff, "rounds": rounds,
            "unmerged_vs_plain": statistics.median(b / a for a, b in zip(plain_unmerged, unmerged)),
            "merged_vs_plain": statistics.median(b / a for a, b in zip(plain_merged, merged))}


def measure_pretext(cfg: dict) -> dict:
    """Times TPP pretext steps of ``conv_adapter`` on random views and measures memory like
    :func:`measure_training`. ``cfg["objective"]``: ``mae`` (default, the 3-D recipe's default: one view at the patch
    size per volume, 75 % of its 16-voxel blocks masked, nnssl's recipe) or ``dino`` (2 global views at the patch
    size and 4 local at half of it per volume).

    Returns:
        ``{"objective", "step_time_s", "volumes_per_s", "peak_memory_mib", "peak_reserved_mib"}`` (one volume = one
        sample's set of views; reserved: CUDA only, None on CPU).
    """
    import tempfile
    import numpy as np
    import torch
    from nnunet_tpp.pretext.stage import PretextSchedule

    device = _setup(cfg)
    net = build(cfg, "conv_adapter").to(device)
    objective, channels = cfg.get("objective", "mae"), int(cfg.get("channels", 1))
    gen = torch.Generator().manual_seed(SEED + 3)
    warmup, steps = int(cfg["warmup"]), int(cfg["steps"])
    schedule = PretextSchedule(epochs=warmup + steps, iterations_per_epoch=1, batch_size=int(cfg["batch"]))
    stamps: list[float] = []

    def log(message: str) -> None:  # one message per epoch of one step: the step's end
        synchronize(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.pth")
        if objective == "dino":
            from nnunet_tpp.pretext.crops3d import view_sizes
            from nnunet_tpp.pretext.dino import DINOConfig
            from nnunet_tpp.pretext.stage import run_dino_stage
            pools = cfg.get("pools") or [[2, 2, 2]] * 4 + [[1, 1, 2]]
            global_size, local_size = view_sizes(cfg["patch"], np.prod(np.array(pools), axis=0))

            def sample(batch: int):
                return ([torch.randn((batch, channels, *global_size), generator=gen) for _ in range(2)],
                        [torch.randn((batch, channels, *local_size), generator=gen) for _ in range(4)])
            synchronize(device)
            stamps.append(time.perf_counter())
            run_dino_stage(net, sample, schedule, DINOConfig(), device, state, log=log)
        else:
            from nnunet_tpp.pretext.masked import MaskedConfig, run_masked_stage
            from nnunet_tpp.pretext.masked_views import block_mask
            masked, rng = MaskedConfig(), np.random.default_rng(SEED + 3)

            def sample(batch: int):
                masks = [block_mask(cfg["patch"], masked.block_size, masked.mask_ratio, rng) for _ in range(batch)]
                return torch.randn((batch, channels, *cfg["patch"]), generator=gen), torch.stack(masks)
            synchronize(device)
            stamps.append(time.perf_counter())
            run_masked_stage(net, sample, schedule, masked, device, state, log=log)
    step = statistics.median([b - a for a, b in zip(stamps, stamps[1:])][warmup:])
    _log(f"TPP pretext ({objective}): {steps} steps, {step:.3f} s each")
    return {"objective": objective, "step_time_s": step, "volumes_per_s": int(cfg["batch"]) / step,
            "peak_memory_mib": _peak_mib(device), "peak_reserved_mib": _peak_reserved_mib(device)}


MEASUREMENTS = {"training": measure_training, "latency": measure_latency, "pretext": measure_pretext}


def main(argv: list[str] | None = None) -> int:
    """``python -m nnunet_tpp.bench_workers KIND CFG_JSON OUT_JSON``: one measurement, its result as JSON."""
    kind, cfg, out = (sys.argv[1:] if argv is None else argv)[:3]
    result = MEASUREMENTS[kind](json.loads(cfg))
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
