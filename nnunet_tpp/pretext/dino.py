"""The DINO objective (Caron et al., 2021) as TPP uses it: a projection head, the cross-entropy between a
sharpened, centred EMA teacher and the student over multi-crop views, the schedules of the recipe, and the
collapse diagnostics of the DINO paper (entropy of the teacher's targets, student-teacher KL).

Shared by the 3-D (STU-Net encoder features) and 2-D (ViT CLS token) pretext stages and the SSA stage's DINOv2
head: everything here works on feature vectors and parameters, not on images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INPUT_NORMS = ("running", "batch", "none")
KEEP = ("teacher", "student")
TEACHER_MODES = ("train", "eval")
CLIP_MODES = ("per_parameter", "global")


class PretextSettingsError(ValueError):
    """Settings of a pretext stage that cannot run (a learning rate <= 0, views that do not fit, ...)."""


@dataclass
class DINOConfig:
    """Recipe of a DINO pretext stage (the official DINO's defaults where they apply, see DESIGN.md).

    Attributes:
        out_dim: number of prototypes of the head.
        hidden_dim, bottleneck_dim: widths of the head's MLP and of its bottleneck.
        lr: the peak learning rate (absolute; the 3-D stage's default, see the README). None: DINO's rule
            ``base_lr * batch / 256``, which was written for batches of 64-1024 and moves (almost) nothing at
            nnU-Net's batch sizes (7.8e-7 at batch 2).
        base_lr: learning rate at batch 256 (only when ``lr`` is None).
        min_lr: end of the cosine decay (must be below the peak).
        warmup_epochs: linear learning-rate warm-up (at most half the stage), then cosine decay to ``min_lr``.
        weight_decay, weight_decay_end: cosine schedule of AdamW's weight decay (biases and 1-D parameters get none).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher sharpening schedule (linear from
            the warm-up value to the final one; default 0.01 throughout: with only the target parameters
            training, the official 0.04 and 0.02 let the targets drift to uniform on the CT, and DINO's advice when
            the loss does not decrease is a lower teacher temperature; see the README).
        student_temp: student softmax temperature.
        center_momentum: momentum of the teacher-output centre.
        momentum_teacher: start of the EMA momentum; it follows a cosine to 1.
        freeze_last_layer: epochs during which the prototypes (the head's last layer) do not train.
        head_input_norm: how the head's input is standardised per dimension: ``running`` (running statistics of
            the student's inputs; no sample's output depends on the others of its batch, so any batch size works,
            1 included), ``batch`` (the batch's own statistics: couples the samples of a batch; at batch 2 the two
            views of one sample get opposite inputs), ``none`` (the official DINO head).
        norm_momentum: weight of each step's statistics in the running ones (``running``).
        keep: whose target parameters are the stage's result: ``teacher`` (as DINO evaluates) or ``student``.
        teacher_mode: the EMA teacher's module mode: ``train`` (the official DINO never switches it to eval) or
            ``eval``. The same on every network of this package (instance norms, no dropout); our head's running
            input statistics are never updated by the teacher in either mode.
        clip: how ``grad_clip`` is applied: ``per_parameter`` (the official ``utils.clip_gradients``: each
            parameter's gradient norm on its own) or ``global`` (one norm over all trained parameters).
    """

    out_dim: int = 4096
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    lr: float | None = 5e-4
    base_lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    warmup_teacher_temp: float = 0.01
    teacher_temp: float = 0.01
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    freeze_last_layer: int = 1
    head_input_norm: str = "running"
    norm_momentum: float = 0.05
    keep: str = "teacher"
    teacher_mode: str = "train"
    clip: str = "per_parameter"

    def peak_lr(self, batch_size: int) -> float:
        """The peak learning rate: ``lr``, or ``base_lr * batch_size / 256`` when ``lr`` is None."""
        return float(self.lr) if self.lr is not None else self.base_lr * batch_size / 256

    def validate(self, batch_size: int) -> None:
        """Raises :class:`PretextSettingsError` for settings that cannot train."""
        peak = self.peak_lr(batch_size)
        if not peak > 0:
            raise PretextSettingsError(f"the pretext learning rate must be > 0, got {peak:g}")
        if not 0 <= self.min_lr < peak:
            raise PretextSettingsError(f"the pretext min_lr must be >= 0 and below the peak learning rate {peak:g} "
                                       f"(the cosine decays from the peak to it), got {self.min_lr:g}")
        if self.head_input_norm not in INPUT_NORMS:
            raise PretextSettingsError(f"head_input_norm must be one of {', '.join(INPUT_NORMS)}, got "
                                       f"{self.head_input_norm!r}")
        if self.keep not in KEEP:
            raise PretextSettingsError(f"keep must be teacher or student, got {self.keep!r}")
        if self.teacher_mode not in TEACHER_MODES:
            raise PretextSettingsError(f"teacher_mode must be train or eval, got {self.teacher_mode!r}")
        if self.clip not in CLIP_MODES:
            raise PretextSettingsError(f"clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise PretextSettingsError("the DINO temperatures must be > 0")
        if self.out_dim < 2 or self.freeze_last_layer < 0 or not 0 < self.norm_momentum <= 1:
            raise PretextSettingsError("need out_dim >= 2, freeze_last_layer >= 0 and 0 < norm_momentum <= 1")


class RunningStandardization(nn.Module):
    """Standardises each dimension with running statistics: ``(x - mean) / sqrt(var + eps)``, kept separately for
    each group of inputs (the 3-D stage: one per view size, since the pooled features of a smaller view differ
    systematically from a larger one's; measured on the CT, a local view's standardised features had cosine -0.29
    with its own global view's when both shared one set of statistics).

    The statistics used for a batch are those from before it, so no sample's output depends on the other samples
    of its batch (a batch of 1 works; the views of one sample are not pushed apart as by a batch norm over few
    samples). In training mode each call then folds the batch's (detached) statistics in with weight
    ``momentum``; :meth:`calibrate` sets them from a sample of inputs before training. A copy in eval mode (the EMA
    teacher) uses them unchanged.
    """

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-5, groups: int = 2):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(groups, dim))
        self.register_buffer("var", torch.ones(groups, dim))
        self.register_buffer("count", torch.zeros(groups, dtype=torch.long))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, group: int = 0) -> None:
        """Sets the statistics of ``group`` to those of ``x`` (N, dim), pooled over the ranks of a process group
        (so every rank holds the same statistics)."""
        mean, var, n = _pooled_moments(x)
        self.mean[group] = mean
        self.var[group] = var if n > 1 else torch.ones_like(self.var[group])
        self.count[group] = n

    def forward(self, x: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
        """``x`` (N, dim); ``groups``: the number of rows of each group, in order (default: all rows group 0)."""
        sizes = list(groups) if groups else [x.shape[0]]
        parts = []
        for g, part in enumerate(torch.split(x, sizes)):
            parts.append((part.float() - self.mean[g]) * torch.rsqrt(self.var[g] + self.eps))
            if self.training:
                self._update(part, g)
        return torch.cat(parts)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, group: int) -> None:
        if int(self.count[group]) == 0:
            self.calibrate(x, group)
            return
        mean, var, n = _pooled_moments(x)  # the whole batch's, over every rank
        m = self.momentum
        self.mean[group] = (1 - m) * self.mean[group] + m * mean
        if n > 1:
            self.var[group] = (1 - m) * self.var[group] + m * var
        self.count[group] += n


def _pooled_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean, (biased) variance and number of the rows of ``x`` (N, dim) of every rank together (this process's
    alone without a process group)."""
    from nnunet_tpp.pretext.distributed import all_reduce_sum, world
    x = x.detach().float()
    if world()[1] == 1:
        return x.mean(0), x.var(0, unbiased=False) if x.shape[0] > 1 else torch.zeros_like(x[0]), x.shape[0]
    sums = all_reduce_sum(torch.cat([x.sum(0), x.pow(2).sum(0), x.new_tensor([x.shape[0]])]))
    dim = x.shape[1]
    n = int(sums[-1])
    mean = sums[:dim] / n
    return mean, (sums[dim:2 * dim] / n - mean.pow(2)).clamp_min(0), n


def _input_norm(kind: str, dim: int, momentum: float) -> nn.Module:
    if kind == "running":
        return RunningStandardization(dim, momentum)
    if kind == "batch":  # the batch's own statistics, also in eval mode (the teacher): what earlier versions did
        return nn.BatchNorm1d(dim, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise PretextSettingsError(f"head_input_norm must be one of {', '.join(INPUT_NORMS)}, got {kind!r}")


class DINOHead(nn.Module):
    """Standardised input (``input_norm``, see :attr:`DINOConfig.head_input_norm`) -> MLP (3 layers, GELU) ->
    L2-normalised bottleneck -> weight-normalised prototypes (norm fixed to 1, as DINO's ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256,
                 input_norm: str = "running", norm_momentum: float = 0.05):
        super().__init__()
        # pooled CNN features share a large common component that would make all logits alike: standardising
        # each dimension removes it (with running statistics, without coupling the samples of a batch)
        self.input_norm = _input_norm(input_norm, in_dim, norm_momentum)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.prototypes = nn.utils.parametrizations.weight_norm(self.prototypes)
        with torch.no_grad():
            self.prototypes.parametrizations.weight.original0.fill_(1.0)
        self.prototypes.parametrizations.weight.original0.requires_grad_(False)

    @property
    def last_layer(self) -> list[nn.Parameter]:
        """The trainable parameters of the last layer (the prototypes' directions), frozen in the first epoch(s)."""
        return [self.prototypes.parametrizations.weight.original1]

    def forward(self, x: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
        """``(N, in_dim)`` features -> ``(N, out_dim)`` logits. ``groups``: rows per view size, in order (their
        own running statistics, ``running`` only)."""
        x = self.input_norm(x, groups) if isinstance(self.input_norm, RunningStandardization) else self.input_norm(x)
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


def cancel_last_layer_gradients(head: DINOHead) -> None:
    """Drops the gradients of the head's last layer (DINO's ``cancel_gradients_last_layer``): AdamW then skips it,
    weight decay included."""
    for param in head.last_layer:
        param.grad = None


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and the student
    distribution of every other view; updates the centre with the teacher's batch mean.

    After each call ``last_targets`` holds the teacher distributions of that call, ``(n_global * N, out_dim)``
    (for :class:`CollapseMeter`)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_targets: torch.Tensor | None = None

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float,
                update_center: bool = True) -> torch.Tensor:
        """Args:
            student: logits of every view (global views first), each ``(N, out_dim)``.
            teacher: logits of the global views, each ``(N, out_dim)``.
            teacher_temp: the current teacher temperature.
            update_center: fold the teacher's batch mean into the centre (False: evaluation).
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
        self.last_targets = torch.cat(targets)
        if update_center:
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


class CollapseMeter:
    """The collapse diagnostics of one epoch (DINO paper, section 5.3 and Fig. 7).

    * ``teacher_entropy``: the mean entropy of the teacher's (centred, sharpened) target per view. Near
      ``log_k`` = log(out_dim): the targets are uniform (collapse by centring alone).
    * ``batch_mean_entropy``: the entropy of the mean teacher distribution over every global view of the epoch
      (the batch mean, taken over all the epoch's batches so that it means the same at any batch size, 1
      included). Near 0: every view gets the same prototype (collapse to one dimension).
    * ``kl``: the mean KL divergence between the teacher target and the student distribution over the loss's
      (teacher view, other view) pairs, ``loss - teacher_entropy``. Near 0 with either of the above: collapse.
    """

    def __init__(self, out_dim: int):
        self.log_k = math.log(out_dim)
        self.loss = self.entropy = 0.0
        self.steps = 0
        self.prob_sum: torch.Tensor | None = None
        self.rows = 0

    @torch.no_grad()
    def add(self, loss: float, targets: torch.Tensor) -> None:
        """One step: its loss and the teacher targets (:attr:`DINOLoss.last_targets`)."""
        targets = targets.detach().float()
        self.loss += loss
        self.entropy += float(entropy(targets).mean())
        total = targets.sum(0).cpu()
        self.prob_sum = total if self.prob_sum is None else self.prob_sum + total
        self.rows += targets.shape[0]
        self.steps += 1

    def result(self, epoch: int) -> dict:
        """``{"epoch", "loss", "teacher_entropy", "batch_mean_entropy", "kl", "log_k"}`` (epoch counted from 1)."""
        loss, ent = self.loss / max(self.steps, 1), self.entropy / max(self.steps, 1)
        mean = self.prob_sum / max(self.rows, 1) if self.prob_sum is not None else None
        return {"epoch": epoch, "loss": loss, "teacher_entropy": ent,
                "batch_mean_entropy": float(entropy(mean)) if mean is not None else float("nan"),
                "kl": loss - ent, "log_k": self.log_k}


#: A warning is logged when the teacher's entropy exceeds this fraction of log K, or the batch-mean entropy
#: falls below the other fraction of log K.
UNIFORM_FRACTION, ONE_PROTOTYPE_FRACTION = 0.9, 0.05


def collapse_warning(row: dict) -> str | None:
    """The warning for one epoch's diagnostics (see :class:`CollapseMeter`), or None when it looks healthy."""
    log_k = row["log_k"]
    if row["teacher_entropy"] > UNIFORM_FRACTION * log_k:
        return (f"WARNING: TPP pretext may be collapsing: the teacher's entropy {row['teacher_entropy']:.2f} is near "
                f"log K = {log_k:.2f} (uniform targets)")
    if row["batch_mean_entropy"] < ONE_PROTOTYPE_FRACTION * log_k:
        return (f"WARNING: TPP pretext may be collapsing: the batch-mean teacher entropy "
                f"{row['batch_mean_entropy']:.2f} is near 0 (every view gets the same prototypes)")
    return None


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for the parameters the student trains
    (the frozen ones are identical in both and stay untouched). As ``teacher + (1 - momentum) * (student -
    teacher)``, so a parameter that did not move (no gradient reaches it) stays exactly as it was."""
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if param.requires_grad:
            teacher_params[name].lerp_(param.detach(), 1 - momentum)


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
