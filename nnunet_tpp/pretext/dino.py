"""The DINO objective (Caron et al., 2021) as TPP uses it: a projection head, the cross-entropy between a
sharpened, centred EMA teacher and the student over multi-crop views, and the schedules of the recipe.

Shared by the 3-D (STU-Net encoder features) and 2-D (ViT CLS token) pretext stages: everything here works
on feature vectors and parameters, not on images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DINOConfig:
    """Recipe of a DINO pretext stage (defaults from the TPP paper's DINO setting, see DESIGN.md).

    Attributes:
        out_dim: number of prototypes of the head.
        hidden_dim, bottleneck_dim: widths of the head's MLP and of its bottleneck.
        base_lr: learning rate at batch 256 (scaled linearly with the batch size).
        warmup_epochs: linear learning-rate warm-up, then cosine decay to ``min_lr``.
        weight_decay, weight_decay_end: cosine schedule of AdamW's weight decay.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher sharpening schedule.
        student_temp: student softmax temperature.
        center_momentum: momentum of the teacher-output centre.
        momentum_teacher: start of the EMA momentum; it follows a cosine to 1.
    """

    out_dim: int = 4096
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    base_lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996

    def lr(self, batch_size: int) -> float:
        """The peak learning rate for a batch: ``base_lr * batch_size / 256``."""
        return self.base_lr * batch_size / 256


class DINOHead(nn.Module):
    """Batch-standardised input -> MLP (3 layers, GELU) -> L2-normalised bottleneck -> weight-normalised
    prototypes (norm fixed to 1)."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256):
        super().__init__()
        # standardising the input across the batch removes what all views share, so the sample-to-sample
        # variation drives the prototypes (pooled CNN features share a large common component)
        self.mlp = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.prototypes = nn.utils.parametrizations.weight_norm(self.prototypes)
        with torch.no_grad():
            self.prototypes.parametrizations.weight.original0.fill_(1.0)
        self.prototypes.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_dim)`` features -> ``(N, out_dim)`` logits."""
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and the student
    distribution of every other view; updates the centre with the teacher's batch mean."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float
                ) -> torch.Tensor:
        """Args:
            student: logits of every view (global views first), each ``(N, out_dim)``.
            teacher: logits of the global views, each ``(N, out_dim)``.
            teacher_temp: the current teacher temperature.
        Returns:
            The mean loss over all (teacher view, other student view) pairs.
        """
        targets = [F.softmax((t - self.center) / teacher_temp, dim=-1).detach() for t in teacher]
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student]
        total, pairs = 0.0, 0
        for i, target in enumerate(targets):
            for j, log_p in enumerate(log_probs):
                if i == j:
                    continue
                total = total + torch.sum(-target * log_p, dim=-1).mean()
                pairs += 1
        self.update_center(torch.cat(teacher))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's mean output (all-reduced when running distributed)."""
        batch_center = teacher_logits.sum(0, keepdim=True)
        count = teacher_logits.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            count *= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for the parameters the student trains
    (the frozen ones are identical in both and stay untouched)."""
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if param.requires_grad:
            teacher_params[name].mul_(momentum).add_(param.detach(), alpha=1 - momentum)


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> list[float]:
    """Per-step values: linear warm-up from ``warmup_start`` to ``start``, then a cosine from ``start`` to
    ``end`` over the remaining steps."""
    warmup_steps = min(warmup_steps, total_steps)
    values = [warmup_start + (start - warmup_start) * i / max(warmup_steps, 1) for i in range(warmup_steps)]
    rest = total_steps - warmup_steps
    values += [end + 0.5 * (start - end) * (1 + math.cos(math.pi * i / max(rest, 1))) for i in range(rest)]
    return values


def teacher_temperature(cfg: DINOConfig, epoch: int) -> float:
    """Linear warm-up of the teacher temperature, then constant."""
    if epoch >= cfg.warmup_teacher_temp_epochs:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / cfg.warmup_teacher_temp_epochs
