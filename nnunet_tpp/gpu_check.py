"""``nnunet-tpp gpu-check``: the GPU path users train on, checked in one command on a CUDA machine.

It runs, each in a fresh process, the training step of STU-Net-B (default) with Conv-Adapter (the trainers' default
memory paths) and with full fine-tuning at the plan's patch (default 128^3, batch 2) the way nnU-Net trains on a
GPU: autocast (float16 with a gradient scaler) and ``torch.compile`` (Inductor); a few iterations of the TPP
pretext stage (the stage's own entry point, :func:`nnunet_tpp.pretext.stage.run_dino_stage`, through the
benchmark's pretext measurement); and, when the machine has two GPUs or more, the Conv-Adapter step under DDP on two
of them (nccl, the batch split over the ranks, as nnU-Net splits it). It prints a table of step times, peak memory
(``max_memory_allocated`` and ``max_memory_reserved``) and the ratios to full fine-tuning, with the machine it ran
on, and exits non-zero when any run failed or gave a non-finite loss.

Without a GPU it says so and exits non-zero; ``--device cpu --tiny`` is a smoke run of the same code on a tiny
STU-Net (bfloat16 autocast, gloo DDP with two processes), which the tests run. Importing this module imports neither
torch nor the package.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time

DEFAULT_SIZE = "B"
DEFAULT_PATCH = (128, 128, 128)
DEFAULT_BATCH = 2
TINY_PATCH = (16, 16, 16)
WORLD_SIZE = 2
NO_GPU = ("gpu-check checks the GPU path (autocast, Inductor, DDP) and needs a CUDA device, but torch {version} sees "
          "none here{why}. Run it on a machine with a GPU, or run the CPU smoke test of the same code with "
          "`nnunet-tpp gpu-check --device cpu --tiny`.")


class GPUCheckError(ValueError):
    """Settings gpu-check cannot run with (no GPU, a full-size run on the CPU, bad sizes)."""


def _log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def check_settings(device: str, tiny: bool) -> None:
    """Refuses, before any work, a CUDA check without a CUDA device and a full-size check on the CPU.

    Raises:
        GPUCheckError: saying what is missing and what to run instead.
    """
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        why = "" if torch.version.cuda else " (this torch build has no CUDA support)"
        raise GPUCheckError(NO_GPU.format(version=torch.__version__, why=why))
    if device == "cpu" and not tiny:
        raise GPUCheckError("gpu-check at full size on the CPU would take hours and checks nothing GPU-specific; "
                            "add --tiny for the CPU smoke run, or run it on a GPU with --device cuda")
    if device not in ("cuda", "cpu"):
        raise GPUCheckError(f"--device must be cuda or cpu, got {device!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world_size: int, port: int, cfg: dict, out_dir: str) -> None:
    """One DDP rank: the Conv-Adapter training step on this rank's part of the batch; writes its measurement."""
    import torch
    import torch.distributed as dist
    from nnunet_tpp.bench_workers import measure_training
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    try:
        result = measure_training({**cfg, "device": f"cuda:{rank}" if cuda else "cpu", "ddp": True,
                                   "label": f"{cfg['label']} rank {rank}"})
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _run_ddp(cfg: dict) -> dict:
    """The DDP run on ``WORLD_SIZE`` processes; the slowest rank's step time and the largest rank's memory."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_rank, args=(WORLD_SIZE, _free_port(), cfg, out), nprocs=WORLD_SIZE, join=True)
        ranks = []
        for r in range(WORLD_SIZE):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    if any(r.get("out_of_memory") for r in ranks):
        return next(r for r in ranks if r.get("out_of_memory"))
    reserved = [r["peak_reserved_mib"] for r in ranks if r.get("peak_reserved_mib") is not None]
    return {"step_time_s": max(r["step_time_s"] for r in ranks),
            "warmup_times_s": [max(t) for t in zip(*(r["warmup_times_s"] for r in ranks))],
            "losses": [v for r in ranks for v in r["losses"]],
            "peak_memory_mib": max(r["peak_memory_mib"] for r in ranks),
            "peak_reserved_mib": max(reserved) if reserved else None, "ranks": ranks}


def _attempt(label: str, run) -> dict:
    """Runs one check; a failure becomes a row that says what went wrong."""
    start = time.perf_counter()
    try:
        result = run()
    except Exception as e:  # noqa: BLE001 -- every failure is reported in the table, the others still run
        _log(f"{label}: failed: {type(e).__name__}: {e}")
        return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "wall_s": time.perf_counter() - start}
    result["wall_s"] = time.perf_counter() - start
    if result.get("out_of_memory"):
        result["status"] = f"out of memory: {result.get('error', '')}"
    elif not all(math.isfinite(v) for v in result.get("losses", [0.0])):
        result["status"] = "non-finite loss"
    else:
        result["status"] = "ok"
    return result


def run_gpu_check(device: str = "cuda", tiny: bool = False, size: str = DEFAULT_SIZE, patch=None, batch=None,
                  pools=None, steps: int | None = None, warmup: int | None = None, compile: bool = True,
                  ddp: bool = True, tpp: bool = True, json_out: str | None = None) -> dict:
    """Runs the checks, prints the report and returns the result.

    Args:
        device: ``cuda`` (the check) or ``cpu`` (only with ``tiny``).
        tiny: a tiny STU-Net at 16^3 (a smoke run of the same code, seconds without compile).
        size: STU-Net size (default B); ignored with ``tiny``.
        patch, batch, pools: default 128^3, 2, STU-Net's published pools (``--plans``: the plan's).
        steps, warmup: measured and warm-up steps per run (default 5 and 2 on CUDA: the first step compiles).
        compile: ``torch.compile`` (Inductor) the networks, as nnU-Net does on a GPU.
        ddp: also run Conv-Adapter under DDP on two devices (CUDA: only when there are two GPUs).
        tpp: also run a few TPP pretext iterations.
        json_out: write the result there as JSON.
    Returns:
        ``{"machine", "device", "settings", "runs": {name: {"status", "step_time_s", "peak_memory_mib",
        "peak_reserved_mib", ...}}, "ratios": {...}, "ok": bool, "wall_s"}``.
    Raises:
        GPUCheckError: before any work, for a missing GPU or a full-size CPU run.
    """
    check_settings(device, tiny)
    import torch
    from nnunet_tpp.bench import VARIANTS, measure_in_child
    from nnunet_tpp.measuring import machine_description
    from nnunet_tpp.bench_workers import TINY, TINY_POOLS
    from nnunet_tpp.models.stunet import SIZES
    if not tiny and size.upper() not in SIZES:
        raise GPUCheckError(f"unknown STU-Net size {size!r}; choose one of {', '.join(SIZES)}")
    divisors = [1, 1, 1]
    for pool in pools or (TINY_POOLS if tiny else [[2, 2, 2]] * 4 + [[1, 1, 2]]):
        divisors = [d * int(k) for d, k in zip(divisors, pool)]
    given = list(patch or (TINY_PATCH if tiny else DEFAULT_PATCH))
    if len(given) != 3 or any(int(p) <= 0 or int(p) % d for p, d in zip(given, divisors)):
        raise GPUCheckError(f"patch must be 3 positive sizes divisible by {tuple(divisors)}, got {given}")
    if int(batch or DEFAULT_BATCH) < 1 or int(steps or 1) < 1 or int(warmup if warmup is not None else 1) < 0:
        raise GPUCheckError(f"need batch >= 1, steps >= 1, warmup >= 0 (got {batch}, {steps}, {warmup})")
    start = time.perf_counter()
    cuda = device == "cuda"
    base = {"network": "stunet", "size": TINY if tiny else size.upper(), "pools": pools or (TINY_POOLS if tiny else None),
            "patch": list(patch or (TINY_PATCH if tiny else DEFAULT_PATCH)), "batch": int(batch or DEFAULT_BATCH),
            "device": device, "steps": int(steps or (2 if tiny else 5)),
            "warmup": int(warmup if warmup is not None else (1 if tiny else 2)),
            "autocast": True, "compile": bool(compile), "threads": 1 if tiny else None}
    label = "STU-Net-tiny" if tiny else f"STU-Net-{size.upper()}"
    runs = {}
    for method, memory in (("full", VARIANTS["plain"]), ("conv_adapter", VARIANTS["lean"])):
        cfg = {**base, "method": method, "memory": memory, "label": f"{label} {method}"}
        runs[method] = _attempt(method, lambda: measure_in_child("training", cfg))
    if tpp:
        cfg = {**base, "method": "conv_adapter", "memory": VARIANTS["lean"], "steps": min(base["steps"], 3),
               "warmup": 1, "pools": base["pools"] or [[2, 2, 2]] * 4 + [[1, 1, 2]]}
        runs["tpp_pretext"] = _attempt("tpp_pretext", lambda: measure_in_child("pretext", cfg))
    devices = torch.cuda.device_count() if cuda else WORLD_SIZE
    if ddp and devices >= WORLD_SIZE and base["batch"] >= WORLD_SIZE:
        cfg = {**base, "method": "conv_adapter", "memory": VARIANTS["lean"], "batch": base["batch"] // WORLD_SIZE,
               "label": f"{label} conv_adapter DDP"}
        runs["conv_adapter_ddp"] = _attempt("conv_adapter_ddp", lambda: _run_ddp(cfg))
    elif ddp:
        why = (f"{devices} GPU(s)" if devices < WORLD_SIZE else f"batch {base['batch']} < {WORLD_SIZE} ranks")
        runs["conv_adapter_ddp"] = {"status": f"skipped: {why}"}
    result = {"machine": machine_description(device), "device": device, "network": label,
              "settings": {k: base[k] for k in ("patch", "batch", "steps", "warmup", "compile")},
              "runs": runs, "ratios": _ratios(runs)}
    result["ok"] = all(r["status"] == "ok" or r["status"].startswith("skipped") for r in runs.values())
    result["wall_s"] = time.perf_counter() - start
    print(format_gpu_report(result), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _ratios(runs: dict) -> dict:
    full, adapter = runs.get("full", {}), runs.get("conv_adapter", {})
    out = {}
    if full.get("status") == "ok" and adapter.get("status") == "ok":
        out["conv_adapter_vs_full_time"] = adapter["step_time_s"] / full["step_time_s"]
        out["conv_adapter_vs_full_memory"] = adapter["peak_memory_mib"] / full["peak_memory_mib"]
        if adapter.get("peak_reserved_mib") and full.get("peak_reserved_mib"):
            out["conv_adapter_vs_full_reserved"] = adapter["peak_reserved_mib"] / full["peak_reserved_mib"]
    ddp = runs.get("conv_adapter_ddp", {})
    if ddp.get("status") == "ok" and adapter.get("status") == "ok":
        out["ddp_step_vs_one_device"] = ddp["step_time_s"] / adapter["step_time_s"]
    return out


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_gpu_report(result: dict) -> str:
    """The markdown report of :func:`run_gpu_check`'s result."""
    s = result["settings"]
    runs, ratios = result["runs"], result["ratios"]
    full = runs.get("full", {})
    lines = [f"gpu-check on: {result['machine']}",
             f"{result['network']}, patch {'x'.join(map(str, s['patch']))}, batch {s['batch']}, device "
             f"{result['device']}, autocast, {'torch.compile (Inductor)' if s['compile'] else 'eager (no compile)'}; "
             f"{s['steps']} measured steps after {s['warmup']} warm-up step(s)"
             f"{' (the first compiles)' if s['compile'] else ''}, each run in a fresh process",
             "", "| run | status | step time (s) | warm-up steps (s) | peak allocated / RSS (MiB) | peak reserved (MiB) "
             "| time vs full | memory vs full |", "|---|---|---|---|---|---|---|---|"]
    names = {"full": "full fine-tuning", "conv_adapter": "Conv-Adapter (lean memory paths)",
             "tpp_pretext": "TPP pretext (DINO), Conv-Adapter", "conv_adapter_ddp":
             f"Conv-Adapter, DDP on {WORLD_SIZE} {'GPUs' if result['device'] == 'cuda' else 'processes'} "
             f"(batch {s['batch'] // WORLD_SIZE} each)"}
    for key, r in runs.items():
        ok = r.get("status") == "ok"
        vs_time = vs_mem = "–"
        if ok and full.get("status") == "ok" and key in ("full", "conv_adapter"):
            vs_time = f"{r['step_time_s'] / full['step_time_s']:.2f}x"
            vs_mem = f"{r['peak_memory_mib'] / full['peak_memory_mib']:.2f}x"
        warm = ", ".join(f"{t:.1f}" for t in r.get("warmup_times_s", [])) or "–"
        lines.append(f"| {names.get(key, key)} | {r.get('status')} | {_cell(r.get('step_time_s') if ok else None, '.3f')} "
                     f"| {warm if ok else '–'} | {_cell(r.get('peak_memory_mib') if ok else None, '.0f')} "
                     f"| {_cell(r.get('peak_reserved_mib') if ok else None, '.0f')} | {vs_time} | {vs_mem} |")
    if "ddp_step_vs_one_device" in ratios:
        lines += ["", f"DDP: step time per rank (half the batch each) = {ratios['ddp_step_vs_one_device']:.2f}x the "
                  f"one-device step of the whole batch."]
    lines += ["", f"{'all runs ok' if result['ok'] else 'SOME RUNS FAILED'}; {result['wall_s']:.0f} s in all."]
    return "\n".join(lines)


