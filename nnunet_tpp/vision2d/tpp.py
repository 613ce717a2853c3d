"""Target parameter pre-training (TPP) for ViTs: before supervised fine-tuning, only the PEFT method's
target parameters (and a pretext head) train on images with MAE or DINO, the backbone frozen; fine-tuning
then starts from exactly the result. The 3-D stage (:mod:`nnunet_tpp.pretext.stage`) shares the DINO
objective, the target-parameter file format and its identity check.

Settings (``tpp_options`` of a run; defaults from the TPP paper, DESIGN.md):

* MAE: mask ratio 0.75, normalised-pixel MSE, AdamW lr 1.5e-3, weight decay 1.5e-2, batch 64, warm-up
  (the paper's 40 epochs of a long schedule: here 10% of ``tpp_epochs``) then cosine. Weight decay as MAE's
  ``add_weight_decay`` (timm's, as ``main_pretrain.py`` calls it): biases and one-dimensional parameters
  (norms) are exempt, every other trained tensor decays (:func:`~nnunet_tpp.pretext.optim.weight_decay_groups`
  with no name exemptions). The decoder of a MAE
  pre-training checkpoint given as ``backbone`` is inherited: frozen for classification, trained for
  segmentation (the paper's Table 11); without one a new decoder (width 128, depth 2) trains.
* DINO: lr 1e-4 * batch / 256, 10 warm-up epochs (at most half the stage), cosine; weight decay
  0.04 -> 0.4 (none on biases and 1-D parameters); teacher temperature 0.04 -> 0.07; teacher momentum
  0.996 -> 1; 2 global crops at the image size and 4 local crops at half of it (a multiple of the patch); the class
  token feeds the DINO head. On LiteMedSAM's encoder (a fixed 256 x 256 input, no class token) the local crops are
  resampled to 256 as well and the mean of the encoder's feature map feeds the head; MAE needs a ViT. The training
  loop is the 3-D stage's (:func:`~nnunet_tpp.pretext.stage.run_dino_stage`: teacher in eval mode, prototypes frozen
  in the first epoch, one head call over all views with running input statistics per view size, the teacher's
  target parameters as the result, ``tpp_diagnostics.json``).
* SimMIM (LiteMedSAM's encoder only: a hierarchical encoder with a convolutional stem, where MAE's dropping of
  patches does not apply; :mod:`nnunet_tpp.pretext.simmim`): SimMIM's 32-pixel masks at ratio 0.6, a mask token on
  the patch embedding's output, a 1 x 1 convolution + pixel shuffle decoder, L1 on the masked pixels; SimMIM's AdamW
  (betas 0.9 / 0.999, weight decay 0.05, none on biases, 1-D parameters and the mask token). Departure, an option:
  the peak learning rate is the TPP stage's 1.5e-3 (as MAE's here) instead of SimMIM's 8e-4 per 512 images, which
  would not move a batch of a few images; batch 64 (at most the images), 10 % warm-up, cosine.

Files in ``work_dir``: ``tpp_target_parameters.pth`` (the result; when present the stage is not run
again), ``tpp_state.pth`` (after every epoch, atomically: a killed stage resumes, on the CPU to the uninterrupted
stage's weights bit for bit: MAE's batches and masks and DINO's crops are drawn from the seed and the epoch or
step alone), ``tpp_progress.png``,
``tpp_diagnostics.json`` (DINO: the collapse diagnostics per epoch).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.dino import DINOConfig, cosine_schedule
from nnunet_tpp.pretext.crops2d import random_views, view_sizes
from nnunet_tpp.pretext.mae import MAEDecoder, mae_loss, random_masking
from nnunet_tpp.pretext.optim import weight_decay_groups
from nnunet_tpp.pretext.stage import (PretextSchedule, plot_losses, read_state, run_dino_stage,
                                      save_target_parameters)

RESULT_FILE = "tpp_target_parameters.pth"
STATE_FILE = "tpp_state.pth"


@dataclass
class MAESettings:
    """MAE pretext settings (see the module docstring)."""

    mask_ratio: float = 0.75
    norm_pix: bool = True
    lr: float = 1.5e-3
    weight_decay: float = 1.5e-2
    batch_size: int = 64
    warmup_fraction: float = 0.1
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    inherit_decoder: bool = True


@dataclass
class SimMIMSettings:
    """SimMIM pretext settings for LiteMedSAM's encoder (see the module docstring)."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_fraction: float = 0.1


