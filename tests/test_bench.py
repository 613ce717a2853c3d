"""``nnunet_tpp.bench`` on a tiny configuration: checks the structure of the result and how the rounds are run and
combined, never the timings."""
import argparse
import functools
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
                             device="cpu", steps=1, warmup=0, json_out=str(out), threads=1, rounds=2)
    return result, json.loads(out.read_text())


def test_json_structure(tiny):
    result, written = tiny
    assert written == json.loads(json.dumps(result))
    for data in (written, written["sizes"]["S"]):
        assert isinstance(data["machine"], str) and data["machine"] and data["rounds"] == 2
        assert list(data["methods"]) == list(METHODS)  # full is measured (first) although not asked for
        for name, m in data["methods"].items():
            for key in ("step_time_ratio", "peak_memory_ratio", "trainable_ratio", "step_time_s",
                        "peak_memory_mib"):
                assert isinstance(m[key], float) and m[key] > 0, (name, key)
            assert len(m["step_times_s"]) == len(m["step_time_ratios"]) == m["rounds_measured"] == 2
            lo, hi = m["step_time_ratio_range"]
            assert lo <= m["step_time_ratio"] <= hi and isinstance(m["time_verdict"], str)
            assert m["peak_reserved_mib"] is None  # CUDA only
        full = data["methods"]["full"]
        assert full["step_time_ratio"] == full["peak_memory_ratio"] == full["trainable_ratio"] == 1.0
        assert full["time_verdict"] == "reference"
        assert data["methods"]["conv_adapter"]["trainable_ratio"] < 0.05
        assert data["merged_latency_ratio"] > 0 and data["unmerged_latency_ratio"] > 0
    assert written["latency"]["merge_max_abs_diff"] < 1e-3
    pretext = written["pretext"]  # TPP pretext throughput next to the supervised stage's
    assert pretext["volumes_per_s"] > 0 and pretext["supervised_volumes_per_s"] > 0 and pretext["peak_memory_mib"] > 0
    assert pretext["objective"] == "mae"  # the 3-D recipe's default pretext


def test_report_printed(tiny, capsys):
    text = bench.format_report(tiny[0])
    assert bench.HEADER in text and "2 interleaved round(s)" in text and "straddles 1.0" in text
    assert all(f"| {m} |" in text for m in METHODS)
    assert "| conv_adapter | lean |" in text and "| full | plain |" in text
    assert "lora merged" in text
    assert "| pretext (masked reconstruction) |" in text and "| supervised fine-tuning |" in text


@pytest.mark.parametrize("objective", ["mae", "dino"])
def test_the_pretext_measurement_runs_the_stage_it_names(objective, monkeypatch):
    """The worker's pretext step, in this process on the smoke-run STU-Net: each objective's own stage runs
    (its log line, its views), one timed step after one warm-up step."""
    from nnunet_tpp import bench_workers
    from nnunet_tpp.pretext import masked, stage
    ran = []
    for module, name in ((masked, "run_masked_stage"), (stage, "run_dino_stage")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    from nnunet_tpp.pretext import dino  # a small projection head: the stage's cost here is its 4096-way head
    monkeypatch.setattr(dino, "DINOConfig", functools.partial(dino.DINOConfig, out_dim=64, hidden_dim=64,
                                                              bottleneck_dim=32))
    cfg = {"network": "stunet", "size": bench_workers.TINY, "patch": [16, 16, 16], "batch": 1, "device": "cpu",
           "steps": 1, "warmup": 1, "threads": None, "memory": {}, "objective": objective}
    result = bench_workers.measure_pretext(cfg)
    assert ran == ["run_dino_stage" if objective == "dino" else "run_masked_stage"]
    assert result["objective"] == objective and result["step_time_s"] > 0 and result["volumes_per_s"] > 0


def test_a_patch_the_masked_pretext_cannot_mask_is_refused_before_measuring(monkeypatch):
    """16^3 with the default 16-voxel blocks is one block, of which 75 % masks none: said before any process."""
    monkeypatch.setattr(bench, "_measure", lambda *a, **k: pytest.fail("measured before the settings were checked"))
    with pytest.raises(bench.BenchError, match="masks none.*--no-pretext"):
        bench.run_bench(sizes=("S",), patch=(16, 16, 16), pools=[[2, 2, 2]] * 4 + [[1, 1, 1]], batch=1)


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
                             memory_paths=["lean", "plain"], rounds=1)
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
                             warmup=0, threads=1, rounds=1, latency=False, pretext=False)
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
                 "--warmup", "0", "--threads", "1", "--rounds", "1", "--no-latency", "--no-pretext",
                 "--json", str(tmp_path / "b.json")])
    assert code == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["patch"] == [16, 32, 32] and result["batch"] == 1
    assert set(result["methods"]) == {"full", "conv_adapter"}


def test_rounds_are_interleaved_and_ratios_taken_within_a_round(monkeypatch):
    """Every round measures every method once, in a rotating order, and a method's ratio is the median of its
    per-round ratios: a machine whose speed drifts 3x between rounds still gives the true ratio, which the ratio of
    the medians would not. (The measurements are synthetic: a drifting machine on which conv_adapter takes 0.8x
    of full fine-tuning's time and lora 1.1x.)"""
    calls = []
    truth = {"full": 1.0, "conv_adapter": 0.8, "lora": 1.1}
    drift = [1.0, 3.0, 1.5]

    def fake_measure(kind, cfg):
        assert kind == "training"
        r = int(cfg["label"].split("round ")[1].split("/")[0]) - 1
        calls.append((r, cfg["method"]))
        speed = drift[r] * (1.3 if cfg["method"] == "lora" and r == 1 else 1.0)  # lora met a busy moment
        return {"step_time_s": truth[cfg["method"]] * speed, "step_times_s": [1.0], "peak_memory_mib": 100.0,
                "peak_reserved_mib": None, "baseline_memory_mib": 50.0, "trainable": 1, "total": 10}

    monkeypatch.setattr(bench, "_measure", fake_measure)
    result = bench.run_bench(sizes=("S",), patch=(32, 32, 32), batch=1, methods=["conv_adapter", "lora"], steps=1,
                             warmup=0, rounds=3, pretext=False, latency=False)
    assert [c[0] for c in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c[1] for c in calls] == ["full", "conv_adapter", "lora", "conv_adapter", "lora", "full",
                                     "lora", "full", "conv_adapter"]
    rows = result["methods"]
    assert rows["conv_adapter"]["step_time_ratio"] == pytest.approx(0.8)
    assert rows["conv_adapter"]["step_time_ratio_range"] == pytest.approx([0.8, 0.8])
    assert rows["conv_adapter"]["time_verdict"] == "faster, resolved to +-0 %"
    assert rows["lora"]["step_time_ratio"] == pytest.approx(1.1)  # the median is robust to the busy round
    assert rows["lora"]["step_time_ratio_range"] == pytest.approx([1.1, 1.43])
    assert rows["lora"]["time_verdict"].startswith("slower, but the spread +-")
    assert rows["full"]["step_time_s"] == pytest.approx(1.5)  # median over the rounds
