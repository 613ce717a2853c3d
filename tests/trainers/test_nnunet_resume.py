"""A fine-tuning run killed mid-epoch and continued with ``nnUNetv2_train ... --c`` ends with exactly the weights,
optimiser state and losses of the same run left uninterrupted (CPU, bit for bit), on real MRI (LA 2018).

What makes it exact: ``NNUNET_TPP_SEED`` seeds the initialisation and every epoch from (seed, epoch)
(:mod:`nnunet_tpp.trainers.seeding`), and ``nnUNet_n_proc_DA=0`` draws nnU-Net's batches in the training process.
With nnU-Net's default worker processes the batches come from workers that seed themselves from the operating
system and prefetch across epochs: then not even two uninterrupted runs agree (nnU-Net's checkpoint holds no
random-number state), which the trainer says in its log.
"""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from nnunet_tpp.models.stunet_checkpoint import read_checkpoint
from nnunet_tpp.nnunet_commands import run_nnunet
from tests.conftest import LA_DATASET, write_v1_checkpoint

pytestmark = pytest.mark.e2e
TRAINER = "ConvAdapterTrainer_S"
EPOCHS, ITERS, KILL_AFTER = 3, 2, 3  # killed after the first step of epoch 1; --c goes on from the end of epoch 0

# nnUNetv2_train with two test-only changes, made in this process only: nnU-Net's checkpoint_latest.pth is written
# after every epoch (nnU-Net's save_every, default 50), and the process kills itself with SIGKILL (no clean-up, as
# an out-of-memory kill or a cluster's time limit) right after training step KILL_AFTER.
KILLED_RUN = """
import os, signal, sys
from nnunet_tpp.trainers.base import PeftTrainer
kill_after, steps = int(sys.argv[1]), [0]
on_train_start, train_step = PeftTrainer.on_train_start, PeftTrainer.train_step
def start_saving_every_epoch(self):
    self.save_every = 1
    on_train_start(self)
def train_step_then_die(self, batch):
    out = train_step(self, batch)
    steps[0] += 1
    if steps[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
PeftTrainer.on_train_start, PeftTrainer.train_step = start_saving_every_epoch, train_step_then_die
from nnunetv2.run.run_training import run_training_entry
sys.argv = ["nnUNetv2_train", *sys.argv[2:]]
run_training_entry()
"""

LOGGED = ("train_losses", "val_losses", "lrs", "mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region")


def _equal(a, b) -> bool:
    """Bitwise equality of nested checkpoint values (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _fold(results) -> object:
    return results / f"Dataset{LA_DATASET}_LA" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_all"


def test_a_killed_run_continued_with_c_reaches_the_uninterrupted_run_bit_for_bit(la_nnunet, tmp_path):
    la = la_nnunet
    ckpt = tmp_path / "STUNet_S.model"
    write_v1_checkpoint(ckpt)
    schedule = dict(NNUNET_TPP_SEED="7", nnUNet_n_proc_DA="0", NNUNET_TPP_EPOCHS=str(EPOCHS),
                    NNUNET_TPP_ITERS_PER_EPOCH=str(ITERS), NNUNET_TPP_VAL_ITERS_PER_EPOCH="1",
                    NNUNET_TPP_SKIP_VALIDATION="1")
    train = [LA_DATASET, "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"]
    quiet = lambda _: None  # noqa: E731

    whole_env = la.results_env(tmp_path / "whole", **schedule)
    run_nnunet(["nnUNetv2_train", *train, "-pretrained_weights", ckpt], whole_env, la.log, quiet)
    whole = read_checkpoint(str(_fold(tmp_path / "whole") / "checkpoint_final.pth"))

    killed_env = la.results_env(tmp_path / "killed", **schedule)
    fold = _fold(tmp_path / "killed")
    with open(la.log, "a") as log:
        done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(KILL_AFTER), *map(str, train),
                               "-pretrained_weights", str(ckpt)], env=killed_env, stdout=log, stderr=subprocess.STDOUT)
    assert done.returncode == -signal.SIGKILL
    assert not (fold / "checkpoint_final.pth").exists()
    latest = read_checkpoint(str(fold / "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 1  # epoch 0 was saved; epoch 1 was under way
    assert not _equal(latest["network_weights"], whole["network_weights"])  # (so the comparison below can fail)

    run_nnunet(["nnUNetv2_train", *train, "--c"], killed_env, la.log, quiet)
    resumed = read_checkpoint(str(fold / "checkpoint_final.pth"))
    assert resumed["current_epoch"] == whole["current_epoch"] == EPOCHS
    assert resumed["network_weights"].keys() == whole["network_weights"].keys()
    different = [k for k, v in whole["network_weights"].items() if not _equal(resumed["network_weights"][k], v)]
    assert different == []
    assert _equal(resumed["optimizer_state"], whole["optimizer_state"])  # SGD momentum buffers too
    for key in LOGGED:  # the losses of the epochs the resumed run trained, and those it read from the checkpoint
        assert _equal(resumed["logging"][key], whole["logging"][key]), key
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "NNUNET_TPP_SEED=7: initialisation and every epoch seeded" in text and "worker process" not in text
