"""Small checkpoints in nnssl's exact format, for tests (no nnssl checkpoint can be downloaded here).

nnssl's trainer saves ``network_weights``, ``optimizer_state``, ``grad_scaler_state``, ``logging``, ``_best_ema``,
``current_epoch``, ``init_args`` (``plan``, ``configuration_name``, ``fold``, ``pretrain_json``, ``device``),
``trainer_name`` and ``nnssl_adaptation_plan`` (``AdaptationPlan.serialize()``). The networks are built the way
nnssl builds them, from dynamic_network_architectures' blocks: the MAE of a Primus (``EvaMAE``: ``down_projection``,
``eva``, ``up_projection``, a 2-block EVA ``decoder``, ``mask_token``) and the dynamic ResEnc U-Net (encoder and
decoder). Only the sizes are tiny; ``meta=True`` writes tensors without data (shape-only files of the real sizes).
"""
from __future__ import annotations

import torch
from torch import nn

SPACING = (2.5, 2.5, 2.5)


class EvaMAELike(nn.Module):
    """nnssl's ``EvaMAE`` module layout (its attributes, in its order) from dynamic_network_architectures' blocks."""

    def __init__(self, embed_dim: int, depth: int, heads: int, input_shape, patch_embed=(8, 8, 8)):
        super().__init__()
        from dynamic_network_architectures.building_blocks.eva import Eva
        from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchDecode, PatchEmbed
        grid = tuple(i // p for i, p in zip(input_shape, patch_embed))
        eva = dict(embed_dim=embed_dim, num_heads=heads, ref_feat_shape=grid, init_values=0.1, scale_attn_inner=True)
        self.down_projection = PatchEmbed(patch_embed, 1, embed_dim)
        self.eva = Eva(depth=depth, **eva)
        self.up_projection = PatchDecode(patch_embed, embed_dim, 1)
        self.decoder = Eva(depth=2, **eva)
        self.mask_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 1e-6)


def configuration_plan(patch, spacing=SPACING) -> dict:
    """nnssl's serialised ``ConfigurationPlan`` (the pre-training configuration)."""
    return {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
            "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_mask": "resample_data_or_seg_to_shape",
            "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "spacing": list(spacing) if spacing is not None else None, "patch_size": list(patch)}


def pretrain_plan(patch, spacing=SPACING) -> dict:
    """nnssl's serialised ``Plan`` with its one configuration."""
    return {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans", "original_median_spacing_after_transp":
            [1.0, 1.0, 1.0], "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": configuration_plan(patch, spacing)},
            "experiment_planner_used": "ExperimentPlanner"}


def adaptation_plan(arch: str, arch_kwargs, requiring_import, patch, recommended, encoder, stem, in_proj, lpe,
                    spacing=SPACING) -> dict:
    """nnssl's ``AdaptationPlan.serialize()``."""
    return {"architecture_plans": {"arch_class_name": arch, "arch_kwargs": arch_kwargs,
                                   "arch_kwargs_requiring_import": requiring_import},
            "pretrain_plan": pretrain_plan(patch, spacing), "pretrain_num_input_channels": 1,
            "recommended_downstream_patchsize": tuple(recommended), "key_to_encoder": encoder, "key_to_stem": stem,
            "keys_to_in_proj": tuple(in_proj), "key_to_lpe": lpe}


def _checkpoint(net: nn.Module, trainer: str, plan: dict, meta: bool) -> dict:
    if meta:
        weights = {k: torch.empty(v.shape, device="meta") for k, v in net.state_dict().items()}
        optimizer_state = {"state": {}, "param_groups": []}
    else:
        optimizer = torch.optim.AdamW(net.parameters(), 3e-4, weight_decay=5e-2, betas=(0.9, 0.98))
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        weights, optimizer_state = net.state_dict(), optimizer.state_dict()
    return {"network_weights": weights, "optimizer_state": optimizer_state, "grad_scaler_state": None,
            "logging": {"train_losses": [0.9, 0.7], "val_losses": [0.8, 0.6], "lrs": [3e-4, 3e-4],
                        "epoch_start_timestamps": [0.0, 1.0], "epoch_end_timestamps": [1.0, 2.0]},
            "_best_ema": 0.6, "current_epoch": 2,
            "init_args": {"plan": plan["pretrain_plan"], "configuration_name": "onemmiso", "fold": 0,
                          "pretrain_json": {"name": "OpenMind", "collection_index": 745}, "device": torch.device("cpu")},
            "trainer_name": trainer, "nnssl_adaptation_plan": plan,
            "citations": [{"type": "pre-training", "name": "test", "apa_citations": ["A test (2026)."]}]}


def primus_checkpoint(path, embed_dim: int = 192, depth: int = 4, heads: int = 4, patch=(32, 32, 32),
                      recommended=(32, 32, 32), preset: str | None = None, seed: int = 0, meta: bool = False,
                      spacing=SPACING):
    """An nnssl MAE checkpoint of a Primus (``BaseEvaMAETrainer``'s keys: ``eva``, ``down_projection``,
    ``eva.pos_embed``). ``preset`` (e.g. ``PrimusM``) names the architecture as nnssl does for Primus-M; without it
    the plan gives the sizes explicitly (the form nnU-Net master's ``PretrainedTrainer_Primusx`` reads).
    Returns ``(path, network)``."""
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        net = EvaMAELike(embed_dim, depth, heads, patch)
    kwargs = None if preset else {"embed_dim": embed_dim, "patch_embed_size": [8, 8, 8], "encoder_eva_depth": depth,
                                  "encoder_eva_numheads": heads, "scale_attn_inner": True, "init_values": 0.1}
    plan = adaptation_plan(preset or "PrimusX", kwargs, None, patch, recommended, "eva", "down_projection",
                           ("down_projection.proj",), "eva.pos_embed", spacing)
    torch.save(_checkpoint(net, "BaseEvaMAETrainer", plan, meta), path)
    return path, net


RESENC_TINY = dict(n_stages=3, features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3, 3]] * 3,
                   strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1],
                   conv_bias=True, norm_op_kwargs={"eps": 1e-05, "affine": True}, dropout_op=None,
                   dropout_op_kwargs=None, nonlin_kwargs={"inplace": True})


def resenc_checkpoint(path, preset: str | None = None, seed: int = 0, meta: bool = False, patch=(32, 32, 32)):
    """An nnssl MAE checkpoint of a residual-encoder U-Net (``BaseMAETrainer``'s keys: ``encoder.stages``,
    ``encoder.stem``). ``preset="ResEncL"``: the real ResEnc-L (use with ``meta=True``); else a tiny dynamic ResEnc
    with its ``DynamicArchitecturePlans`` arguments. Returns ``(path, network)``."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from nnunet_tpp.adopt_nnssl import RESENC_L
    kwargs = dict(RESENC_L["arch_kwargs"]) if preset else {
        **RESENC_TINY, "conv_op": "torch.nn.modules.conv.Conv3d", "norm_op":
            "torch.nn.modules.instancenorm.InstanceNorm3d", "nonlin": "torch.nn.modules.activation.LeakyReLU"}
    built = {**kwargs, "conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU, "dropout_op": None}
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        net = ResidualEncoderUNet(input_channels=1, num_classes=1, deep_supervision=False, **built)
    plan = adaptation_plan(preset or "ResidualEncoderUNet", None if preset else kwargs,
                           None if preset else ["conv_op", "norm_op", "nonlin"], patch, (160, 160, 160),
                           "encoder.stages", "encoder.stem",
                           ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"), None)
    torch.save(_checkpoint(net, "BaseMAETrainer", plan, meta), path)
    return path, net
