"""The DINOv2 objective (Oquab et al., 2023) as ESSA's self-supervised adaptation uses it: DINO on the class
token, iBOT on masked patch tokens through the same (shared) head, and the KoLeo regulariser.

Written after facebookresearch/dinov2 (``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``,
``dinov2/train/ssl_meta_arch.py`` ``forward_backward``, ``dinov2/data/{masking,collate}.py``) and its use in
ESSA (MoeinSorkhei/APLA, ``src/self_supervised/dinov2/models.py``):

* DINO: the cross-entropy between the teacher distribution of each global view and the student distribution
  of every other view (locals and the other global view), averaged over all those pairs. It reuses
  :class:`nnunet_tpp.pretext.dino.DINOLoss` (centring); with Sinkhorn-Knopp the same pairs are scored against
  Sinkhorn-Knopp targets.
* iBOT: the student sees the global views with some patches replaced by a mask token, the teacher sees them
  unmasked; for every masked patch the cross-entropy between the teacher's and the student's distribution
  (patch tokens through the CLS head). A sample's masked patches share the weight 1 / (its masked count), and
  the sum is divided by the number of global views in the batch, masked or not (DINOv2's ``forward_masked``).
* KoLeo: ``-mean log ||x_i - x_nn(i)||`` of the L2-normalised student CLS features of each global view (its
  batch), summed over the global views.
* total = ``dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo`` (DINOv2 / ESSA: 1, 1, 0.1).

Teacher targets: ``centering`` (softmax of the centred, sharpened logits, the centre an EMA of the teacher's
mean output; DINOv2's ``ssl_default_config.yaml`` and ESSA's SSA recipe; the default here) or
``sinkhorn_knopp`` (3 Sinkhorn-Knopp iterations, as DINOv2's LVD-142M configs ``vitl14.yaml`` /
``vitg14.yaml`` use).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_tpp.pretext.dino import DINOLoss

CENTERINGS = ("centering", "sinkhorn_knopp")
MASK_MODES = ("block", "random")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019) of a batch of features.

    Args:
        features: (B, D), B >= 2; L2-normalised here.
        eps: added to the difference and the distance (DINOv2's ``PairwiseDistance(eps)`` and ``log(d + eps)``).
    Returns:
        ``-mean_i log ||x_i - x_j(i)||`` with j(i) the nearest other sample (largest dot product), in float32.
    """
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples, got {features.shape[0]}")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-math.inf)  # never one's own neighbour
            nearest = dots.argmax(dim=1)
        distances = torch.linalg.vector_norm(x - x[nearest] + eps, dim=-1)
        return -torch.log(distances + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's ``sinkhorn_knopp_teacher``): ``exp(logits / T)``
    alternately normalised so that every prototype gets the same total mass and every sample sums to 1.

    Args:
        logits: (M, K) teacher logits.
    Returns:
        (M, K) float32 targets; each row sums to 1.
    """
    logits = logits.float()
    q = torch.exp((logits - logits.max()) / temperature).t()  # (K, M); the max cancels in the normalisation
    tiny = torch.finfo(q.dtype).tiny
    count = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    prototypes = q.shape[0]
    q /= _all_reduce(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= count
    return (q * count).t()


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (M,) weights of the masked patches in row-major order: 1 / (masked patches of its sample)."""
    per_sample = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_sample[:, None].expand_as(masks)[masks]


def ibot_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                       student_temp: float = 0.1) -> torch.Tensor:
    """The iBOT patch loss over the masked patches only.

    Args:
        student_logits: (B, N, K) logits of every patch, or (M, K) of the masked patches in row-major order of
            ``masks`` (M = ``masks.sum()``).
        teacher_probs: the teacher targets, shaped like ``student_logits``.
        masks: (B, N) bool, True where the student saw the mask token.
        student_temp: student softmax temperature.
    Returns:
        ``sum_b sum_{n masked} w_bn * CE(teacher_bn, student_bn) / B`` with ``w_bn = 1 / masked(b)``: the mean
        over the samples of the per-sample mean over its masked patches (unmasked samples count as 0).
    """
    if student_logits.ndim == 3:
        student_logits, teacher_probs = student_logits[masks], teacher_probs[masks]
    if student_logits.shape[0] != int(masks.sum()):
        raise ValueError(f"{student_logits.shape[0]} patch logits for {int(masks.sum())} masked patches")
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    return (ce * masked_patch_weights(masks)).sum() / masks.shape[0]


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss with centred (EMA centre of the masked teacher outputs) or Sinkhorn-Knopp
    teacher targets.

    Args:
        out_dim: prototypes of the head.
        student_temp: student temperature.
        center_momentum: momentum of the centre (``centering`` only).
        centering: ``centering`` or ``sinkhorn_knopp``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering"):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) teacher logits of the masked patches -> (M, K) target distributions."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher output over the masked patches (all-reduced when distributed)."""
        total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=total.device))
        self.center.mul_(self.center_momentum).add_(total / count.clamp_min(1), alpha=1 - self.center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """Loss of the masked patches' logits (M, K) (see :func:`ibot_cross_entropy`); updates the centre."""
        targets = self.teacher_targets(teacher_logits, teacher_temp)
        loss = ibot_cross_entropy(student_logits, targets, masks, self.student_temp)
        if self.centering == "centering" and teacher_logits.shape[0]:
            self.update_center(teacher_logits)
        return loss


