"""``nnunet-tpp bench``: training step time, peak memory and trainable parameters of every PEFT method next to
full fine-tuning, the TPP pretext step, and the inference latency of LoRA merged vs unmerged vs the plain network.

Each measurement runs on the same seeded random network (STU-Net S/B/L/H, or the network of an nnU-Net plan:
``--plans FILE --network plans``) with nnU-Net's optimiser and a deep-supervision cross-entropy, in its own fresh
process (:mod:`nnunet_tpp.bench_workers`), on CPU (peak resident set size) and on CUDA (autocast, as nnU-Net trains;
``max_memory_allocated`` and ``max_memory_reserved``) alike, so no method inherits another's allocator, cuDNN
autotuning or caches. The methods run in ``--rounds`` interleaved rounds (every method once per round); a method's
time and memory are the medians over the rounds, its ratio to full fine-tuning the median of the per-round ratios
with their min-max spread, and the report says when that spread is too wide to tell (:mod:`nnunet_tpp.bench_stats`).
PEFT methods run with the memory paths of
``--memory-paths`` (default ``lean``: the trainers' default; ``plain``; ``checkpointing``: lean + activation
checkpointing), each row saying which. A method whose estimated peak does not fit the device, or that runs out of
memory, is a row marked out of memory (``"out_of_memory": true``, no ratios); the rest of the table still prints.
Timings are only as good as the machine is quiet: the report shows the 1-minute load average before and after.
Importing this module imports neither torch nor the package.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from nnunet_tpp.measuring import load_average, machine_description, short_count

DEFAULT_PATCH = {"cpu": (64, 64, 64), "cuda": (128, 128, 128)}
REFERENCE = "full"
DEFAULT_ROUNDS = 5
LATENCY_METHOD = "lora"
VARIANTS = {"lean": {"lean_backward": True, "activation_checkpointing": "off"},
            "plain": {"lean_backward": False, "activation_checkpointing": "off"},
            "checkpointing": {"lean_backward": True, "activation_checkpointing": "on"}}
RUNTIME_MIB = 400  # what a CPU worker's RSS holds besides the network (Python, torch, oneDNN)
MiB = 2 ** 20


class BenchError(ValueError):
    """Invalid benchmark settings (size, patch, device, ...) or a failed worker."""


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measure_in_child(kind: str, cfg: dict) -> dict:
    """Runs ``bench_workers.measure_<kind>(cfg)`` (``training``, ``latency``, ``pretext``) in a fresh interpreter and
    returns its result; a worker killed by the system (out of memory) comes back as ``{"out_of_memory": True,
    "error"}``. Raises :class:`BenchError` when the worker fails otherwise."""
    fd, path = tempfile.mkstemp(prefix="nnunet_tpp_bench_", suffix=".json")
    os.close(fd)
    try:
        rc = subprocess.call([sys.executable, "-m", "nnunet_tpp.bench_workers", kind, json.dumps(cfg), path])
        if rc < 0:
            return {"out_of_memory": True, "error": f"worker killed by signal {-rc}"}
        if rc != 0:
            raise BenchError(f"benchmark worker ({kind}, {cfg.get('label', '')}) failed with exit code {rc}; see "
                             f"the messages above")
        with open(path) as f:
            return json.load(f)
    finally:
        os.remove(path)


def _measure(kind: str, cfg: dict) -> dict:
    """One measurement in a fresh process, on CPU and CUDA alike (no allocator, cuDNN autotuning or compile cache
    carried over from another method)."""
    return measure_in_child(kind, cfg)


def _fits(cfg: dict) -> tuple[bool, float, float]:
    """``(fits, estimated_peak_mib, available_mib)`` for a training configuration (a meta-device estimate)."""
    import torch
    from nnunet_tpp.bench_workers import build
    from nnunet_tpp.models.memory import HEADROOM, available_bytes, estimate_training_peak
    with torch.device("meta"):
        net = build(cfg, cfg["method"])
    shape = (int(cfg["batch"]), int(cfg.get("channels", 1)), *cfg["patch"])
    estimate = estimate_training_peak(net, shape, optimizer_slots=1).total / MiB
    if cfg["device"] == "cpu":
        estimate += RUNTIME_MIB
    available = available_bytes(torch.device(cfg["device"])) / MiB
    return estimate <= HEADROOM * available, estimate, available


def _check(backbones, patch, batch, methods, device, steps, warmup, pools, variants, rounds=1) -> list[str]:
    """Validates the settings and returns the method list, ``full`` first."""
    import torch
    from nnunet_tpp import peft
    from nnunet_tpp.models.stunet import SIZES
    unknown = [b for b in backbones if b != "plans" and b not in SIZES and not b.startswith("primus:")]
    if not backbones or unknown:
        raise BenchError(f"unknown STU-Net size(s) {unknown}; choose from {sorted(SIZES)}")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    divisors = [1, 1, 1]  # the patch must divide by the product of the pool sizes (Primus: its 8^3 patches)
    for pool in ([[8, 8, 8]] if backbones[0].startswith("primus:") else pools or [[2, 2, 2]] * 4 + [[1, 1, 2]]):
        divisors = [d * int(k) for d, k in zip(divisors, pool)]
    if len(patch) != 3 or any(int(p) <= 0 or int(p) % d for p, d in zip(patch, divisors)):
        raise BenchError(f"patch must be 3 positive sizes divisible by {tuple(divisors)}, got {list(patch)}")
    if batch < 1 or steps < 1 or warmup < 0 or rounds < 1:
        raise BenchError(f"need batch >= 1, steps >= 1, warmup >= 0, rounds >= 1 (got {batch}, {steps}, {warmup}, "
                         f"{rounds})")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise BenchError(f"unknown memory path variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    cnn_methods = [m for m in peft.methods() if "STUNet" in peft.get_method(m).models]
    names = list(dict.fromkeys([REFERENCE, *(methods or cnn_methods)]))
    for name in names + [LATENCY_METHOD]:
        peft.get_method(name)  # raises PeftError listing the known methods
    return names


def _rows(names: list[str], variants: list[str]) -> list[tuple[str, str, dict]]:
    """``(row name, method, memory settings)``: full once, plain; every other method per variant."""
    rows = [(REFERENCE, REFERENCE, VARIANTS["plain"])]
    for method in names[1:]:
        for variant in variants:
            rows.append((method if variant == variants[0] else f"{method} [{variant}]", method, VARIANTS[variant]))
    return rows


def _memory_label(memory: dict, method: str) -> str:
    if method == REFERENCE or not (memory["lean_backward"] or memory["activation_checkpointing"] != "off"):
        return "plain"
    return ("lean" if memory["lean_backward"] else "plain") + (
        " + checkpointing" if memory["activation_checkpointing"] == "on" else "")


def _measure_rounds(runnable: list[tuple[str, dict]], rounds: int, table: dict) -> dict[str, dict[int, dict]]:
    """Measures every runnable row once per round, each time in a fresh process; the rounds are interleaved
    (A B C, B C A, C A B, ...: each round starts one row later, so no row is always first after a pause). A row that
    runs out of memory in any round becomes an out-of-memory row of ``table``."""
    per_round: dict[str, dict[int, dict]] = {row: {} for row, _ in runnable}
    for r in range(rounds):
        shift = r % max(1, len(runnable))
        for row, cfg in runnable[shift:] + runnable[:shift]:
            if table[row].get("out_of_memory"):
                continue
            measured = _measure("training", {**cfg, "label": f"{cfg['label']} (round {r + 1}/{rounds})"})
            if measured.get("out_of_memory"):
                table[row].update(out_of_memory=True, error=measured.get("error", "ran out of memory"))
                continue
            per_round[row][r] = measured
    return per_round


def _bench_backbone(base: dict, names, variants, measure_pretext: bool, ignore_estimate: bool = False,
                    measure_latency: bool = True, rounds: int = 1, pretext_objective: str = "mae") -> dict:
    """All rows (``rounds`` interleaved rounds), the pretext step and the latencies for one backbone."""
    from nnunet_tpp.bench_stats import round_ratios, spread, summarise, verdict
    table, runnable = {}, []
    for row, method, memory in _rows(names, variants):
        cfg = {**base, "method": method, "memory": memory, "label": f"{base['label']} {row}"}
        fits, estimate, available = _fits(cfg)
        label = _memory_label(memory, method)
        if not fits and not ignore_estimate:
            _log(f"{cfg['label']}: estimated peak {estimate:.0f} MiB > {available:.0f} MiB available: not run")
            table[row] = {"out_of_memory": True, "estimated": True, "estimated_peak_mib": estimate,
                          "available_mib": available, "memory_paths": label}
            continue
        table[row] = {"memory_paths": label, "estimated_peak_mib": estimate}
        runnable.append((row, cfg))
    per_round = _measure_rounds(runnable, rounds, table)
    for row, measured in per_round.items():
        m = table[row]
        if m.get("out_of_memory"):
            continue
        first = next(iter(measured.values()))
        m.update(summarise(measured, ("step_time_s", "peak_memory_mib", "peak_reserved_mib", "baseline_memory_mib")),
                 trainable=first["trainable"], total=first["total"],
                 step_times_s=[measured[r]["step_time_s"] for r in sorted(measured)],
                 peak_memory_per_round_mib=[measured[r]["peak_memory_mib"] for r in sorted(measured)])
        m["trainable_ratio"] = m["trainable"] / m["total"]
        m.setdefault("peak_reserved_mib", None)  # CUDA only
    ref = per_round.get(REFERENCE) if not table[REFERENCE].get("out_of_memory") else None
    for row, measured in per_round.items():
        m = table[row]
        if m.get("out_of_memory") or not ref:
            continue
        times = round_ratios(measured, ref, "step_time_s")
        memory = round_ratios(measured, ref, "peak_memory_mib")
        if not times:
            continue
        t, mem = spread(times), spread(memory)
        m.update(step_time_ratio=t["ratio"], step_time_ratio_range=t["range"], step_time_ratios=times,
                 peak_memory_ratio=mem["ratio"], peak_memory_ratio_range=mem["range"],
                 time_verdict="reference" if row == REFERENCE else verdict(times),
                 memory_verdict="reference" if row == REFERENCE else verdict(memory, "smaller", "larger"))
    pretext = None
    adapter = table.get("conv_adapter", {})
    if measure_pretext and adapter and not adapter.get("out_of_memory"):
        pretext = _measure("pretext", {**base, "method": "conv_adapter", "memory": VARIANTS[variants[0]],
                                       "objective": pretext_objective})
        pretext["supervised_volumes_per_s"] = int(base["batch"]) / adapter["step_time_s"]
        pretext["supervised_peak_memory_mib"] = adapter["peak_memory_mib"]
    result = {"methods": table, "pretext": pretext, "latency": None}
    if measure_latency:
        lat = _measure("latency", base)
        result.update(latency=lat, merged_latency_ratio=lat["merged_vs_plain"],
                      unmerged_latency_ratio=lat["unmerged_vs_plain"])
    return result


def run_bench(sizes=("S",), patch=None, batch=2, methods=None, device="cpu", steps=3, warmup=1, json_out=None,
              threads=None, pools=None, network="stunet", plans_file=None, configuration="3d_fullres",
              memory_paths=("lean",), channels=1, ignore_estimate=False, pretext=True, latency=True,
              rounds=DEFAULT_ROUNDS, pretext_objective="mae") -> dict:
    """Runs the benchmark, prints the markdown report to stdout and optionally writes JSON.

    Args:
        sizes: STU-Net sizes (``S``, ``B``, ``L``, ``H``) for ``network="stunet"``; the first fills the top-level keys.
        patch: 3 patch sizes; default 64^3 on CPU, 128^3 on CUDA.
        batch: training batch size (latency uses batch 1).
        methods: PEFT method names; default all registered ones for CNNs. ``full`` is always measured.
        device: ``cpu`` or ``cuda``.
        steps, warmup: measured and warm-up training steps of each process (and latency rounds).
        rounds: interleaved rounds; each measures every method once, in a fresh process. The ratios to full
            fine-tuning are the medians of the per-round ratios, with their min-max spread and a verdict
            (:mod:`nnunet_tpp.bench_stats`).
        json_out: path for the JSON result.
        threads: ``torch.set_num_threads`` for every measurement (default: torch's choice).
        pools: STU-Net's five pool sizes (default: the published pre-training ones); see :func:`plan_settings`.
        network: ``stunet`` or ``plans`` (the network ``plans_file`` describes for ``configuration``).
        memory_paths: variants measured for each PEFT method (``lean``, ``plain``, ``checkpointing``).
        channels: input channels.
        ignore_estimate: run a method even when its estimated peak does not fit (an actual out-of-memory end is
            still a row marked out of memory).
        pretext, latency: also measure the TPP pretext step (STU-Net) and the LoRA latencies.
        pretext_objective: the pretext measured: ``mae`` (masked reconstruction, the 3-D recipe's default) or
            ``dino``.
    Returns:
        ``{"machine", "rounds", "methods": {row: {"step_time_ratio", "step_time_ratio_range", "time_verdict",
        "peak_memory_ratio", "peak_memory_ratio_range", "memory_verdict", "trainable_ratio", "step_time_s",
        "peak_memory_mib" (CUDA: also "peak_reserved_mib"), "step_times_s" (one per round), "memory_paths", ...} or
        {"out_of_memory": True, ...}}, "merged_latency_ratio", ..., "sizes": {backbone: <the same structure>}}``.
    """
    if network not in ("stunet", "plans", "primus"):
        raise BenchError(f"--network must be stunet, plans or primus, got {network!r}")
    if pretext_objective not in ("mae", "dino"):
        raise BenchError(f"the pretext objective must be mae or dino, got {pretext_objective!r}")
    if network == "plans" and not plans_file:
        raise BenchError("--network plans needs --plans FILE (an nnU-Net plans JSON)")
    keys = ["plans"] if network == "plans" else [str(s).upper() for s in ((sizes,) if isinstance(sizes, str) else sizes)]
    if network == "primus":  # --size: Primus presets (S B M L, V3S ...) or EMBED:DEPTH:HEADS; the Primus trainers'
        from nnunet_tpp.trainers.primus import PRIMUS_METHODS  # methods (full, decoder probe, LoRA, Adapter)
        keys = [f"primus:{k}" for k in keys]
        methods = methods or [m for m in PRIMUS_METHODS if m != REFERENCE]
        memory_paths, pretext, latency = ("plain",), False, False
    patch = tuple(int(p) for p in (patch or DEFAULT_PATCH.get(device, DEFAULT_PATCH["cpu"])))
    variants = list(memory_paths)
    check_pools = plan_settings(plans_file, configuration)["pools"] if network == "plans" else pools
    names = _check(keys, patch, int(batch), methods, device, int(steps), int(warmup), check_pools, variants,
                   int(rounds))
    if pretext and network == "stunet" and pretext_objective == "mae":  # its one view is the patch
        from nnunet_tpp.pretext.dino import PretextSettingsError
        from nnunet_tpp.pretext.masked import MaskedConfig
        from nnunet_tpp.pretext.masked_views import check_mask_settings
        try:
            check_mask_settings(MaskedConfig.mask_ratio, MaskedConfig.block_size, patch)
        except PretextSettingsError as e:
            raise BenchError(f"the masked-reconstruction pretext step cannot run on this patch: {e} "
                             f"(or pass --no-pretext)") from None
    import torch
    machine, load_before = machine_description(device, threads), load_average()
    per_backbone = {}
    for key in keys:
        base = {"patch": list(patch), "batch": int(batch), "device": device, "steps": int(steps),
                "warmup": int(warmup), "threads": threads, "channels": int(channels)}
        if key == "plans":
            arch = plan_settings(plans_file, configuration)["network"]
            base.update(network="plans", plans_file=os.path.abspath(plans_file), configuration=configuration,
                        label=arch)
            key = arch
        elif key.startswith("primus:"):
            base.update(network="primus", size=key[len("primus:"):], label=f"Primus {key[len('primus:'):]}")
        else:
            base.update(network="stunet", size=key, pools=pools, label=f"STU-Net-{key}")
        measured = _bench_backbone(base, names, variants, measure_pretext=pretext and network == "stunet",
                                   ignore_estimate=ignore_estimate, measure_latency=latency, rounds=int(rounds),
                                   pretext_objective=pretext_objective)
        per_backbone[key] = {
            "machine": machine, "torch": torch.__version__, "device": device, "network": base["label"],
            "patch": list(patch), "batch": int(batch), "steps": int(steps), "warmup": int(warmup),
            "rounds": int(rounds),
            "memory_kind": "peak RSS of the process" if device == "cpu" else
            "torch.cuda.max_memory_allocated (max_memory_reserved) of the process",
            "load_average": [load_before, load_average()], **measured}
    result = {**next(iter(per_backbone.values())), "sizes": per_backbone}
    print(format_report(result), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _ratio_cell(m: dict, key: str) -> str:
    """``0.87x (0.85-0.90)``: the median of the per-round ratios and their range."""
    if key not in m:
        return "–"
    lo, hi = m.get(f"{key}_range", [m[key], m[key]])
    return f"{m[key]:.2f}x ({lo:.2f}-{hi:.2f})"


def _row(name: str, m: dict) -> str:
    if m.get("out_of_memory"):
        why = (f"estimated {m['estimated_peak_mib'] / 1024:.1f} GiB > {m['available_mib'] / 1024:.1f} GiB available"
               if m.get("estimated") else m.get("error", "ran out of memory"))
        return f"| {name} | {m['memory_paths']} | – | out of memory ({why}) | – | – | – | – | – |"
    memory = f"{m['peak_memory_mib']:.0f}"
    if m.get("peak_reserved_mib") is not None:
        memory += f" (reserved {m['peak_reserved_mib']:.0f})"
    return (f"| {name} | {m['memory_paths']} | {short_count(m['trainable'])} ({100 * m['trainable_ratio']:.2f}%) "
            f"| {m['step_time_s']:.3f} | {_ratio_cell(m, 'step_time_ratio')} | {m.get('time_verdict', '–')} "
            f"| {memory} | {_ratio_cell(m, 'peak_memory_ratio')} | {m['baseline_memory_mib']:.0f} |")


HEADER = ("| method | memory paths | trainable | step time (s) | step time vs full | what the time spread tells "
          "| peak memory (MiB) | memory vs full | memory after build (MiB) |")


def format_report(result: dict) -> str:
    """The markdown report of :func:`run_bench`'s result: per backbone a training table and a latency table."""
    from nnunet_tpp.bench_stats import RESOLUTION
    lines = []
    for r in result["sizes"].values():
        rounds = r.get("rounds", 1)
        lines += [f"Machine: {r['machine']}; {r['network']}, patch {'x'.join(map(str, r['patch']))}, "
                  f"batch {r['batch']}, device {r['device']}; {rounds} interleaved round(s), each method once per "
                  f"round in a fresh process ({r['steps']} measured + {r['warmup']} warm-up steps); "
                  f"memory = {r['memory_kind']}; 1-min load average before/after "
                  f"{'/'.join(map(str, r['load_average']))}", "",
                  f"Step time and memory: the median over the rounds; vs full: the median of the per-round ratios "
                  f"to full fine-tuning (min-max over the rounds in brackets). A spread that straddles 1.0 cannot "
                  f"tell faster from slower, and one wider than +-{100 * RESOLUTION:.0f} % does not resolve a "
                  f"{100 * RESOLUTION:.0f} % effect: run more rounds on a quieter machine.", "",
                  HEADER, "|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(name, m) for name, m in r["methods"].items()]
        lat = r["latency"]
        if lat:
            lines += ["", f"Inference latency, batch 1, {LATENCY_METHOD} (merge max abs diff "
                      f"{lat['merge_max_abs_diff']:.2e}; one process, {lat['rounds']} alternating rounds against "
                      "the plain network; ratio = median of the per-round ratios):", "",
                      "| network | latency (s) | vs plain network |", "|---|---|---|",
                      f"| plain network | {lat['plain_s']:.4f} | 1.00x |",
                      f"| {LATENCY_METHOD} unmerged | {lat['unmerged_s']:.4f} | {lat['unmerged_vs_plain']:.2f}x |",
                      f"| {LATENCY_METHOD} merged | {lat['merged_s']:.4f} | {lat['merged_vs_plain']:.3f}x |"]
        if r.get("pretext"):
            p = r["pretext"]
            dino = p.get("objective") == "dino"
            views = "2 global + 4 local views" if dino else "one view at the patch size, 75 % of its blocks masked,"
            name = "DINO" if dino else "masked reconstruction"
            lines += ["", f"TPP with conv_adapter: {name} pretext step ({views} per volume) vs the supervised step:",
                      "", "| stage | volumes/s | peak memory (MiB) |", "|---|---|---|",
                      f"| pretext ({name}) | {p['volumes_per_s']:.2f} | {p['peak_memory_mib']:.0f} |",
                      f"| supervised fine-tuning | {p['supervised_volumes_per_s']:.2f} "
                      f"| {p['supervised_peak_memory_mib']:.0f} |"]
        lines.append("")
    return "\n".join(lines)


def plan_settings(plans_file: str, configuration: str = "3d_fullres") -> dict:
    """Patch, batch size, STU-Net pool sizes and network class of an nnU-Net plan (``nnUNetPlans.json``)."""
    from nnunet_tpp.models.stunet import plan_pool_sizes
    try:
        with open(plans_file) as f:
            plans = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"{plans_file}: not a readable plans JSON ({e})") from None
    try:
        config = plans["configurations"][configuration]
        arch = config["architecture"]
        return {"patch": config["patch_size"], "batch": config["batch_size"],
                "pools": plan_pool_sizes(arch["arch_kwargs"]["strides"]),
                "network": str(arch.get("network_class_name", "network")).split(".")[-1]}
    except KeyError as e:
        raise BenchError(f"{plans_file}: no {e} in configuration {configuration!r} of these plans") from None


def add_bench_arguments(parser) -> None:
    """Adds the ``nnunet-tpp bench`` options to an ``argparse`` parser."""
    parser.add_argument("--size", nargs="+", default=["S"], type=str.upper, metavar="SIZE",
                        help="STU-Net size(s): S B L H (default: S)")
    parser.add_argument("--network", choices=("stunet", "plans", "primus"), default="stunet",
                        help="stunet (default), plans: the network --plans describes (PlainConvUNet, ResEnc), or "
                             "primus: nnU-Net's transformer (--size S B M L V3S ... or EMBED:DEPTH:HEADS)")
    parser.add_argument("--patch", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                        help="patch size (default: 64 64 64 on cpu, 128 128 128 on cuda; --plans: the plan's)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default: 2; --plans: the plan's)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="PEFT methods (default: all registered for CNNs; --network primus: linear_probe lora "
                             "adapter, the Primus trainers' methods; full is always measured)")
    parser.add_argument("--memory-paths", nargs="+", default=["lean"], choices=tuple(VARIANTS), dest="memory_paths",
                        help="memory paths measured for each PEFT method (default: lean, the trainers' default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default: 1)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds, each method once per round in a fresh process; ratios are the "
                             f"median of the per-round ratios with their spread (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the result as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default: 1)")
    parser.add_argument("--plans", default=None, metavar="nnUNetPlans.json",
                        help="take patch, batch size and pool sizes from an nnU-Net plan (--patch/--batch win)")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--ignore-estimate", dest="ignore_estimate", action="store_true",
                        help="measure methods whose estimated peak does not fit the device too")
    parser.add_argument("--no-pretext", dest="pretext", action="store_false", help="skip the TPP pretext step")
    parser.add_argument("--pretext-objective", choices=("mae", "dino"), default="mae",
                        help="the pretext step measured (default mae: masked reconstruction, the 3-D default)")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the LoRA latencies")


def bench_main(args) -> int:
    """Runs :func:`run_bench` with parsed ``args``; returns the exit code (2 with a message on bad input)."""
    try:
        plan = plan_settings(args.plans, args.configuration) if getattr(args, "plans", None) else {}
        run_bench(sizes=args.size, patch=args.patch or plan.get("patch"), batch=args.batch or plan.get("batch", 2),
                  methods=args.methods, device=args.device, steps=args.steps, warmup=args.warmup,
                  json_out=args.json_out, threads=args.threads,
                  pools=plan.get("pools") if args.network == "stunet" else None, network=args.network,
                  plans_file=args.plans, configuration=args.configuration, memory_paths=args.memory_paths,
                  channels=args.channels, ignore_estimate=args.ignore_estimate, pretext=args.pretext,
                  latency=args.latency, rounds=args.rounds, pretext_objective=args.pretext_objective)
    except ValueError as exc:  # BenchError, PeftError
        print(f"nnunet-tpp bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """``python -m nnunet_tpp.bench [options]``."""
    import argparse
    parser = argparse.ArgumentParser(prog="nnunet-tpp bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
