"""``nnunet-tpp bench --network primus``: full fine-tuning against the decoder-only probe, LoRA and Adapter on a
Primus, with the trainable counts of the network the trainers build, and a patch Primus cannot take refused before
measuring."""
import pytest

from nnunet_tpp.bench import BenchError, run_bench


def test_primus_rows_count_what_the_trainers_train(capsys):
    from nnunet_tpp import peft
    from nnunet_tpp.models.primus import bench_network
    result = run_bench(sizes=["192:4:4"], patch=(16, 16, 16), batch=1, steps=1, warmup=0, threads=1, rounds=1,
                       network="primus")
    rows = result["methods"]
    assert set(rows) == {"full", "linear_probe", "lora", "adapter"} and "Primus 192:4:4" in capsys.readouterr().out
    net = peft.apply(bench_network("192:4:4", (16, 16, 16), 1, 3), "linear_probe")
    summary = peft.trainable_summary(net)
    assert rows["full"]["trainable"] == rows["full"]["total"] == summary.total
    assert rows["linear_probe"]["trainable"] == summary.trainable == sum(
        p.numel() for n, p in net.named_parameters() if n.startswith("up_projection."))
    assert rows["linear_probe"]["step_time_s"] > 0 and rows["linear_probe"]["peak_memory_mib"] > 0
    for method in ("lora", "adapter"):  # LoRA on q and v, adapters after attention and MLP: the trainers' networks
        adapted = peft.trainable_summary(peft.apply(bench_network("192:4:4", (16, 16, 16), 1, 3), method))
        assert rows[method]["trainable"] == adapted.trainable and rows[method]["total"] == adapted.total


def test_a_patch_primus_cannot_take_is_refused():
    with pytest.raises(BenchError, match="divisible by \\(8, 8, 8\\)"):
        run_bench(sizes=["S"], patch=(20, 16, 16), network="primus")
