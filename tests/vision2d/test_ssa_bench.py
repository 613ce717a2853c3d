"""``nnunet-tpp bench-ssa``: the SSA step of full and PEFT methods measured side by side in fresh processes."""
import json

from nnunet_tpp.cli import main
from nnunet_tpp.vision2d.ssa_bench import format_ssa_report, run_ssa_bench

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}
SMALL = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64, "n_local": 2}


def test_full_and_apla_are_measured_side_by_side_with_ratios_against_full(tmp_path):
    out = tmp_path / "ssa.json"
    result = run_ssa_bench("vit_tiny", 32, 4, 1, TINY, methods=["apla"], batch=4, steps=1, warmup=0,
                           ssa_options=SMALL, threads=1, json_out=out, log=lambda _: None)
    assert list(result["methods"]) == ["full", "apla"]  # full is always measured, first
    full, apla = result["methods"]["full"], result["methods"]["apla"]
    assert full["memory_ratio"] == full["speed_ratio"] == 1.0
    # APLA (rows=-1) trains every attn.proj of the backbone: depth x (48 x 48 + 48); counts leave the head out
    assert apla["trainable_params"] == 2 * (48 * 48 + 48) and full["trainable_params"] == full["total_params"]
    assert apla["trainable_ratio"] < full["trainable_ratio"] == 1.0
    for row in (full, apla):
        assert row["step_time_s"] > 0 and row["peak_memory_mb"] > 0 and "child" in row["memory_kind"]
    assert json.loads(out.read_text())["methods"]["apla"]["speed_ratio"] == apla["speed_ratio"]
    assert json.loads(out.read_text())["units"]["trainable_ratio"] == "fraction"
    table = format_ssa_report(result)
    assert "| SSA method | Trainable | Ratio (%) |" in table and "| apla |" in table and "Machine:" in table


def test_a_method_that_trains_nothing_in_the_backbone_is_refused_before_anything_runs(capsys):
    assert main(["bench-ssa", "--arch", "vit_tiny", "--methods", "linear_probe"]) == 2
    assert "trains nothing" in capsys.readouterr().err