@dataclass
class DINO2dSettings:
    """DINO pretext settings for ViTs (the recipe itself is :class:`DINOConfig`)."""

    batch_size: int = 64
    local_crops: int = 4
    local_fraction: float = 0.5
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    out_dim: int = 4096
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    base_lr: float = 1e-4
    warmup_epochs: int = 10
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    grad_clip: float = 3.0


def settings_for(kind: str, options: dict[str, Any]):
    """The settings dataclass of ``kind`` (``mae`` / ``simmim`` / ``dino``) with ``options`` applied; unknown keys
    raise."""
    cls = {"mae": MAESettings, "simmim": SimMIMSettings}.get(kind, DINO2dSettings)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown tpp_options {unknown} for {kind}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(getattr(cls, k, None), tuple) else v for k, v in options.items()}
    return cls(**values)


def pretext_images(cfg, in_chans: int, train_set):
    """The images the stage trains on: ``train_set``, or from ``cfg.tpp_data``: every image of a plain folder of
    images, else the training split of the dataset there."""
    if cfg.tpp_data is None:
        return train_set
    from nnunet_tpp.vision2d.data import detect_layout, is_image_folder, load_dataset, load_image_folder
    if is_image_folder(cfg.tpp_data):
        return load_image_folder(cfg.tpp_data, cfg.img_size, in_chans)
    task = "seg" if detect_layout(cfg.tpp_data) == "image_mask" else "cls"
    return load_dataset(cfg.tpp_data, task, cfg.img_size, in_chans=in_chans, seed=cfg.seed, augment=False).train


def _batches(dataset, batch_size: int, seed: int, epoch: int):
    from nnunet_tpp.vision2d.data import make_loader
    for images, _ in make_loader(dataset, min(batch_size, len(dataset)), shuffle=True, seed=seed * 1000 + epoch):
        yield images


class _MAEPretext(nn.Module):
    """Encoder (the task model's ViT with its PEFT method) + MAE decoder."""

    def __init__(self, vit: nn.Module, decoder: MAEDecoder, settings: MAESettings):
        super().__init__()
        self.vit, self.decoder, self.settings = vit, decoder, settings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vit.config
        keep, mask, restore = random_masking(images.shape[0], cfg.grid ** 2, self.settings.mask_ratio, images.device)
        latent = self.vit.forward_features(images, keep=keep)[0]
        return mae_loss(images, self.decoder(latent, restore), mask, cfg.patch_size, self.settings.norm_pix)


