"""Running the stock nnU-Net v2 commands (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``) as subprocesses, with their folders set, their full output in a log file and the
lines a person wants to see (epochs, losses, Dice, errors) echoed as progress."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PROGRESS = re.compile(r"Epoch \d+$|train_loss|Pseudo dice|trainable parameters|pre-trained weights|loaded \d+|"
                       r"newly initialised|adapter-only|Mean Validation Dice|WARNING|Error|error:|Predicting|"
                       r"Fingerprint extraction|Preprocessing dataset|Experiment planning|done with")


class NNUNetCommandError(RuntimeError):
    """An nnU-Net command that exited with an error; the message holds the end of its output."""


@dataclass
class NNUNetFolders:
    """The three folders nnU-Net works in, under one work folder."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def env(self, **extra: str) -> dict[str, str]:
        """The process environment with nnU-Net's folder variables (and ``extra``) set; nnU-Net's worker counts
        default to 1 (data augmentation) and the machine's cores, at most nnU-Net's 8 (validation and export)
        where the caller has not set them."""
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results))
        env.setdefault("nnUNet_n_proc_DA", "1")  # 0 crashes nnU-Net's planning
        # nnU-Net's validation and export spawn a pool of 8 processes (each imports torch) unless told otherwise;
        # on a 2-core machine that pool alone cost ~70 s of the demo's 107 s fine-tuning step
        env.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
        env.update(extra)
        return env

    def make(self) -> None:
        for folder in (self.raw, self.preprocessed, self.results):
            folder.mkdir(parents=True, exist_ok=True)


def console_script(name: str) -> str:
    """Path of an installed console script (next to the running interpreter when present)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run_nnunet(args: list[str], env: dict[str, str], log_file: Path, echo=print) -> float:
    """Runs one nnU-Net command, appending its output to ``log_file`` and echoing progress lines.

    Returns:
        Wall time in seconds. Raises :class:`NNUNetCommandError` on a non-zero exit.
    """
    cmd = [console_script(args[0])] + [str(a) for a in args[1:]]
    echo(f"$ {' '.join([args[0]] + cmd[1:])}")
    start = time.time()
    tail: list[str] = []
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            if _PROGRESS.search(line):
                echo(f"    {line.rstrip()[:160]}  [{time.time() - start:.0f}s]")
        code = proc.wait()
    if code != 0:
        raise NNUNetCommandError(f"{args[0]} failed (exit {code}); full log: {log_file}\n" + "\n".join(tail))
    return time.time() - start
