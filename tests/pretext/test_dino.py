"""The DINO objective: centring prevents collapse, EMA, schedules, head (its input standardised with running
statistics that couple no samples), collapse diagnostics."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_tpp.pretext.dino import (CollapseMeter, DINOConfig, DINOHead, DINOLoss, PretextSettingsError,
                                     RunningStandardization, cancel_last_layer_gradients, collapse_warning,
                                     cosine_schedule, ema_update, teacher_temperature)


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
    assert teacher_temperature(cfg, 0) == teacher_temperature(cfg, 100) == pytest.approx(0.01)  # our default
    warm = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07)  # the TPP paper's warm-up
    assert teacher_temperature(warm, 0) == pytest.approx(0.04)
    assert teacher_temperature(warm, 15) == pytest.approx(0.055)
    assert teacher_temperature(warm, 100) == pytest.approx(0.07)
    assert DINOConfig(lr=None).peak_lr(64) == pytest.approx(1e-4 * 64 / 256)  # DINO's rule, when asked for
    assert cfg.peak_lr(2) == cfg.peak_lr(64) == cfg.lr > cfg.min_lr  # the default is absolute


def test_head_outputs_prototype_logits_with_fixed_norm():
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 64)
    norms = head.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # |w| = 1: logits are cosines
    assert out.abs().max() <= 1.0 + 1e-5
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert "prototypes.parametrizations.weight.original0" not in trainable


@pytest.mark.parametrize("kwargs,message", [({"lr": 0.0}, "must be > 0"), ({"lr": -1e-3}, "must be > 0"),
                                            ({"lr": 1e-6, "min_lr": 1e-6}, "below the peak"),
                                            ({"lr": None}, "below the peak"),  # DINO's rule at batch 2: 7.8e-7
                                            ({"head_input_norm": "layer"}, "head_input_norm"),
                                            ({"keep": "both"}, "teacher or student")])
def test_settings_that_cannot_train_are_refused(kwargs, message):
    with pytest.raises(PretextSettingsError, match=message):
        DINOConfig(**kwargs).validate(batch_size=2)


def test_running_statistics_couple_no_samples_while_a_batch_norm_makes_two_views_opposite():
    torch.manual_seed(0)
    common = 5 * torch.randn(1, 16)
    views = common + torch.randn(1, 16) + 0.1 * torch.randn(2, 16)  # two global views of one sample (batch 1)
    batch_norm = DINOHead(16, 32, 24, 8, input_norm="batch").train()
    z = batch_norm.input_norm(views)
    assert F.cosine_similarity(z[0], z[1], dim=0) == pytest.approx(-1.0, abs=1e-4)  # opposite inputs
    running = RunningStandardization(16)
    running.calibrate(common + torch.randn(64, 16))  # statistics of many samples' views
    z = running(views)
    assert F.cosine_similarity(z[0], z[1], dim=0) > 0.9  # the two views stay alike
    head = DINOHead(16, 32, 24, 8).train()
    head.input_norm.calibrate(common + torch.randn(64, 16))
    x = common + torch.randn(6, 16)
    alone = copy.deepcopy(head)(x[:1])  # a batch of 1 works, and gives a sample the output it has in any batch
    assert torch.allclose(copy.deepcopy(head)(x)[:1], alone, atol=1e-6)
    assert not torch.allclose(batch_norm(x)[:2], batch_norm(x[:2]), atol=1e-3)  # a batch norm couples them


def test_running_statistics_per_view_size_and_shared_with_an_eval_teacher():
    norm = RunningStandardization(4, momentum=0.5)
    norm.calibrate(torch.zeros(2, 4) + torch.tensor([[1.0], [3.0]]), group=0)  # mean 2, var 1
    norm.calibrate(torch.full((2, 4), 10.0) + torch.tensor([[1.0], [-1.0]]), group=1)  # mean 10, var 1
    out = norm.eval()(torch.tensor([[2.0] * 4, [10.0] * 4]), groups=[1, 1])
    assert torch.allclose(out, torch.zeros(2, 4), atol=1e-4)  # each group standardised with its own statistics
    before = norm.mean.clone()
    norm(torch.ones(3, 4))
    assert torch.equal(norm.mean, before)  # eval mode (the teacher) never updates them
    norm.train()(torch.full((3, 4), 4.0))
    assert torch.allclose(norm.mean[0], torch.full((4,), 3.0)) and torch.equal(norm.mean[1], before[1])


def test_last_layer_gradients_can_be_cancelled():
    head = DINOHead(8, 16, 12, 4)
    head(torch.randn(3, 8)).sum().backward()
    assert head.last_layer[0].grad is not None
    cancel_last_layer_gradients(head)
    assert head.last_layer[0].grad is None and head.mlp[0].weight.grad is not None


def test_collapse_diagnostics_by_hand():
    k = 16
    uniform = CollapseMeter(k)
    uniform.add(loss=math.log(k) + 0.5, targets=torch.full((4, k), 1 / k))
    row = uniform.result(epoch=1)
    assert row["teacher_entropy"] == pytest.approx(math.log(k)) and row["kl"] == pytest.approx(0.5)
    assert row["log_k"] == pytest.approx(math.log(k)) and "uniform" in collapse_warning(row)
    one = CollapseMeter(k)
    for _ in range(3):
        one.add(loss=0.1, targets=F.one_hot(torch.full((4,), 3), k).float())
    row = one.result(epoch=2)
    assert row["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert row["batch_mean_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert "same prototypes" in collapse_warning(row)
    healthy = CollapseMeter(k)
    healthy.add(loss=1.0, targets=F.one_hot(torch.arange(8) % k, k).float())  # sharp, and spread over 8 prototypes
    row = healthy.result(epoch=3)
    assert row["batch_mean_entropy"] == pytest.approx(math.log(8)) and collapse_warning(row) is None
    assert set(row) == {"epoch", "loss", "teacher_entropy", "batch_mean_entropy", "kl", "log_k"}
