"""The DINO objective: centring prevents collapse, EMA, schedules, head."""
import copy

import pytest
import torch

from nnunet_tpp.pretext.dino import (DINOConfig, DINOHead, DINOLoss, cosine_schedule, ema_update,
                                     teacher_temperature)


def test_loss_is_the_cross_entropy_over_pairs_of_different_views():
    torch.manual_seed(0)
    loss_fn = DINOLoss(8, student_temp=0.1, center_momentum=0.9)
    student = [torch.randn(4, 8) for _ in range(3)]
    teacher = [torch.randn(4, 8) for _ in range(2)]
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    expected = 0.0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i != j:
                expected += (-(torch.softmax(t / 0.04, -1)) * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item() / 4, rel=1e-5)
    assert torch.allclose(loss_fn.center, 0.1 * torch.cat(teacher).mean(0, keepdim=True))


def test_centring_keeps_a_dominant_dimension_from_collapsing_the_targets():
    loss_fn = DINOLoss(16, center_momentum=0.0)  # centre = last batch mean
    dominated = torch.zeros(32, 16)
    dominated[:, 3] = 10.0  # every teacher output votes for prototype 3
    dominated += 0.5 * torch.randn(32, 16)
    loss_fn.update_center(dominated)
    targets = torch.softmax((dominated - loss_fn.center) / 0.07, dim=-1)
    uncentred = torch.softmax(dominated / 0.07, dim=-1)
    assert uncentred.argmax(-1).eq(3).all()  # without centring: one prototype for everything (collapse)
    assert targets.argmax(-1).unique().numel() > 4  # centred: the targets spread over prototypes


def test_ema_moves_only_trained_parameters():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    student[0].requires_grad_(False)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(student, teacher, momentum=0.75)
    after = dict(teacher.named_parameters())
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert torch.allclose(after["1.weight"], 0.75 * before["1.weight"] + 0.25 * student[1].weight)


def test_schedules_follow_the_recipe():
    values = cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=2)
    assert values[:3] == [0.0, 0.5, 1.0] and len(values) == 10
    assert all(a > b for a, b in zip(values[2:], values[3:])) and values[-1] < 0.05  # cosine towards the end value
    cfg = DINOConfig()
    assert teacher_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 15) == pytest.approx(0.055)
    assert teacher_temperature(cfg, 100) == pytest.approx(0.07)
    assert cfg.lr(64) == pytest.approx(1e-4 * 64 / 256)


def test_head_outputs_prototype_logits_with_fixed_norm():
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 64)
    norms = head.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # |w| = 1: logits are cosines
    assert out.abs().max() <= 1.0 + 1e-5
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert "prototypes.parametrizations.weight.original0" not in trainable
