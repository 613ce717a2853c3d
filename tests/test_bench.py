"""``nnunet_tpp.bench`` on a tiny configuration: checks the structure of the result, never the timings."""
import argparse
import json
import subprocess
import sys

import pytest

from nnunet_tpp import bench
from nnunet_tpp.cli import main

METHODS = ("full", "conv_adapter", "lora")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.run_bench(sizes=("S",), patch=(32, 32, 32), batch=1, methods=["conv_adapter", "lora"],
                             device="cpu", steps=1, warmup=0, json_out=str(out), threads=1)
    return result, json.loads(out.read_text())


def test_json_structure(tiny):
    result, written = tiny
    assert written == json.loads(json.dumps(result))
    for data in (written, written["sizes"]["S"]):
        assert isinstance(data["machine"], str) and data["machine"]
        assert list(data["methods"]) == list(METHODS)  # full is measured (first) although not asked for
        for name, m in data["methods"].items():
            for key in ("step_time_ratio", "peak_memory_ratio", "trainable_ratio", "step_time_s",
                        "peak_memory_mib"):
                assert isinstance(m[key], float) and m[key] > 0, (name, key)
        full = data["methods"]["full"]
        assert full["step_time_ratio"] == full["peak_memory_ratio"] == full["trainable_ratio"] == 1.0
        assert data["methods"]["conv_adapter"]["trainable_ratio"] < 0.05
        assert data["merged_latency_ratio"] > 0 and data["unmerged_latency_ratio"] > 0
    assert written["latency"]["merge_max_abs_diff"] < 1e-3
    pretext = written["pretext"]  # TPP pretext throughput next to the supervised stage's
    assert pretext["volumes_per_s"] > 0 and pretext["supervised_volumes_per_s"] > 0 and pretext["peak_memory_mib"] > 0


def test_report_printed(tiny, capsys):
    text = bench.format_report(tiny[0])
    assert ("| method | memory paths | trainable | step time (s) | step time vs full | peak memory (MiB) "
            "| memory vs full" in text)
    assert all(f"| {m} |" in text for m in METHODS)
    assert "| conv_adapter | lean |" in text and "| full | plain |" in text
    assert "lora merged" in text
    assert "| pretext (DINO) |" in text and "| supervised fine-tuning |" in text


def test_unknown_method_lists_known_ones(capsys):
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    args = parser.parse_args(["--methods", "nope", "--patch", "32", "32", "32"])
    assert bench.bench_main(args) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "conv_adapter" in err and "lora" in err


def test_bad_patch_and_missing_cuda():
    with pytest.raises(bench.BenchError, match="divisible"):
        bench.run_bench(patch=(30, 32, 32))
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(bench.BenchError, match="cuda"):
            bench.run_bench(device="cuda")


def _tiny_plans(tmp_path, network="PlainConvUNet"):
    kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
              "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}}
    kwargs["n_conv_per_stage" if network == "PlainConvUNet" else "n_blocks_per_stage"] = [1, 1, 1]
    config = {"patch_size": [16, 16, 16], "batch_size": 1, "architecture": {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}", "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    plans = {"plans_name": "p", "dataset_name": "Dataset1_X", "configurations": {"3d_fullres": config}}
    path = tmp_path / f"{network}.json"
    path.write_text(json.dumps(plans))
    return path


@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_the_plans_network_is_benchmarked_with_peft_beside_full(tmp_path, network):
    plans = _tiny_plans(tmp_path, network)
    result = bench.run_bench(network="plans", plans_file=str(plans), patch=(16, 16, 16), batch=1,
                             methods=["conv_adapter"], steps=1, warmup=0, threads=1,
                             memory_paths=["lean", "plain"])
    assert result["network"] == network and list(result["sizes"]) == [network]
    rows = result["methods"]
    assert list(rows) == ["full", "conv_adapter", "conv_adapter [plain]"]
    assert rows["conv_adapter"]["memory_paths"] == "lean" and rows["conv_adapter [plain]"]["memory_paths"] == "plain"
    assert 0 < rows["conv_adapter"]["trainable_ratio"] < 1 and rows["full"]["trainable_ratio"] == 1.0


def test_a_method_that_does_not_fit_is_a_row_marked_out_of_memory(monkeypatch, capsys):
    import nnunet_tpp.models.memory as memory
    real = memory.estimate_training_peak

    def only_peft_fits(net, shape, optimizer_slots=1, dtype=None):
        estimate = real(net, shape, optimizer_slots)
        return estimate if estimate.gradients < estimate.weights else memory.PeakEstimate(10 ** 13, 0, 0, 0, 0)

    monkeypatch.setattr(memory, "estimate_training_peak", only_peft_fits)
    result = bench.run_bench(sizes=("S",), patch=(32, 32, 32), batch=1, methods=["conv_adapter"], steps=1,
                             warmup=0, threads=1)
    full, adapter = result["methods"]["full"], result["methods"]["conv_adapter"]
    assert full["out_of_memory"] is True and "step_time_ratio" not in full
    assert adapter["step_time_s"] > 0 and "step_time_ratio" not in adapter  # no ratio against a missing full run
    assert "| full | plain | – | out of memory (estimated" in capsys.readouterr().out


def test_import_is_cheap():
    code = "import sys, nnunet_tpp.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bench_takes_patch_batch_and_pools_from_an_nnunet_plan(tmp_path, capsys):
    plans = {"configurations": {"3d_fullres": {"patch_size": [16, 32, 32], "batch_size": 1, "architecture": {
        "arch_kwargs": {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}}}}}
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    assert bench.plan_settings(str(tmp_path / "plans.json"))["pools"][-1] == [1, 1, 1]
    code = main(["bench", "--plans", str(tmp_path / "plans.json"), "--methods", "conv_adapter", "--steps", "1",
                 "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert code == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["patch"] == [16, 32, 32] and result["batch"] == 1
    assert set(result["methods"]) == {"full", "conv_adapter"}
