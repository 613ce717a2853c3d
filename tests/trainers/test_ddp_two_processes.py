"""The supervised PEFT step under DDP with two processes (gloo, CPU), through the trainer nnU-Net runs
(``ConvAdapterTrainer_S``: ``initialize`` builds STU-Net-S + Conv-Adapter + memory paths, wraps it in DDP and builds
nnU-Net's DDP loss; ``train_step`` is nnU-Net's): each rank takes half of the global batch, and the gradients the
optimiser receives on every rank equal those of one process that takes the whole batch; frozen weights stay
bit-identical and get no gradient; the trained weights stay identical across ranks."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_tpp import peft

WORLD_SIZE = 2
PATCH = [16, 16, 16]
CLASSES = 3
TRAINER = "ConvAdapterTrainer_S"


def _plans() -> dict:
    """nnU-Net plans for a one-channel dataset: 6 stages (STU-Net's 5 deep-supervision outputs), two poolings,
    a 16^3 patch, global batch 2 (one sample per rank), batch Dice (gathered over the ranks under DDP)."""
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    arch = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": strides, "n_conv_per_stage": [2] * 6,
            "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": WORLD_SIZE, "patch_size": PATCH, "median_image_size_in_voxels": PATCH,
              "spacing": [1.5, 1.5, 1.5], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "batch_dice": True,
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                            "nonlin"]}}
    return {"dataset_name": "Dataset901_DDP", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
            [1.5, 1.5, 1.5], "original_median_shape_after_transp": PATCH, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used":
            "ExperimentPlanner", "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
            "configurations": {"3d_fullres": config}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
                "file_ending": ".nii.gz"}


def _batch():
    """The global batch: images and nnU-Net's deep-supervision targets (labels at each output's resolution)."""
    gen = torch.Generator().manual_seed(7)
    data = torch.randn(WORLD_SIZE, 1, *PATCH, generator=gen)
    seg = torch.randint(0, CLASSES, (WORLD_SIZE, 1, *PATCH), generator=gen).float()
    scales = [1, 2, 4, 4, 4]  # resolutions of STU-Net's outputs under these strides, highest first
    target = [torch.nn.functional.interpolate(seg, scale_factor=1 / s, mode="nearest") if s > 1 else seg
              for s in scales]
    return data, target


def _run(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One process: the trainer nnU-Net would build, one ``train_step`` on this rank's part of the batch; writes the
    gradients the optimiser saw and the weights before and after."""
    os.environ.update(nnUNet_results=os.path.join(root, "results"),
                      nnUNet_preprocessed=os.path.join(root, "preprocessed"), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # oneDNN chooses other convolution algorithms for a batch of 1 than for a batch of 2: with it, the gradients of
    # the highest-resolution adapters differ by up to 4e-3 of their largest value between the DDP ranks and the
    # one-process run, while a one-process run that passes each sample through the network on its own matches DDP
    # to 1e-5 (measured). PyTorch's own kernels compute every sample alike whatever the batch.
    torch.backends.mkldnn.enabled = False
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from nnunet_tpp.trainers.zoo import TRAINERS
        torch.manual_seed(0)
        trainer = TRAINERS[TRAINER]({**_plans(), "continue_training": False}, "3d_fullres", 0, DATASET_JSON,
                                    torch.device("cpu"))
        trainer.initialize()
        net = peft.unwrap(trainer.network)
        names = {id(p): n for n, p in net.named_parameters()}
        seen = {}
        trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update(
            {names[id(p)]: p.grad.clone() for group in opt.param_groups for p in group["params"]
             if p.grad is not None}))
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        data, target = _batch()
        part = slice(rank, rank + 1) if world_size > 1 else slice(None)
        trainer.train_step({"data": data[part], "target": [t[part] for t in target]})
        torch.save({"ddp": isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel),
                    "device": str(trainer.device), "batch_size": trainer.batch_size, "grads": seen,
                    "frozen": [n for n, p in net.named_parameters() if not p.requires_grad],
                    "frozen_grads": [n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None],
                    "before": before, "after": {n: p.detach().clone() for n, p in net.named_parameters()}},
                   os.path.join(out, f"rank{rank}_of_{world_size}.pt"))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process DDP run and the one-process run of the whole batch (each in fresh processes)."""
    root = tmp_path_factory.mktemp("ddp")
    folder = root / "preprocessed" / _plans()["dataset_name"]
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    nnUNetDatasetBlosc2.save_case(np.zeros((1, *PATCH), np.float32), np.zeros((1, *PATCH), np.int8),
                                  {"spacing": [1.5] * 3}, str(folder / "nnUNetPlans_3d_fullres" / "case_000"))
    out = root / "out"
    out.mkdir()
    for world_size in (WORLD_SIZE, 1):
        mp.spawn(_run, args=(world_size, _free_port(), str(root), str(out)), nprocs=world_size, join=True)
    return {name: torch.load(out / f"{name}.pt", weights_only=True)
            for name in ("rank0_of_2", "rank1_of_2", "rank0_of_1")}


def test_the_ranks_train_under_ddp_on_their_half_of_the_batch(runs):
    for rank in ("rank0_of_2", "rank1_of_2"):
        assert runs[rank]["ddp"] and runs[rank]["device"] == "cpu" and runs[rank]["batch_size"] == 1
    single = runs["rank0_of_1"]
    assert not single["ddp"] and single["batch_size"] == WORLD_SIZE


def test_ddp_gradients_of_the_target_parameters_equal_the_whole_batch_gradient(runs):
    """Each rank's optimiser gets the gradient of the whole batch (DDP's average of the ranks' gradients; nnU-Net's
    batch Dice is gathered over the ranks). One nnU-Net detail: under DDP without compile nnU-Net weights the
    lowest deep-supervision output by 1e-6 instead of 0, so that head gets a gradient ~1e-6 of the others' under
    DDP and none in one process. Measured: the largest difference is 8e-6 of a tensor's largest value."""
    single = runs["rank0_of_1"]["grads"]
    assert single and all("adapter" in n or n.startswith("seg_outputs") for n in single)
    largest = max(float(g.abs().max()) for g in single.values())
    for rank in ("rank0_of_2", "rank1_of_2"):
        ddp = runs[rank]["grads"]
        assert set(single) <= set(ddp) and all(n.startswith("seg_outputs") for n in set(ddp) - set(single))
        for name, g in ddp.items():
            if name not in single:
                assert g.abs().max() <= 1e-5 * largest, name
                continue
            expected = single[name]
            assert expected.abs().max() > 0, name
            assert (g - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-6 * largest, name
    for name, g in runs["rank0_of_2"]["grads"].items():  # DDP averaged: the ranks hold the same gradient
        assert torch.equal(g, runs["rank1_of_2"]["grads"][name]), name


def test_frozen_weights_are_untouched_and_trained_weights_agree_across_ranks(runs):
    ranks = [runs["rank0_of_2"], runs["rank1_of_2"]]
    for run in ranks + [runs["rank0_of_1"]]:
        assert run["frozen_grads"] == [] and len(run["frozen"]) > 50 and not set(run["frozen"]) & set(run["grads"])
        for name in run["frozen"]:
            assert torch.equal(run["after"][name], run["before"][name]), name
        assert all(not torch.equal(run["after"][n], run["before"][n]) for n in run["grads"] if run["grads"][n].any())
    for name in ranks[0]["after"]:
        assert torch.equal(ranks[0]["before"][name], ranks[1]["before"][name]), name
        assert torch.equal(ranks[0]["after"][name], ranks[1]["after"][name]), name