def _mae_decoder(cfg, vit, settings: MAESettings, log) -> tuple[MAEDecoder, bool]:
    """The inherited decoder of a MAE checkpoint (and whether it trains), or a new trainable one."""
    c = vit.config
    if settings.inherit_decoder and cfg.backbone is not None:
        from nnunet_tpp.models.vit_checkpoint import mae_decoder_state_dict
        state = mae_decoder_state_dict(cfg.backbone)
        if state:
            decoder = MAEDecoder.from_state_dict(state, c.grid ** 2, c.patch_size, c.in_chans, vit.num_prefix_tokens)
            trains = cfg.task == "seg"
            log(f"TPP mae: decoder inherited from {cfg.backbone} ({'trained' if trains else 'frozen'} for "
                f"{'segmentation' if trains else 'classification'})")
            return decoder, trains
    log("TPP mae: a new MAE decoder (the backbone file has none)")
    return MAEDecoder(c.embed_dim, c.grid ** 2, c.patch_size, c.in_chans, settings.decoder_embed_dim,
                      settings.decoder_depth, max(1, settings.decoder_embed_dim // 32), vit.num_prefix_tokens), True


class ClassTokenEmbedding(nn.Module):
    """A ViT's class token as the DINO feature of a view."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit, self.dim = vit, vit.embed_dim

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.vit(views)[:, 0]


class PooledEmbedding(nn.Module):
    """The spatial mean of a convolutional feature map (LiteMedSAM's encoder output) as the DINO feature of a view."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone, self.dim = backbone, backbone.embed_dim

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.backbone(views).mean(dim=(2, 3))


def backbone_in_chans(backbone: nn.Module) -> int:
    """The image channels a backbone takes (a ViT's config, or the backbone's own ``in_chans``)."""
    config = getattr(backbone, "config", None)
    return config.in_chans if config is not None else backbone.in_chans


def run_tpp_2d(model: nn.Module, train_set, cfg, work_dir: Path, device: torch.device,
               log: Callable[[str], None] = print) -> Path:
    """Runs (or resumes, or reuses) the pretext stage ``cfg.tpp`` for a task model with a PEFT method.

    Args:
        model: a ViT task model (``.backbone``) with a method that adds parameters.
        train_set: the run's training images (not augmented); ``cfg.tpp_data`` replaces them.
        cfg: the run's :class:`~nnunet_tpp.vision2d.config.Train2dConfig` (``tpp``, ``tpp_epochs``,
            ``tpp_options``, ``backbone``, ``task``, ``seed``).
        work_dir: the stage's folder.
    Returns:
        The target-parameter file. Only the target parameters (and the pretext head) change; the freezing of
        the supervised method is restored afterwards.
    """
    work_dir = Path(work_dir)
    result = work_dir / RESULT_FILE
    targets = peft.target_parameters(model)
    if not targets:
        raise ValueError(f"TPP needs a method that adds parameters; {peft.unwrap(model).peft_config.method!r} "
                         f"adds none (use e.g. adapter, lora, vpt, ssf, adaptformer, evp, dtl)")
    if result.exists():
        log(f"TPP {cfg.tpp}: stage already finished, reusing {result}")
        return result
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_for(cfg.tpp, cfg.tpp_options)
    vit = model.backbone
    images = pretext_images(cfg, backbone_in_chans(vit), train_set)
    for name, param in model.named_parameters():
        param.requires_grad_(name in targets)
    try:
        if cfg.tpp == "mae":
            losses = _run_mae(model, vit, images, cfg, settings, work_dir, device, log)
        elif cfg.tpp == "simmim":
            losses = _run_simmim(vit, images, cfg, settings, work_dir, device, log)
        else:
            losses = _run_dino(model, vit, images, cfg, settings, work_dir, device, log)
    finally:
        peft.freeze(model)
    save_target_parameters(model, str(result), extra={"pretext": cfg.tpp, "epochs": cfg.tpp_epochs,
                                                      "losses": losses})
    log(f"TPP {cfg.tpp}: wrote {result}")
    return result


def _resume(path: Path, modules: dict[str, nn.Module], optimizer, log, extra: dict | None = None) -> tuple[int, list]:
    if not path.exists():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, module in modules.items():
        module.load_state_dict(state[key], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    for key, tensor in (extra or {}).items():
        tensor.copy_(state[key])
    log(f"TPP: resuming after epoch {state['epoch']} from {path}")
    return state["epoch"], list(state["losses"])


def _save(path: Path, modules: dict[str, nn.Module], optimizer, epoch: int, losses: list, extra: dict | None = None):
    first = next(iter(modules.values()))
    names = {n for n, p in first.named_parameters() if p.requires_grad}  # the teacher mirrors the student
    trained = {key: {n: p.detach().cpu() for n, p in m.named_parameters() if n in names} for key, m in modules.items()}
    peft.atomic_torch_save({**trained, "optimizer": optimizer.state_dict(), "epoch": epoch, "losses": losses,
                            **{k: v.detach().cpu() for k, v in (extra or {}).items()}}, path)


def _epoch_line(kind: str, epoch: int, total: int, loss: float, lr: float, started: float) -> str:
    return f"TPP {kind}: epoch {epoch}/{total} loss {loss:.4f} lr {lr:.2e} ({time.time() - started:.1f} s)"


def _run_mae(model, vit, images, cfg, s: MAESettings, work_dir: Path, device, log) -> list[float]:
    decoder, decoder_trains = _mae_decoder(cfg, vit, s, log)
    decoder.requires_grad_(decoder_trains)
    decoder.decoder_pos_embed.requires_grad_(False)
    pretext = _MAEPretext(vit, decoder, s).to(device)
    groups = weight_decay_groups(pretext.named_parameters(), s.weight_decay, skip=())  # MAE's add_weight_decay
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95))
    return _run_reconstruction("mae", pretext, optimizer, images, cfg, s, work_dir, device, log)


def _run_simmim(backbone, images, cfg, s: SimMIMSettings, work_dir: Path, device, log) -> list[float]:
    """SimMIM (:mod:`nnunet_tpp.pretext.simmim`) on a backbone with a stem (LiteMedSAM's encoder): the target
    parameters, the mask token and the 1 x 1 decoder train; SimMIM's AdamW (betas 0.9 / 0.999, no decay on biases,
    1-D parameters and the mask token)."""
    from nnunet_tpp.pretext.simmim import SimMIMPretext
    pretext = SimMIMPretext(backbone, s.mask_patch_size, s.mask_ratio).to(device)
    try:
        groups = weight_decay_groups(pretext.named_parameters(), s.weight_decay, skip=("mask_token",))
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))
        return _run_reconstruction("simmim", pretext, optimizer, images, cfg, s, work_dir, device, log)
    finally:
        pretext.stem.remove()


