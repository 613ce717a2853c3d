"""A 2-D run that fails when training does nothing: ``train2d`` with LoRA on real chest X-rays (PneumoniaMNIST,
balanced 400 / 100 / 400 images) must beat the untrained model it started from by a margin, with its target
parameters (the LoRA factors) moved.

Measured (``vit_tiny`` 64 wide x 4 blocks, patch 4, 28 px, LoRA q/v rank 8, 6 epochs, batch 32, lr 1e-3): seed 0
(the test's) 0.628 after training against 0.500 untrained (the random head puts every image in one class); seeds 1
and 2 gave 0.610 and 0.628 against about 0.51 and 0.50. With lr 0 (``learning_run(tmp_path, lr=0.0)``) the run
ends at 0.500 with every ``lora_B`` still zero, so both checks below fail. The margin asked for, 0.05, is half the
smallest gain measured (0.10).

The untrained model is the bar, not the head-only model: on a randomly initialised backbone a linear probe already
reaches 0.620 / 0.640 / 0.648 and LoRA adds nothing measurable (adapter 0.615 / 0.645 / 0.663, full fine-tuning 0.66
at seed 0), so a head-only bar would need a pre-trained backbone, which only LiteMedSAM is, and a LiteMedSAM run is
minutes per epoch on two CPU cores (its PH2 numbers are in the README).
"""
import torch

from nnunet_tpp import peft
from nnunet_tpp.vision2d.config import Train2dConfig
from nnunet_tpp.vision2d.data import load_dataset
from nnunet_tpp.vision2d.train import build_backbone, build_model, evaluate, run_train2d
from tests.conftest import balanced_pneumonia_subset

MARGIN = 0.05


def learning_run(tmp_path, lr: float | None = None, seed: int = 0) -> tuple[float, float, bool]:
    """``(untrained accuracy, trained accuracy, target parameters moved)`` of one LoRA run."""
    data = balanced_pneumonia_subset(tmp_path / "pneumonia.npz", {"train": 400, "val": 100, "test": 400})
    cfg = Train2dConfig(task="cls", data=data, out=tmp_path / "run", arch="vit_tiny", img_size=28, patch_size=4,
                        arch_options={"depth": 4, "embed_dim": 64, "num_heads": 2}, method="lora", epochs=6,
                        batch_size=32, seed=seed, device="cpu", warmup_epochs=0.5, lr=lr)
    torch.manual_seed(seed)  # the run's own start, drawn as run_train2d draws it
    splits = load_dataset(data, "cls", cfg.img_size, seed=seed)
    start = build_model(cfg, build_backbone(cfg, splits.in_chans, log=lambda _: None), splits.num_classes,
                        log=lambda _: None)
    untrained = evaluate(start, splits.test, "cls", splits.num_classes, torch.device("cpu"), 64)["acc"]
    initial = {n: p.detach().clone() for n, p in peft.target_parameters(start).items()}
    metrics = run_train2d(cfg, log=lambda _: None, progress=False)
    trained = torch.load(cfg.out / "adapter.pth", weights_only=True)["state_dict"]
    moved = all(not torch.equal(trained[n], initial[n]) for n in initial if ".lora_B." in n)
    return untrained, metrics["acc"], moved


def test_lora_training_beats_the_untrained_model(tmp_path):
    untrained, trained, moved = learning_run(tmp_path)
    assert moved, "the LoRA factors did not move"
    assert trained >= untrained + MARGIN, (untrained, trained)
