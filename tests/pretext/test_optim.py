"""Weight-decay groups shared by every pretext stage: as the official DINO / MAE / DINOv2 codes, biases and 1-D
parameters (and tokens, position embeddings) get no weight decay; frozen parameters are left out."""
import torch
from torch import nn

from nnunet_tpp.pretext.dino import DINOHead
from nnunet_tpp.pretext.optim import decays, set_weight_decay, weight_decay_groups


def test_biases_and_one_dimensional_parameters_are_exempt():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Linear(4, 3))
    model.scale = nn.Parameter(torch.ones(4))  # e.g. the Conv-Adapter's per-channel scale
    model.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
    model[0].bias.requires_grad_(False)
    decay, exempt = weight_decay_groups(model.named_parameters(), 0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"0.weight", "2.weight"}
    assert {names[id(p)] for p in exempt["params"]} == {"1.weight", "1.bias", "2.bias", "scale", "cls_token"}
    assert decay["weight_decay"] == 0.04 and exempt["weight_decay"] == 0.0 and exempt["no_decay"]
    assert not decays("head.mlp.0.bias", torch.zeros(3, 3)) and decays("x.weight", torch.zeros(3, 3))


def test_schedules_change_only_the_decayed_group():
    head = DINOHead(8, 16, 12, 4)
    optimizer = torch.optim.AdamW(weight_decay_groups(head.named_parameters(), 0.04))
    set_weight_decay(optimizer, 0.4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.4, 0.0]
    # the prototypes' directions decay (as DINO's weight-normed last layer), their fixed norm is frozen
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(head.last_layer[0]) in decayed
    assert all(id(p) not in decayed for n, p in head.named_parameters() if n.endswith("bias"))


def test_per_parameter_clipping_is_the_official_dinos_and_global_clipping_torchs():
    """``per_parameter``: each gradient scaled to norm ``max_norm`` on its own when larger (DINO's
    ``utils.clip_gradients``), the others untouched; ``global``: one norm over all (``clip_grad_norm_``)."""
    from nnunet_tpp.pretext.optim import clip_gradients
    big, small = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])  # norms 5 and 1
    clip_gradients([big, small], 2.0, "per_parameter")
    assert torch.allclose(big.grad.norm(), torch.tensor(2.0), atol=1e-5) and torch.equal(small.grad,
                                                                                       torch.tensor([0.6, 0.8, 0.0]))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])
    clip_gradients([big, small], 2.0, "global")
    total = torch.cat([big.grad, small.grad]).norm()
    assert torch.allclose(total, torch.tensor(2.0), atol=1e-5)
    assert torch.allclose(small.grad.norm() / big.grad.norm(), torch.tensor(0.2), atol=1e-6)  # directions kept
