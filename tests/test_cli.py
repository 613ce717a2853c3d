"""The command line answers ``--help`` without importing torch, nnU-Net or timm (issue: a fast command line)."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "nnunetv2", "timm", "SimpleITK", "monai")
COMMANDS = ("demo", "bench", "gpu-check", "evaluate", "convert", "pretrain", "experiment", "trainers", "methods",
            "check", "adopt-plans", "restore", "train2d", "bench2d", "bench-ssa", "tpp-probe", "evidence")


def _heavy_modules_after(argv: list[str]) -> list[str]:
    code = ("import sys\nfrom nnunet_tpp.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().splitlines()[-1].removeprefix("HEAVY:").split(",") if m]


def test_every_subcommand_is_listed():
    from nnunet_tpp.cli import build_parser
    parser = build_parser()
    listed = next(a for a in parser._actions if a.dest == "command").choices
    assert set(COMMANDS) <= set(listed), sorted(set(COMMANDS) - set(listed))


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_imports_nothing_heavy(argv):
    assert _heavy_modules_after(argv) == []
