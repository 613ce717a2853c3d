"""Writes the ViT parity fixtures with the hand-written ViT of nnunet_tpp before timm replaced it (run once at the
commit that added this script; kept in the history only). Each fixture: a tiny config, a checkpoint file's content
as its owner writes it, a fixed input and the outputs of the old model loaded from it."""
from __future__ import annotations

import dataclasses
import io
import sys
import tempfile
from pathlib import Path

import torch

from nnunet_tpp import peft
from nnunet_tpp.models.vit import build_vit, vit_config
from nnunet_tpp.models.vit_checkpoint import load_vit_checkpoint, mae_decoder_state_dict, medcoss_config
from nnunet_tpp.models.vit_heads import ViTClassifier, ViTSegmenter
from nnunet_tpp.pretext.mae import MAEDecoder
from nnunet_tpp.pretext.stage import save_target_parameters

OUT = Path(__file__).resolve().parent
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2)


def source(seed: int, **overrides):
    torch.manual_seed(seed)
    model = build_vit("vit_tiny", **{**TINY, **overrides})
    with torch.no_grad():  # every tensor away from its initial value, so that a missed key shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def image(seed: int, size: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(model, x: torch.Tensor) -> dict:
    """Final tokens, tapped blocks 1 and 3, MAE-style kept patches, iBOT-style masked patches."""
    model.eval()
    grid = model.grid_for(x)
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(5)
    keep = torch.stack([torch.randperm(n, generator=g)[: n // 4] for _ in range(x.shape[0])])
    masked = torch.zeros(x.shape[0], n, dtype=torch.bool)
    masked[:, 1:n:3] = True
    mask_token = torch.randn(1, 1, model.embed_dim, generator=g)
    with torch.no_grad():
        tokens, tapped = model.forward_features(x, taps=(1, 3))
        kept = model.forward_features(x, keep=keep)[0]
        hidden = model.forward_features(x, masked=masked, mask_token=mask_token)[0]
    return {"input": x, "tokens": tokens, "tapped": tapped, "keep": keep, "kept_tokens": kept, "masked": masked,
            "mask_token": mask_token, "masked_tokens": hidden}


def load_case(file: dict, fmt: str, cfg, x: torch.Tensor, **load_args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pth"
        torch.save(file, path)
        torch.manual_seed(123)
        model = build_vit(cfg)
        report = load_vit_checkpoint(model, path, fmt=fmt, **load_args)
    return {"config": dataclasses.asdict(cfg), "fmt": fmt, "load_args": load_args,
            "pretraining": model.pretraining, "resampling": report.resampling, **outputs(model, x)}


def plain_timm(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def timm_fixture() -> dict:
    src = source(1)
    file = {**plain_timm(src), "head.weight": torch.randn(5, 32), "head.bias": torch.randn(5)}
    cases = [load_case(file, "timm", vit_config("vit_tiny", **TINY), image(2)),
             load_case(file, "timm", vit_config("vit_tiny", **{**TINY, "img_size": 24}), image(3, 24))]
    return {"kind": "timm (supervised checkpoint, head skipped)", "file": file, "cases": cases}


def mae_fixture() -> dict:
    src = source(11)
    torch.manual_seed(12)
    decoder = MAEDecoder(32, 16, 4, 3, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    file = {"model": {**plain_timm(src), **decoder.state_dict()}, "epoch": 399}
    cases = [load_case(file, "mae", vit_config("vit_tiny", **TINY), image(13)),
             load_case(file, "auto", vit_config("vit_tiny", **{**TINY, "img_size": 24}), image(14, 24))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mae.pth"
        torch.save(file, path)
        state = mae_decoder_state_dict(path)
    rebuilt = MAEDecoder.from_state_dict(state, 16, 4, 3, num_prefix_tokens=1, num_heads=2).eval()
    latent = torch.randn(2, 1 + 4, 32, generator=torch.Generator().manual_seed(15))
    restore = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(16 + i)) for i in range(2)])
    with torch.no_grad():
        prediction = rebuilt(latent, restore)
    return {"kind": "MAE pre-training checkpoint (model: encoder + decoder_* + mask_token)", "file": file,
            "cases": cases, "decoder": {"num_heads": 2, "latent": latent, "restore": restore,
                                        "prediction": prediction}}


def dino_fixture() -> dict:
    src = source(21)
    teacher = {f"backbone.{k}": v for k, v in plain_timm(src).items()}
    teacher.update({"head.mlp.0.weight": torch.randn(8, 32), "head.last_layer.weight_g": torch.randn(16, 1)})
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}
    file = {"teacher": teacher, "student": student, "epoch": 100}
    cases = [load_case(file, "dino", vit_config("vit_tiny", **TINY), image(22)),
             load_case(file, "auto", vit_config("vit_tiny", **{**TINY, "img_size": 24}), image(23, 24))]
    return {"kind": "DINO training checkpoint (teacher / student, backbone. prefix)", "file": file, "cases": cases}


def dinov2_fixture() -> dict:
    src = source(31, num_register_tokens=2, layer_scale=1e-5)
    state = plain_timm(src)
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.randn(1, 32)
    chunked = {}
    for key, value in state.items():  # block_chunks=2: blocks.<chunk>.<i>
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}." + key.split(".", 2)[2]
        chunked[key] = value
    cfg = vit_config("vit_tiny", **TINY, num_register_tokens=2, layer_scale=1e-5)
    cases = [load_case(state, "dinov2", cfg, image(32)),
             load_case(state, "auto", dataclasses.replace(cfg, img_size=24), image(33, 24))]
    chunked_case = load_case(chunked, "auto", cfg, image(32))
    return {"kind": "DINOv2 hub checkpoint with registers and layer scale (and its chunked training layout)",
            "file": state, "chunked_file": chunked, "cases": cases, "chunked_case": chunked_case}


def medcoss_fixture() -> dict:
    cfg = medcoss_config(**{k: v for k, v in TINY.items()})
    src = source(41, **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in TINY})
    ours = plain_timm(src)
    file_state = {"cls_token": ours["cls_token"],
                  "video_embed.embeddings.weight": ours["patch_embed.proj.weight"],
                  "video_embed.embeddings.bias": ours["patch_embed.proj.bias"],
                  "video_embed.embeddings_norm.weight": ours["norm_pre.weight"],
                  "video_embed.embeddings_norm.bias": ours["norm_pre.bias"]}
    g = torch.Generator().manual_seed(42)
    spatial = torch.randn(64, 32, generator=g) * 0.1  # a table of input_size_2D (32 px / 4 = 8x8) rows
    temporal = torch.randn(8, 32, generator=g) * 0.1
    file_state["video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight"] = spatial
    file_state["video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight"] = temporal
    names = {"norm1": "norm1", "norm2": "norm2", "attn.qkv.weight": "self_attn.in_proj_weight",
             "attn.qkv.bias": "self_attn.in_proj_bias", "attn.proj": "self_attn.out_proj",
             "mlp.fc1": "linear1", "mlp.fc2": "linear2", "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}
    for key, value in ours.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            for a, b in names.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            file_state[f"fused_encoder.layers.{i}.{rest}"] = value
    file_state["decoder_embed.weight"] = torch.randn(16, 32, generator=g)
    file_state["mask_token"] = torch.randn(1, 1, 16, generator=g)
    file = {"model": file_state, "epoch": 300}
    # the pre-training grid: 16 px / 4 = 4x4 (the first 16 rows of the table)
    cases = [load_case(file, "medcoss", cfg, image(43), medcoss_grid=4),
             load_case(file, "auto", dataclasses.replace(cfg, img_size=24), image(44, 24), medcoss_grid=4)]
    return {"kind": "MedCoSS checkpoint (model: fused_encoder / video_embed layout), grid 4", "file": file,
            "cases": cases}


METHODS = {"vpt": {"length": 3}, "ssf": {}, "adapter": {}, "adaptformer": {}, "lora": {},
           "lora_linears": {"targets": ["fc1", "proj", "k"]}, "evp": {"scale_factor": 4}, "dtl": {},
           "apla": {"rows": 4, "seed": 3}, "partial": {"quarter": 2}, "bitfit": {}, "linear_probe": {}, "full": {}}


def methods_fixture() -> dict:
    """Adapter files (peft.save) and target-parameter files of every ViT method on a classifier (and on a
    segmenter for lora and vpt), with the outputs of the model they came from."""
    backbone = plain_timm(source(51))
    x = image(52)
    cases = []
    for key, options in METHODS.items():
        method = key.split("_")[0] if key.startswith("lora") else key
        for task in ("cls", "seg") if key in ("lora", "vpt", "adapter") else ("cls",):
            torch.manual_seed(53)
            vit = build_vit("vit_tiny", **TINY)
            vit.load_state_dict(backbone)
            net = ViTClassifier(vit, 3) if task == "cls" else ViTSegmenter(vit, 2, feature_size=4)
            peft.apply(net, method, **options)
            with torch.no_grad():
                g = torch.Generator().manual_seed(54)
                for name in peft.trained_parameter_names(net):
                    p = dict(net.named_parameters())[name]
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
            net.eval()
            with torch.no_grad():
                out = net(x)
            with tempfile.TemporaryDirectory() as tmp:
                peft.save(net, Path(tmp) / "adapter.pth")
                adapter_file = torch.load(Path(tmp) / "adapter.pth", weights_only=True)
                target_file = None
                if peft.target_parameters(net):
                    save_target_parameters(net, str(Path(tmp) / "target.pth"))
                    target_file = torch.load(Path(tmp) / "target.pth", weights_only=True)
                merged = None
                if peft.get_method(method).mergeable:
                    with torch.no_grad():
                        merged = peft.merge(net)(x)
            cases.append({"key": key, "method": method, "options": options, "task": task, "output": out,
                          "merged_output": merged, "adapter_file": adapter_file, "target_file": target_file,
                          "head_classes": 3 if task == "cls" else 2})
    return {"kind": "adapter / target-parameter files of every ViT method (keys of the hand-written ViT)",
            "backbone": backbone, "config": TINY, "input": x, "cases": cases}


def main() -> int:
    for name, make in (("timm", timm_fixture), ("mae", mae_fixture), ("dino", dino_fixture),
                       ("dinov2", dinov2_fixture), ("medcoss", medcoss_fixture), ("methods", methods_fixture)):
        payload = make()
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        (OUT / f"{name}.pt").write_bytes(buffer.getvalue())
        print(name, len(buffer.getvalue()) // 1024, "KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
