"""The DINOv2 objective: KoLeo, the iBOT masked-patch loss, Sinkhorn-Knopp, masking, the combined loss."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nnunet_tpp.pretext.dino import DINOLoss
from nnunet_tpp.pretext.dinov2 import (DINOv2Loss, IBOTPatchLoss, block_mask, ibot_cross_entropy, koleo_loss,
                                       sample_masks, sinkhorn_knopp)


def _unit(degrees: float, length: float) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


def test_koleo_by_hand_on_three_points():
    # angles 0, 60, 150 degrees (lengths differ: KoLeo normalises): nearest neighbours 0<->60 at chord 1,
    # 150 -> 60 at chord 2 sin(45) = sqrt(2)
    x = torch.tensor([_unit(0, 2.0), _unit(60, 0.5), _unit(150, 3.0)])
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(2))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-5)
    closer = torch.tensor([_unit(0, 1.0), _unit(10, 1.0), _unit(150, 1.0)])
    assert koleo_loss(closer) > koleo_loss(x)  # neighbours nearer together cost more
    with pytest.raises(ValueError):
        koleo_loss(x[:1])


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    x = torch.tensor([_unit(0, 1.0), _unit(10, 1.0), _unit(150, 1.0)], requires_grad=True)
    koleo_loss(x).backward()
    moved = F.normalize(x.detach() - 0.01 * x.grad, dim=-1)
    assert (moved[0] @ moved[1]).item() < math.cos(math.radians(10))


def test_ibot_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    b, n, k = 3, 5, 7
    student = torch.randn(b, n, k)
    teacher = torch.softmax(torch.randn(b, n, k), dim=-1)
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks[0, [1, 3]] = True
    masks[1, [0, 1, 2]] = True  # sample 2 has no masked patch
    loss = ibot_cross_entropy(student, teacher, masks, student_temp=0.1)
    ce = -(teacher * torch.log_softmax(student / 0.1, dim=-1)).sum(-1)  # (b, n)
    expected = (ce[0, [1, 3]].mean() + ce[1, [0, 1, 2]].mean() + 0.0) / b
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = teacher.clone()
    changed[0, 0] = torch.softmax(torch.randn(k), dim=-1)  # an unmasked patch of a masked sample
    changed[2, 4] = torch.softmax(torch.randn(k), dim=-1)  # a patch of the unmasked sample
    assert ibot_cross_entropy(student, changed, masks).item() == loss.item()
    changed[1, 2] = torch.softmax(10 * torch.randn(k), dim=-1)  # a masked patch
    assert ibot_cross_entropy(student, changed, masks).item() != pytest.approx(loss.item())
    # the masked-only form (M, K) in row-major mask order gives the same number
    assert ibot_cross_entropy(student[masks], teacher[masks], masks).item() == pytest.approx(loss.item())


def test_ibot_patch_loss_centres_on_the_masked_teacher_outputs():
    torch.manual_seed(1)
    loss_fn = IBOTPatchLoss(6, center_momentum=0.9)
    masks = torch.tensor([[True, False, True], [False, False, False]])
    teacher = torch.randn(2, 6)
    loss = loss_fn(torch.randn(2, 6), teacher, masks, teacher_temp=0.04)
    assert torch.isfinite(loss)
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))
    with pytest.raises(ValueError):
        IBOTPatchLoss(6, centering="nope")


def test_sinkhorn_knopp_gives_assignments_with_balanced_prototypes():
    torch.manual_seed(2)
    logits = torch.randn(64, 8)
    logits[:, 3] += 3.0  # one prototype dominates the raw softmax
    q = sinkhorn_knopp(logits, temperature=0.1, iterations=10)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 64 / 8), rtol=0.15)  # ~ equal mass per prototype
    assert torch.softmax(logits / 0.1, dim=-1)[:, 3].sum() > 0.9 * 64  # the raw softmax: nearly all on one


def test_block_and_random_masks():
    rng = random.Random(0)
    mask = block_mask((8, 8), 20, rng)
    assert mask.shape == (8, 8) and 4 <= mask.sum() <= 20
    masks = sample_masks(10, (8, 8), ratio=(0.1, 0.5), probability=0.5, mode="block", rng=random.Random(1))
    assert masks.shape == (10, 64) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert (counts > 0).sum() == 5 and counts.max() <= 32
    exact = sample_masks(4, (4, 4), ratio=(0.5, 0.5), probability=1.0, mode="random", rng=random.Random(2))
    assert exact.sum(1).tolist() == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        sample_masks(4, (4, 4), mode="checkerboard")


def _views(k=16, b=4, d=12):
    torch.manual_seed(3)
    student = [torch.randn(b, k, requires_grad=True) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(b, k) for _ in range(2)]
    masks = torch.zeros(2 * b, 9, dtype=torch.bool)
    masks[:3, :4] = True
    patches_s, patches_t = torch.randn(12, k, requires_grad=True), torch.randn(12, k)
    features = [torch.randn(b, d, requires_grad=True) for _ in range(2)]
    return student, teacher, patches_s, patches_t, masks, features


def test_combined_loss_is_dino_plus_ibot_plus_a_tenth_of_koleo():
    student, teacher, ps, pt, masks, features = _views()
    objective = DINOv2Loss(16)
    terms = objective(student, teacher, ps, pt, masks, features, teacher_temp=0.04)
    assert terms["dino"].item() == pytest.approx(DINOLoss(16)(student, teacher, 0.04).item())
    assert terms["ibot"].item() == pytest.approx(IBOTPatchLoss(16)(ps, pt, masks, 0.04).item())
    assert terms["koleo"].item() == pytest.approx(sum(koleo_loss(f) for f in features).item())
    total = terms["dino"] + terms["ibot"] + 0.1 * terms["koleo"]
    assert terms["loss"].item() == pytest.approx(total.item())
    terms["loss"].backward()
    assert all(t.grad is not None for t in student + [ps] + features)
    assert objective.dino.center.abs().sum() > 0 and objective.ibot.center.abs().sum() > 0


def test_sinkhorn_knopp_objective_and_switched_off_terms():
    student, teacher, ps, pt, masks, features = _views()
    sk = DINOv2Loss(16, centering="sinkhorn_knopp")(student, teacher, ps, pt, masks, features, 0.04)
    assert torch.isfinite(sk["loss"])
    no_ibot = DINOv2Loss(16, ibot_weight=0.0, koleo_weight=0.0)(student, teacher, None, None, None, features, 0.04)
    assert no_ibot["ibot"].item() == 0.0 and no_ibot["loss"].item() == pytest.approx(no_ibot["dino"].item())
