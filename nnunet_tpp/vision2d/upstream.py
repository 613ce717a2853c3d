"""Upstream MAE pre-training of a whole ViT from random initialisation (He et al., MAE), for 2D benchmark
suites without a published backbone: every parameter of the encoder and an MAE decoder trains on a dataset's
training images, and the result is written as an MAE pre-training checkpoint by
:func:`~nnunet_tpp.models.vit_checkpoint.save_vit_checkpoint` (``{"model": {encoder keys in timm layout,
decoder_*, mask_token}, "vit_config": ...}``; the settings and the loss curve go to ``<file>.json``).
``train2d`` reads it as a backbone (``backbone_format: auto`` or ``timm``) and 2D TPP with the MAE pretext
inherits its decoder.

Recipe as MAE: AdamW (betas 0.9/0.95, weight decay 0.05 except on norms, biases, tokens and position
embeddings: :func:`~nnunet_tpp.pretext.optim.weight_decay_groups`), lr = base_lr * batch_size / 256 with base_lr 1.5e-4, linear warm-up then cosine decay,
mask ratio 0.75, normalised-pixel loss, random-resized-crop (scale 0.2-1) + horizontal-flip augmentation.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from nnunet_tpp.pretext.crops2d import random_resized_crop

RESUME_SUFFIX = ".resume.pth"


def _atomic_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def pretrain_mae_upstream(data: str | Path, out_file: str | Path, arch: str = "vit_tiny", img_size: int = 32,
                          patch_size: int | None = 4, in_chans: int | None = None, epochs: int = 20,
                          batch_size: int = 128, seed: int = 0, device: str = "auto",
                          log: Callable[[str], None] = print, *, task: str | None = None,
                          arch_options: dict | None = None, mask_ratio: float = 0.75, base_lr: float = 1.5e-4,
                          weight_decay: float = 0.05, warmup_epochs: float | None = None,
                          norm_pix_loss: bool = True, decoder_embed_dim: int = 128, decoder_depth: int = 2,
                          decoder_num_heads: int = 4, progress: bool = True) -> Path:
    """MAE pre-training of a randomly initialised ViT (all parameters) plus an MAE decoder.

    Args:
        data: a dataset of :mod:`nnunet_tpp.vision2d.data`; its training split's images are used (labels ignored).
        out_file: the checkpoint to write; when it exists with the same settings nothing is trained again
            (other settings: an error). ``<out_file>.resume.pth`` after every epoch lets a killed run resume.
        arch, img_size, patch_size, in_chans, arch_options: the ViT (in_chans None: the data's channels).
        epochs, batch_size, seed, device: the schedule.
        log: where progress lines go.
        task: how to read ``data`` (``cls`` or ``seg``); None: ``seg`` for an image + mask folder, else ``cls``.
        mask_ratio, norm_pix_loss: the MAE objective.
        base_lr, weight_decay, warmup_epochs: AdamW, lr = base_lr * batch_size / 256; warm-up None: 5% of the
            epochs (at least one).
        decoder_embed_dim, decoder_depth, decoder_num_heads: the MAE decoder (MAE's ViT-B: 512, 8, 16).
        progress: a progress bar per epoch.
    Returns:
        ``out_file``.
    """
    from tqdm import tqdm

    from nnunet_tpp import peft
    from nnunet_tpp.models.vit import build_vit
    from nnunet_tpp.models.vit_checkpoint import save_vit_checkpoint
    from nnunet_tpp.pretext.dino import cosine_schedule
    from nnunet_tpp.pretext.mae import MAEDecoder, mae_loss, random_masking
    from nnunet_tpp.pretext.optim import weight_decay_groups
    from nnunet_tpp.vision2d.data import load_dataset, make_loader
    from nnunet_tpp.vision2d.checks import resolve_device

    out_file = Path(out_file)
    data = Path(data)
    if task is None:
        from nnunet_tpp.vision2d.data import detect_layout
        task = "seg" if detect_layout(data) == "image_mask" else "cls"
    settings = {"data": str(data), "arch": arch, "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans,
                "arch_options": dict(arch_options or {}), "epochs": epochs, "batch_size": batch_size, "seed": seed,
                "task": task, "mask_ratio": mask_ratio, "base_lr": base_lr, "weight_decay": weight_decay,
                "warmup_epochs": warmup_epochs, "norm_pix_loss": norm_pix_loss,
                "decoder": [decoder_embed_dim, decoder_depth, decoder_num_heads]}
    sidecar = out_file.with_name(out_file.name + ".json")
    if out_file.exists():
        saved = json.loads(sidecar.read_text()).get("settings") if sidecar.exists() else None
        if saved is not None and saved != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings))[k])
            raise ValueError(f"{out_file} was pre-trained with other settings ({', '.join(changed)}); delete it "
                             f"(and {sidecar.name}) to pre-train again, or choose another folder")
        log(f"upstream MAE checkpoint {out_file} exists: not trained again")
        return out_file
    dev = resolve_device(device)
    torch.manual_seed(seed)
    splits = load_dataset(data, task, img_size, in_chans=in_chans, seed=seed, augment=False)
    images = splits.train
    overrides = dict(arch_options or {})
    if patch_size:
        overrides["patch_size"] = patch_size
    encoder = build_vit(arch, img_size=img_size, in_chans=splits.in_chans, **overrides)
    cfg = encoder.config
    decoder = MAEDecoder(cfg.embed_dim, cfg.grid ** 2, cfg.patch_size, cfg.in_chans, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, num_prefix_tokens=encoder.num_prefix_tokens)
    encoder.to(dev), decoder.to(dev)
    lr = base_lr * batch_size / 256
    named = [*encoder.named_parameters(), *decoder.named_parameters(prefix="decoder")]
    optimizer = torch.optim.AdamW(weight_decay_groups(named, weight_decay), lr=lr, betas=(0.9, 0.95))
    loader = make_loader(images, batch_size, shuffle=True, seed=seed)
    steps = len(loader)
    warmup = warmup_epochs if warmup_epochs is not None else max(1.0, 0.05 * epochs)
    lrs = cosine_schedule(lr, 0.0, epochs * steps, int(round(warmup * steps)))
    resume = out_file.with_name(out_file.name + RESUME_SUFFIX)
    start, losses, seconds, seen = 0, [], 0.0, 0
    if resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if state["settings"] == json.loads(json.dumps(settings)):
            encoder.load_state_dict(state["encoder"]), decoder.load_state_dict(state["decoder"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses, seconds, seen = state["epoch"], state["losses"], state["seconds"], state["images"]
            log(f"upstream MAE: resuming after epoch {start} from {resume}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"upstream MAE pre-training: {arch} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M "
        f"parameters, {img_size}px, patch {cfg.patch_size}, {cfg.in_chans} channel(s)) on {len(images)} images of "
        f"{data}, {epochs} epochs, batch {batch_size}, lr {lr:.2e}, mask ratio {mask_ratio}, on {dev}")
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(start, epochs):
        torch.manual_seed(seed * 1000 + epoch)
        encoder.train(), decoder.train()
        total, count, started = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"upstream MAE epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i, (batch, _) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lrs[epoch * steps + i]
            batch = random_resized_crop(batch, generator=generator).to(dev, non_blocking=True)
            keep, mask, restore = random_masking(batch.shape[0], cfg.grid ** 2, mask_ratio, batch.device)
            latent = encoder.forward_features(batch, keep=keep)[0]
            loss = mae_loss(batch, decoder(latent, restore), mask, cfg.patch_size, norm_pix_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * batch.shape[0], count + batch.shape[0]
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - started
        seen += count
        losses.append(total / max(count, 1))
        log(f"upstream MAE epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} "
            f"lr {lrs[min((epoch + 1) * steps, len(lrs)) - 1]:.2e} {seen / max(seconds, 1e-9):.1f} img/s")
        peft.atomic_torch_save({"settings": json.loads(json.dumps(settings)), "encoder": encoder.state_dict(),
                                "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                                "epoch": epoch + 1, "losses": losses, "seconds": seconds, "images": seen}, resume)
    save_vit_checkpoint(encoder, out_file, extra=decoder.state_dict(), pretraining="mae")
    _atomic_json({"settings": settings, "losses": losses, "seconds": seconds,
                  "train_images": len(images)}, sidecar)
    resume.unlink(missing_ok=True)
    log(f"upstream MAE checkpoint written: {out_file} (final loss {losses[-1] if losses else float('nan'):.4f}, "
        f"{seconds:.0f} s)")
    return out_file
