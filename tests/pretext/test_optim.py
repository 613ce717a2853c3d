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
