"""DINO on Primus: the embedding is the mean of the patch tokens after the last block (checked against Primus run
by hand), views of other sizes are resized to the patch, the network is Primus again afterwards, and a DINO stage with
it trains only the target parameters and the DINO head (frozen weights bit-identical) and writes the target check."""
import torch
import torch.nn.functional as F
from einops import rearrange

from nnunet_tpp import peft
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler
from nnunet_tpp.pretext.dino import DINOConfig
from nnunet_tpp.pretext.stage import PretextSchedule, network_embedding, run_dino_stage
from nnunet_tpp.pretext.token_embedding import TokenEmbedding
from tests.pretext.test_masked_tokens import _primus
from tests.pretext.test_stage import _CTDataset

SIZE = (16, 32, 32)
CFG = DINOConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, warmup_epochs=1)


def test_the_embedding_is_the_mean_patch_token_of_primus_run_by_hand():
    net = _primus()
    embedding = network_embedding(peft.unwrap(net), (-1,), SIZE)
    assert isinstance(embedding, TokenEmbedding) and embedding.dim == 48
    x = torch.randn(2, 1, *SIZE)
    before = net(x)
    with torch.no_grad():
        tokens = rearrange(net.down_projection(x), "b c w h d -> b (w h d) c")
        expected = net.eva(tokens)[0].mean(1)
        assert torch.allclose(embedding(x), expected, atol=1e-5)
        local = torch.randn(2, 1, 8, 16, 16)  # a local view: resized to the patch first
        resized = F.interpolate(local, size=SIZE, mode="trilinear", align_corners=False)
        assert torch.allclose(embedding(local), embedding(resized), atol=1e-6)
    assert torch.equal(net(x), before)  # the output head is back
    assert embedding.reached(peft.target_parameters(net)) == set(peft.target_parameters(net))


def test_a_dino_stage_on_primus_trains_only_target_parameters_and_head_and_writes_the_check(tmp_path):
    from nnunet_tpp.pretext.check import target_check
    from nnunet_tpp.pretext.feed import fixed_set
    net = _primus()
    initial = {n: p.detach().clone() for n, p in peft.target_parameters(net).items()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    source = MultiCropSampler(_CTDataset(), ["ct"], SIZE, (8, 8, 8), MultiCropConfig(n_local=2), seed=0)
    evaluation = fixed_set(MultiCropSampler(_CTDataset(), ["ct"], SIZE, (8, 8, 8), MultiCropConfig(n_local=2),
                                            seed=99), 2, 2)
    schedule = PretextSchedule(epochs=2, iterations_per_epoch=2, batch_size=2, feature_stages=(-1,))
    embedding = network_embedding(peft.unwrap(net), schedule.feature_stages, SIZE)
    losses = run_dino_stage(net, source, schedule, CFG, torch.device("cpu"), str(tmp_path / "state.pth"),
                            log=lambda m: None, embedding=embedding)
    assert len(losses) == 2
    targets = set(peft.target_parameters(net))
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= targets
    check = target_check("dino", net, source, evaluation, schedule, CFG, torch.device("cpu"), initial,
                         str(tmp_path / "state.pth"), str(tmp_path / "control.pth"), log=lambda m: None,
                         embedding=embedding)
    assert check["pretext"] == "dino" and check["relative_change"] > 0 and check["loss_control"] > 0
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if n not in targets)