class DINOv2Loss(nn.Module):
    """The combined DINOv2 objective: DINO (class token) + iBOT (masked patches, shared head) + KoLeo.

    Args:
        out_dim: prototypes of the shared head.
        student_temp, center_momentum: as in DINO.
        centering: teacher targets, ``centering`` (default) or ``sinkhorn_knopp``.
        dino_weight, ibot_weight, koleo_weight: loss weights (DINOv2: 1, 1, 0.1).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering", dino_weight: float = 1.0, ibot_weight: float = 1.0,
                 koleo_weight: float = 0.1):
        super().__init__()
        self.dino = DINOLoss(out_dim, student_temp, center_momentum)
        self.ibot = IBOTPatchLoss(out_dim, student_temp, center_momentum, centering)
        self.centering = centering
        self.weights = {"dino": float(dino_weight), "ibot": float(ibot_weight), "koleo": float(koleo_weight)}

    def _dino_term(self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float
                   ) -> torch.Tensor:
        if self.centering == "centering":
            return self.dino(student, teacher, teacher_temp)
        targets = sinkhorn_knopp(torch.cat(teacher), teacher_temp).chunk(len(teacher))
        log_probs = [F.log_softmax(s.float() / self.dino.student_temp, dim=-1) for s in student]
        pairs = [(-(t * lp).sum(dim=-1)).mean() for i, t in enumerate(targets)
                 for j, lp in enumerate(log_probs) if i != j]
        return torch.stack(pairs).mean()

    def forward(self, student_cls: list[torch.Tensor], teacher_cls: list[torch.Tensor],
                student_patches: torch.Tensor | None, teacher_patches: torch.Tensor | None,
                masks: torch.Tensor | None, cls_features: list[torch.Tensor], teacher_temp: float
                ) -> dict[str, torch.Tensor]:
        """Args:
            student_cls: head logits of the student's class tokens, one (B, K) per view, global views first.
            teacher_cls: head logits of the teacher's class tokens of the global views, one (B, K) each.
            student_patches, teacher_patches: head logits (M, K) of the masked patch tokens, in row-major order
                of ``masks`` (None, or M = 0: no iBOT term).
            masks: (n_global * B, N) bool masks of the student's global views (views concatenated in order).
            cls_features: the student's backbone class tokens of the global views, one (B, D) each (KoLeo).
            teacher_temp: the current teacher temperature.
        Returns:
            ``{"loss", "dino", "ibot", "koleo"}``: the weighted total and the unweighted terms.
        """
        zero = student_cls[0].new_zeros(())
        terms = {"dino": self._dino_term(student_cls, teacher_cls, teacher_temp) if self.weights["dino"] else zero}
        use_ibot = self.weights["ibot"] and masks is not None and student_patches is not None \
            and student_patches.shape[0] > 0
        terms["ibot"] = self.ibot(student_patches, teacher_patches, masks, teacher_temp) if use_ibot else zero
        use_koleo = self.weights["koleo"] and all(f.shape[0] >= 2 for f in cls_features)
        terms["koleo"] = torch.stack([koleo_loss(f) for f in cls_features]).sum() if use_koleo else zero
        terms["loss"] = sum(self.weights[k] * terms[k].float() for k in ("dino", "ibot", "koleo"))
        return terms


def dinov2_terms(student: nn.Module, teacher: nn.Module, objective: DINOv2Loss, global_views: torch.Tensor,
                 local_views: list[torch.Tensor], masks: torch.Tensor, teacher_temp: float, prefix: int = 1
                 ) -> dict[str, torch.Tensor]:
    """One DINOv2 forward (``SSLMetaArch.forward_backward`` without the backward): the teacher sees the global
    views, the student the masked global views and the local views; class tokens and masked patch tokens go
    through the same head of each network (one call per group).

    Args:
        student, teacher: modules with ``tokens(images, masks=None) -> (B, prefix + N, D)`` (masked patches
            replaced by a mask token) and ``head`` (features -> prototype logits).
        objective: the :class:`DINOv2Loss`.
        global_views: (2 B, C, H, W), the two global views of B images concatenated.
        local_views: the local views, each (B, C, h, w) (may be empty).
        masks: (2 B, N) bool iBOT masks of the global views.
        prefix: class + register tokens before the patches.
    Returns:
        The objective's terms (``loss``, ``dino``, ``ibot``, ``koleo``).
    """
    patches = masks.sum() > 1  # (iBOT on fewer than two masked patches is skipped)
    with torch.no_grad():
        t_tokens = teacher.tokens(global_views)
        t_cls = teacher.head(t_tokens[:, 0]).float()
        t_patch = teacher.head(t_tokens[:, prefix:][masks]).float() if patches else None
    s_tokens = student.tokens(global_views, masks)
    s_cls = list(student.head(s_tokens[:, 0]).float().chunk(2))
    s_patch = student.head(s_tokens[:, prefix:][masks]).float() if patches else None
    if local_views:
        s_cls += list(student.head(student.tokens(torch.cat(local_views))[:, 0]).float().chunk(len(local_views)))
    return objective(s_cls, list(t_cls.chunk(2)), s_patch, t_patch, masks, list(s_tokens[:, 0].float().chunk(2)),
                     teacher_temp)


def block_mask(grid: tuple[int, int], count: int, rng: random.Random, min_patches: int = 4,
               max_patches: int | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """About ``count`` masked patches as a union of random rectangles (BEiT / iBOT block masking, DINOv2's
    ``MaskingGenerator``).

    Rectangles of area ``U(min_patches, still missing)`` (at most ``max_patches``) and log-uniform aspect
    ratio in ``[min_aspect, 1/min_aspect]`` are placed at random; a placement counts when it adds new patches
    without overshooting; ten failed placements in a row end the mask (it may then hold fewer patches).

    Returns:
        (rows, cols) bool array.
    """
    rows, cols = grid
    mask = np.zeros((rows, cols), dtype=bool)
    max_patches = count if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masked = 0
    while masked < count:
        budget = min(count - masked, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < h < rows and 0 < w < cols):
                continue
            top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                added = new
                break
        if added == 0:
            break
        masked += added
    return mask


def random_mask(grid: tuple[int, int], count: int, rng: random.Random) -> np.ndarray:
    """Exactly ``count`` patches chosen uniformly at random: (rows, cols) bool."""
    n = grid[0] * grid[1]
    flat = np.zeros(n, dtype=bool)
    flat[rng.sample(range(n), min(count, n))] = True
    return flat.reshape(grid)


def sample_masks(views: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5),
                 probability: float = 0.5, mode: str = "block", rng: random.Random | None = None) -> torch.Tensor:
    """The iBOT masks of a batch of global views (DINOv2's ``collate_data_and_cast``).

    ``int(views * probability)`` views are masked, with ratios drawn stratified over ``ratio`` (view i of
    those gets ``U(r_i, r_{i+1})`` of the patches, ``r`` evenly spaced); the others get no mask; the order
    is shuffled. Block masks hold at most half of the patches per rectangle (DINOv2's
    ``max_num_patches = 0.5 N``).

    Args:
        views: number of global views (n_global * batch).
        grid: patches per side (rows, cols).
        mode: ``block`` or ``random``.
    Returns:
        (views, rows * cols) bool.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if not 0 <= ratio[0] <= ratio[1] <= 1:
        raise ValueError(f"mask ratio must be 0 <= min <= max <= 1, got {tuple(ratio)}")
    rng = rng or random.Random()
    n = grid[0] * grid[1]
    n_masked = int(views * probability)
    bounds = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = []
    for i in range(n_masked):
        count = int(n * rng.uniform(bounds[i], bounds[i + 1]))
        masks.append(block_mask(grid, count, rng, max_patches=int(0.5 * n)) if mode == "block"
                     else random_mask(grid, count, rng))
    masks += [np.zeros(grid, dtype=bool)] * (views - n_masked)
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks).reshape(views, n))
