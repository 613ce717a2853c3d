"""``nnunet-tpp gpu-check``: without a GPU it says so and exits non-zero; its CPU smoke run (tiny STU-Net, the same
code: fresh processes, autocast, the TPP stage, two-process DDP) runs every check and reports them."""
import json
import subprocess
import sys

import pytest
import torch

from nnunet_tpp import gpu_check
from nnunet_tpp.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_non_zero(capsys):
    assert main(["gpu-check"]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "sees none" in err and "--device cpu --tiny" in err


def test_a_full_size_cpu_run_and_bad_sizes_are_refused_before_any_work(capsys, tmp_path):
    assert main(["gpu-check", "--device", "cpu"]) == 1
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(gpu_check.GPUCheckError, match="divisible by"):
        gpu_check.run_gpu_check(device="cpu", tiny=True, patch=(15, 16, 16), json_out=str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_the_cpu_smoke_run_runs_every_check(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["gpu-check", "--device", "cpu", "--tiny", "--no-compile", "--json", str(out)])
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"], text
    runs = result["runs"]
    assert list(runs) == ["full", "conv_adapter", "tpp_pretext", "conv_adapter_ddp"]
    assert all(r["status"] == "ok" for r in runs.values())
    for name in ("full", "conv_adapter", "conv_adapter_ddp"):
        assert runs[name]["step_time_s"] > 0 and runs[name]["peak_memory_mib"] > 0
        assert len(runs[name]["losses"]) == 3 * (2 if name.endswith("ddp") else 1)  # warm-up + 2 steps (per rank)
        assert all(v == v for v in runs[name]["losses"])
    assert runs["tpp_pretext"]["volumes_per_s"] > 0
    ranks = runs["conv_adapter_ddp"]["ranks"]
    assert len(ranks) == 2 and all(r["trainable"] == runs["conv_adapter"]["trainable"] for r in ranks)
    assert 0 < result["ratios"]["conv_adapter_vs_full_time"] and 0 < result["ratios"]["conv_adapter_vs_full_memory"]
    assert result["machine"] in text and "| Conv-Adapter, DDP on 2 processes (batch 1 each) | ok |" in text
    assert "all runs ok" in text


def test_import_is_cheap():
    code = "import sys, nnunet_tpp.gpu_check; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