def _run_reconstruction(kind: str, pretext: nn.Module, optimizer, images, cfg, s, work_dir: Path, device, log
                        ) -> list[float]:
    """The masked-reconstruction loop of MAE and SimMIM: ``pretext(batch)`` is the loss; warm-up then cosine;
    masks from the global generator seeded by (seed, epoch), so a resumed stage draws what an uninterrupted one
    does."""
    steps = -(-len(images) // min(s.batch_size, len(images)))
    total = cfg.tpp_epochs * steps
    lrs = cosine_schedule(s.lr, 0.0, total, int(s.warmup_fraction * total))
    state_file = work_dir / STATE_FILE
    start, losses = _resume(state_file, {"pretext": pretext}, optimizer, log)
    cuda = device.type == "cuda"
    for epoch in range(start, cfg.tpp_epochs):
        started, epoch_losses = time.time(), []
        pretext.train()
        torch.manual_seed(cfg.seed * 7919 + epoch)
        for i, batch in enumerate(_batches(images, s.batch_size, cfg.seed, epoch)):
            for group in optimizer.param_groups:
                group["lr"] = lrs[min(epoch * steps + i, total - 1)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = pretext(batch.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(sum(epoch_losses) / len(epoch_losses))
        log(_epoch_line(kind, epoch + 1, cfg.tpp_epochs, losses[-1], optimizer.param_groups[0]["lr"], started))
        _save(state_file, {"pretext": pretext}, optimizer, epoch + 1, losses)
        plot_losses(losses, str(work_dir / "tpp_progress.png"), objective={"mae": "MAE", "simmim": "SimMIM"}[kind])
    return losses


def _run_dino(model, vit, images, cfg, s: DINO2dSettings, work_dir: Path, device, log) -> list[float]:
    """The 3-D stage's DINO loop (:func:`run_dino_stage`) on 2-D multi-crop views and the class token."""
    batch = min(s.batch_size, len(images))
    peak = s.base_lr * batch / 256  # the paper's DINO rule (the 2-D recipe)
    dino = DINOConfig(out_dim=s.out_dim, hidden_dim=s.hidden_dim, bottleneck_dim=s.bottleneck_dim, lr=None,
                      base_lr=s.base_lr, min_lr=min(1e-6, 0.01 * peak), warmup_epochs=s.warmup_epochs,
                      teacher_temp=s.teacher_temp,
                      warmup_teacher_temp=s.warmup_teacher_temp, warmup_teacher_temp_epochs=max(1, cfg.tpp_epochs // 3))
    if getattr(vit, "config", None) is not None:
        size, local = view_sizes(vit.config.img_size, vit.config.patch_size, s.local_fraction)
        embedding = ClassTokenEmbedding(vit)
    else:  # a fixed-size input (LiteMedSAM): local crops are resampled to it as well
        size = local = vit.img_size
        embedding = PooledEmbedding(vit)
    schedule = PretextSchedule(epochs=cfg.tpp_epochs, iterations_per_epoch=-(-len(images) // batch), batch_size=batch,
                               grad_clip=s.grad_clip)
    state_file = work_dir / STATE_FILE
    # each call draws from the seed and its training step alone, so a resumed stage draws what an uninterrupted
    # one does; a fresh stage first calibrates the head's running statistics, with calls numbered before step 0
    if state_file.exists():
        step = read_state(str(state_file))["epoch"] * schedule.iterations_per_epoch
    else:  # (run_dino_stage calibrates with ceil(calibration_samples / batch) calls when the norm is running)
        calibration = -(-max(1, schedule.calibration_samples) // batch) if dino.head_input_norm == "running" else 0
        step = -calibration
    calls = [step]

    def sample(count: int) -> tuple[list, list]:
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + calls[0]) % 2 ** 63)
        calls[0] += 1
        picks = torch.randint(len(images), (count,), generator=generator).tolist()
        x = torch.stack([images[i][0] for i in picks])
        globals_ = random_views(x, 2, size, tuple(s.global_scale), generator)
        return globals_, (random_views(x, s.local_crops, local, tuple(s.local_scale), generator) if s.local_crops else [])

    return run_dino_stage(model, sample, schedule, dino, device, str(state_file), log,
                          str(work_dir / "tpp_progress.png"), embedding=embedding,
                          diagnostics_file=str(work_dir / "tpp_diagnostics.json"))
