"""What the benchmarks measure with: a one-line description of the machine, its load average, a device
synchronisation around a timed step, and the short form of a parameter count. Shared by ``nnunet-tpp bench``,
``gpu-check``, ``bench-ssa`` and ``bench2d``; importing it imports no torch and nothing else of the package.
"""
from __future__ import annotations

import os
import platform


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


def load_average() -> float | None:
    """The machine's 1-minute load average, rounded to 0.01 (None where the system does not report one)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def synchronize(device) -> None:
    """Waits for the work queued on ``device`` (a ``torch.device``) to finish before a clock is read: CUDA runs
    asynchronously; on the CPU there is nothing to wait for."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def short_count(n: int) -> str:
    """``n`` as a short string: ``1.23M``, ``45.6k`` or the plain number below a thousand."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