def add_gpu_check_arguments(parser) -> None:
    """Adds the ``nnunet-tpp gpu-check`` options to an ``argparse`` parser."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny STU-Net at 16^3: a smoke run of the same code (needed for --device cpu)")
    parser.add_argument("--size", default=DEFAULT_SIZE, type=str.upper, help="STU-Net size (default: B)")
    parser.add_argument("--plans", default=None, metavar="nnUNetPlans.json",
                        help="take patch, batch size and pool sizes from an nnU-Net plan")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--patch", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                        help="patch size (default: 128 128 128; --plans: the plan's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 2; --plans: the plan's)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default: 5; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (default: 2; tiny: 1)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the two-device DDP run")
    parser.add_argument("--no-tpp", dest="tpp", action="store_false", help="skip the TPP pretext iterations")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the result as JSON")


def gpu_check_main(args) -> int:
    """Runs :func:`run_gpu_check` with parsed ``args``; returns 0 when every run was ok, 1 when one failed or no GPU
    is there, 2 for other bad input."""
    try:
        check_settings(args.device, args.tiny)
        plan = {}
        if args.plans:
            from nnunet_tpp.bench import plan_settings
            plan = plan_settings(args.plans, args.configuration)
        result = run_gpu_check(device=args.device, tiny=args.tiny, size=args.size,
                               patch=args.patch or plan.get("patch"), batch=args.batch or plan.get("batch"),
                               pools=plan.get("pools"), steps=args.steps, warmup=args.warmup, compile=args.compile,
                               ddp=args.ddp, tpp=args.tpp, json_out=args.json_out)
    except GPUCheckError as exc:
        print(f"nnunet-tpp gpu-check: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"nnunet-tpp gpu-check: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1
