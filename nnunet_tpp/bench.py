"""``nnunet-tpp bench``: training step time, peak memory and trainable parameters of every PEFT method next to
full fine-tuning, plus the inference latency of LoRA merged vs unmerged vs the plain backbone.

Every method trains the same seeded random STU-Net on random data with nnU-Net's optimizer (SGD, momentum
0.99, Nesterov, lr 1e-2) and a cross-entropy summed over the deep-supervision outputs. On CPU each method
runs in its own child process (``python -m nnunet_tpp.bench --worker``) so that its peak resident set size
(``ru_maxrss``) is its own; on CUDA the methods run in this process with autocast + GradScaler and the peak
of ``torch.cuda.max_memory_allocated``. CPU timings are only as good as the machine is quiet: the report
shows the 1-minute load average before and after. Importing this module imports neither torch nor the package.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

NUM_CLASSES = 3
SEED = 1234
DEFAULT_PATCH = {"cpu": (64, 64, 64), "cuda": (128, 128, 128)}
REFERENCE = "full"
LATENCY_METHOD = "lora"


class BenchError(ValueError):
    """Invalid benchmark settings (size, patch, device, ...) or a failed worker."""


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _current_rss_mib() -> float:
    """Resident set size now (MiB), from /proc; falls back to the peak so far."""
    import resource
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(size: str, deep_supervision: bool, method: str | None = None, pools=None):
    """The seeded random STU-Net (identical backbone in every process), with ``method`` applied."""
    import torch
    from nnunet_tpp import peft
    from nnunet_tpp.models.stunet import build_stunet
    torch.manual_seed(SEED)
    net = build_stunet(size, 1, NUM_CLASSES, pools, enable_deep_supervision=deep_supervision, fast_cpu_kernels=True)
    if method is not None:
        peft.apply(net, method)
    return net


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(cfg: dict) -> dict:
    """Times ``cfg['warmup'] + cfg['steps']`` training steps of one method and measures its memory.

    Args:
        cfg: ``{"size", "method", "patch", "batch", "device", "steps", "warmup", "threads"}``.
    Returns:
        ``{"step_times_s", "step_time_s", "peak_memory_mib", "baseline_memory_mib", "trainable", "total"}``;
        on CPU the memory is this process's RSS (run it in a fresh process), on CUDA allocated memory.
    """
    import contextlib
    import gc
    import torch
    import torch.nn.functional as F
    from nnunet_tpp import peft

    _setup_threads(cfg)
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:  # like nnU-Net; start each method's peak from what is left now
        torch.backends.cudnn.benchmark = True
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    net = _build(cfg["size"], True, cfg["method"], cfg.get("pools")).to(device).train()
    summary = peft.trainable_summary(net)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-2, momentum=0.99,
                                nesterov=True, weight_decay=3e-5)
    gen = torch.Generator().manual_seed(SEED + 1)
    shape = (int(cfg["batch"]), 1, *map(int, cfg["patch"]))
    x = torch.randn(shape, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=gen).float().to(device)
    targets: list = []
    grad_scaler = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
    scaler = grad_scaler("cuda") if cuda else None
    autocast = (lambda: torch.autocast("cuda")) if cuda else contextlib.nullcontext
    baseline = torch.cuda.memory_allocated(device) / 2**20 if cuda else _current_rss_mib()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = net(x)
            if not targets:  # labels downsampled to each deep-supervision output, once
                targets.extend(F.interpolate(labels, size=o.shape[2:], mode="nearest")[:, 0].long()
                               for o in outputs)
            loss = sum(F.cross_entropy(o, t) for o, t in zip(outputs, targets))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    name, warmup, steps, times = f"STU-Net-{cfg['size']} {cfg['method']}", int(cfg["warmup"]), int(cfg["steps"]), []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds = time.perf_counter() - start
        if i < warmup:
            _log(f"{name}: warm-up {i + 1}/{warmup} ({seconds:.3f} s)")
        else:
            times.append(seconds)
            _log(f"{name}: {i + 1 - warmup}/{steps} steps ({seconds:.3f} s)")
    import resource  # ru_maxrss: KiB on Linux
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_times_s": times, "step_time_s": statistics.median(times), "peak_memory_mib": peak,
            "baseline_memory_mib": baseline, "trainable": summary.trainable, "total": summary.total}


def _setup_threads(cfg: dict) -> None:
    """Applies ``cfg['threads']`` (torch intra-op threads) when given."""
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def _in_child(kind: str, cfg: dict) -> dict:
    """Runs ``measure_<kind>(cfg)`` in a fresh interpreter, so that its peak RSS is its own."""
    fd, path = tempfile.mkstemp(prefix="nnunet_tpp_bench_", suffix=".json")
    os.close(fd)
    try:
        rc = subprocess.call([sys.executable, "-m", "nnunet_tpp.bench", "--worker", kind, json.dumps(cfg), path])
        if rc != 0:
            why = " (killed: out of memory?)" if rc < 0 else ""
            raise BenchError(f"benchmark worker ({kind}, STU-Net-{cfg['size']} {cfg.get('method', '')}) failed "
                             f"with exit code {rc}{why}; see the messages above")
        with open(path) as f:
            return json.load(f)
    finally:
        os.remove(path)


def measure_latency(cfg: dict) -> dict:
    """Inference latency (batch 1, eval, no_grad, no deep supervision) of the plain backbone, LoRA unmerged
    and LoRA merged, timed in interleaved rounds; also the largest output difference merged vs unmerged.

    Args:
        cfg: as for :func:`measure_training` (``method`` and ``batch`` are not used).
    Returns:
        ``{"plain_s", "unmerged_s", "merged_s", "merge_max_abs_diff"}`` (median seconds per forward).
    """
    import copy
    import contextlib
    import torch
    from nnunet_tpp import peft

    _setup_threads(cfg)
    size, patch, steps, warmup = cfg["size"], cfg["patch"], int(cfg["steps"]), int(cfg["warmup"])
    dev = torch.device(cfg["device"])
    plain = _build(size, False, pools=cfg.get("pools")).to(dev).eval()
    unmerged = _build(size, False, LATENCY_METHOD, cfg.get("pools"))
    with torch.no_grad():  # LoRA's B starts at zero: make the update non-trivial so merging is checked
        for p in peft.target_parameters(unmerged).values():
            p.add_(torch.randn_like(p) * 1e-3)
    merged = peft.merge(copy.deepcopy(unmerged)).to(dev).eval()
    unmerged = unmerged.to(dev).eval()
    x = torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(SEED + 2)).to(dev)
    autocast = (lambda: torch.autocast("cuda")) if dev.type == "cuda" else contextlib.nullcontext
    nets = {"plain": plain, "unmerged": unmerged, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad(), autocast():
        diff = (merged(x).float() - unmerged(x).float()).abs().max().item()
        for _ in range(max(1, warmup)):
            for net in nets.values():
                net(x)
        for i in range(steps):
            for key, net in nets.items():
                _sync(dev)
                start = time.perf_counter()
                net(x)
                _sync(dev)
                times[key].append(time.perf_counter() - start)
            _log(f"STU-Net-{size} latency (plain / {LATENCY_METHOD} unmerged / merged): {i + 1}/{steps} rounds")
    result = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    result["merge_max_abs_diff"] = diff
    return result


def measure_pretext(cfg: dict) -> dict:
    """Times TPP pretext (DINO) steps of ``conv_adapter`` on random views (2 global at the patch size, 4 local
    at half of it) and measures memory like :func:`measure_training`.

    Returns:
        ``{"step_time_s", "volumes_per_s", "peak_memory_mib"}`` (one volume = one sample's set of views).
    """
    import resource
    import numpy as np
    import torch
    from nnunet_tpp.pretext.crops3d import view_sizes
    from nnunet_tpp.pretext.dino import DINOConfig
    from nnunet_tpp.pretext.stage import PretextSchedule, run_dino_stage

    _setup_threads(cfg)
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pools = cfg.get("pools") or [[2, 2, 2]] * 4 + [[1, 1, 2]]
    net = _build(cfg["size"], True, "conv_adapter", cfg.get("pools")).to(device)
    global_size, local_size = view_sizes(cfg["patch"], np.prod(np.array(pools), axis=0))
    gen = torch.Generator().manual_seed(SEED + 3)

    def sample(batch: int):
        return ([torch.randn((batch, 1, *global_size), generator=gen) for _ in range(2)],
                [torch.randn((batch, 1, *local_size), generator=gen) for _ in range(4)])

    stamps: list[float] = []
    warmup, steps = int(cfg["warmup"]), int(cfg["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        stamps.append(time.perf_counter())
        run_dino_stage(net, sample, PretextSchedule(epochs=warmup + steps, iterations_per_epoch=1,
                                                    batch_size=int(cfg["batch"])),
                       DINOConfig(), device, os.path.join(tmp, "state.pth"),
                       log=lambda message: (_sync(device), stamps.append(time.perf_counter())))
    step = statistics.median([b - a for a, b in zip(stamps, stamps[1:])][warmup:])
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    _log(f"STU-Net-{cfg['size']} TPP pretext: {steps} steps, {step:.3f} s each")
    return {"step_time_s": step, "volumes_per_s": int(cfg["batch"]) / step, "peak_memory_mib": peak}


def machine_description(device: str = "cpu", threads: int | None = None) -> str:
    """One line: CPU model, cores, torch threads (``threads`` or torch's default), GPU (on cuda), torch version."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores, {threads or torch.get_num_threads()} torch threads"
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{text}, torch {torch.__version__}"


def _check(sizes, patch, batch, methods, device, steps, warmup, pools=None) -> list[str]:
    """Validates the settings and returns the method list, ``full`` first."""
    import torch
    from nnunet_tpp import peft
    from nnunet_tpp.models.stunet import SIZES
    unknown = [s for s in sizes if s not in SIZES]
    if not sizes or unknown:
        raise BenchError(f"unknown STU-Net size(s) {unknown}; choose from {sorted(SIZES)}")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    # the patch must divide by the product of the pool sizes (default 4x (2, 2, 2) then (1, 1, 2))
    divisors = [1, 1, 1]
    for pool in pools or [[2, 2, 2]] * 4 + [[1, 1, 2]]:
        divisors = [d * int(k) for d, k in zip(divisors, pool)]
    if len(patch) != 3 or any(int(p) <= 0 or int(p) % d for p, d in zip(patch, divisors)):
        raise BenchError(f"patch must be 3 positive sizes divisible by {tuple(divisors)}, got {list(patch)}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise BenchError(f"need batch >= 1, steps >= 1, warmup >= 0 (got {batch}, {steps}, {warmup})")
    stunet_methods = [m for m in peft.methods() if "STUNet" in peft.get_method(m).models]
    names = list(dict.fromkeys([REFERENCE, *(methods or stunet_methods)]))
    for name in names + [LATENCY_METHOD]:
        peft.get_method(name)  # raises PeftError listing the known methods
    return names


def run_bench(sizes=("S",), patch=None, batch=2, methods=None, device="cpu", steps=3, warmup=1, json_out=None,
              threads=None, pools=None) -> dict:
    """Runs the benchmark, prints the markdown report to stdout and optionally writes JSON.

    Args:
        sizes: STU-Net sizes (``S``, ``B``, ``L``, ``H``); the first one fills the top-level keys.
        patch: 3 patch sizes; default 64^3 on CPU, 128^3 on CUDA.
        batch: training batch size (latency uses batch 1).
        methods: PEFT method names; default all registered ones that adapt STU-Net. ``full`` is always measured.
        device: ``cpu`` or ``cuda``.
        steps, warmup: measured and warm-up training steps (and latency rounds).
        json_out: path for the JSON result.
        threads: ``torch.set_num_threads`` for every measurement (default: torch's choice).
        pools: STU-Net's five pool sizes (default: the published pre-training ones); see :func:`plan_settings`.
    Returns:
        ``{"machine", "methods": {name: {"step_time_ratio", "peak_memory_ratio", "trainable_ratio",
        "step_time_s", "peak_memory_mib", ...}}, "merged_latency_ratio", "unmerged_latency_ratio", ...,
        "sizes": {size: <the same structure>}}``.
    """
    sizes = [str(s).upper() for s in ((sizes,) if isinstance(sizes, str) else sizes)]
    patch = tuple(int(p) for p in (patch or DEFAULT_PATCH.get(device, DEFAULT_PATCH["cpu"])))
    names = _check(sizes, patch, int(batch), methods, device, int(steps), int(warmup), pools)
    import torch
    machine, on_cpu, load_before = machine_description(device, threads), device == "cpu", _load()
    per_size = {}
    for size in sizes:
        measured = {}
        for method in names:
            cfg = {"size": size, "method": method, "patch": list(patch), "batch": int(batch), "device": device,
                   "steps": int(steps), "warmup": int(warmup), "threads": threads, "pools": pools}
            measured[method] = _in_child("training", cfg) if on_cpu else measure_training(cfg)
        ref = measured[REFERENCE]
        table = {method: {"step_time_ratio": m["step_time_s"] / ref["step_time_s"],
                          "peak_memory_ratio": m["peak_memory_mib"] / ref["peak_memory_mib"],
                          "trainable_ratio": m["trainable"] / m["total"], **m} for method, m in measured.items()}
        pretext = None
        if "conv_adapter" in measured:
            pretext = _in_child("pretext", cfg) if on_cpu else measure_pretext(cfg)
            pretext["supervised_volumes_per_s"] = int(batch) / measured["conv_adapter"]["step_time_s"]
            pretext["supervised_peak_memory_mib"] = measured["conv_adapter"]["peak_memory_mib"]
        cfg = {**cfg, "method": LATENCY_METHOD}
        latency = _in_child("latency", cfg) if on_cpu else measure_latency(cfg)
        per_size[size] = {
            "machine": machine, "torch": torch.__version__, "device": device, "size": size,
            "patch": list(patch), "batch": int(batch), "steps": int(steps), "warmup": int(warmup),
            "memory_kind": "peak RSS of a child process" if on_cpu else "torch.cuda.max_memory_allocated",
            "load_average": [load_before, _load()], "methods": table, "latency": latency, "pretext": pretext,
            "merged_latency_ratio": latency["merged_s"] / latency["plain_s"],
            "unmerged_latency_ratio": latency["unmerged_s"] / latency["plain_s"]}
    result = {**per_size[sizes[0]], "sizes": per_size}
    print(format_report(result), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_report(result: dict) -> str:
    """The markdown report of :func:`run_bench`'s result: per size a training table and a latency table."""
    lines = []
    for size, r in result["sizes"].items():
        lines += [f"Machine: {r['machine']}; STU-Net-{size}, patch {'x'.join(map(str, r['patch']))}, "
                  f"batch {r['batch']}, device {r['device']}, {r['steps']} measured + {r['warmup']} warm-up "
                  f"steps; memory = {r['memory_kind']}; 1-min load average before/after "
                  f"{'/'.join(map(str, r['load_average']))}", "",
                  "| method | trainable | step time (s) | step time vs full | peak memory (MiB) | memory vs full "
                  "| memory after build (MiB) |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in r["methods"].items():
            lines.append(f"| {name} | {_count(m['trainable'])} ({100 * m['trainable_ratio']:.2f}%) "
                         f"| {m['step_time_s']:.3f} | {m['step_time_ratio']:.2f}x | {m['peak_memory_mib']:.0f} "
                         f"| {m['peak_memory_ratio']:.2f}x | {m['baseline_memory_mib']:.0f} |")
        lat = r["latency"]
        lines += ["", f"Inference latency, batch 1, {LATENCY_METHOD} (merge max abs diff "
                  f"{lat['merge_max_abs_diff']:.2e}):", "",
                  "| network | latency (s) | vs plain backbone |", "|---|---|---|"]
        for key, label in (("plain", "plain backbone"), ("unmerged", f"{LATENCY_METHOD} unmerged"),
                           ("merged", f"{LATENCY_METHOD} merged")):
            lines.append(f"| {label} | {lat[key + '_s']:.4f} | {lat[key + '_s'] / lat['plain_s']:.2f}x |")
        if r.get("pretext"):
            p = r["pretext"]
            lines += ["", "TPP with conv_adapter: DINO pretext step (2 global + 4 local views per volume) vs the "
                      "supervised step:", "", "| stage | volumes/s | peak memory (MiB) |", "|---|---|---|",
                      f"| pretext (DINO) | {p['volumes_per_s']:.2f} | {p['peak_memory_mib']:.0f} |",
                      f"| supervised fine-tuning | {p['supervised_volumes_per_s']:.2f} "
                      f"| {p['supervised_peak_memory_mib']:.0f} |"]
        lines.append("")
    return "\n".join(lines)


def plan_settings(plans_file: str, configuration: str = "3d_fullres") -> dict:
    """Patch, batch size and STU-Net pool sizes of an nnU-Net plan (``nnUNetPlans.json``)."""
    from nnunet_tpp.models.stunet import plan_pool_sizes
    with open(plans_file) as f:
        plans = json.load(f)
    try:
        config = plans["configurations"][configuration]
        return {"patch": config["patch_size"], "batch": config["batch_size"],
                "pools": plan_pool_sizes(config["architecture"]["arch_kwargs"]["strides"])}
    except KeyError as e:
        raise BenchError(f"{plans_file}: no {e} in configuration {configuration!r} of these plans") from None


def add_bench_arguments(parser) -> None:
    """Adds the ``nnunet-tpp bench`` options to an ``argparse`` parser."""
    parser.add_argument("--size", nargs="+", default=["S"], type=str.upper, metavar="SIZE",
                        help="STU-Net size(s): S B L H (default: S)")
    parser.add_argument("--patch", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                        help="patch size (default: 64 64 64 on cpu, 128 128 128 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default: 2)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="PEFT methods (default: all registered; full is always measured)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default: 1)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the result as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--plans", default=None, metavar="nnUNetPlans.json",
                        help="take patch, batch size and pool sizes from an nnU-Net plan (--patch/--batch win)")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")


def bench_main(args) -> int:
    """Runs :func:`run_bench` with parsed ``args``; returns the exit code (2 with a message on bad input)."""
    try:
        plan = plan_settings(args.plans, args.configuration) if getattr(args, "plans", None) else {}
        run_bench(sizes=args.size, patch=args.patch or plan.get("patch"), batch=args.batch or plan.get("batch", 2),
                  methods=args.methods, device=args.device, steps=args.steps, warmup=args.warmup,
                  json_out=args.json_out, threads=args.threads, pools=plan.get("pools"))
    except ValueError as exc:  # BenchError, PeftError
        print(f"nnunet-tpp bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """``python -m nnunet_tpp.bench [options]``; ``--worker training|latency CFG_JSON OUT_JSON`` is the
    internal child mode."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        measure = {"training": measure_training, "latency": measure_latency, "pretext": measure_pretext}[argv[1]]
        result = measure(json.loads(argv[2]))
        with open(argv[3], "w") as f:
            json.dump(result, f)
        return 0
    import argparse
    parser = argparse.ArgumentParser(prog="nnunet-tpp bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
