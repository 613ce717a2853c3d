"""The TPP pretext stage on crops of the real CT: only target parameters change, a stopped stage resumes,
and target-parameter files are checked against the network."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import STUNet
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler
from nnunet_tpp.pretext.dino import DINOConfig
from nnunet_tpp.pretext.stage import (PretextSchedule, TargetParameterError, load_target_parameters,
                                      run_dino_stage, save_target_parameters)
from tests.conftest import CT_IMAGE, require

POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


class _CTDataset:
    """Stands in for nnU-Net's preprocessed dataset: the real CT, z-scored, at half resolution."""

    def __init__(self):
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(require(CT_IMAGE)))).astype(np.float32)[::2, ::2, ::2]
        self.data = ((ct - ct.mean()) / ct.std())[None]

    def load_case(self, identifier):
        return self.data, None, None, {}


def _net(method="conv_adapter"):
    torch.manual_seed(0)
    return peft.apply(STUNet(1, 3, [1] * 6, [4, 8, 16, 16, 16, 16], POOLS), method)


def _sampler(seed=0):
    return MultiCropSampler(_CTDataset(), ["ct"], (32, 32, 32), (8, 8, 8), MultiCropConfig(n_local=2), seed=seed)


CFG = DINOConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, base_lr=0.05, warmup_epochs=1)


def test_views_have_the_global_and_local_sizes():
    globals_, locals_ = _sampler().sample(3)
    assert len(globals_) == 2 and len(locals_) == 2
    assert globals_[0].shape == (3, 1, 32, 32, 32) and locals_[0].shape == (3, 1, 16, 16, 16)


def test_pretext_trains_only_target_parameters(tmp_path):
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    requires = {n: p.requires_grad for n, p in net.named_parameters()}
    losses = run_dino_stage(net, _sampler().sample, PretextSchedule(epochs=6, iterations_per_epoch=2, batch_size=2,
                                                                     feature_stages=(3, 5)),
                            CFG, torch.device("cpu"), str(tmp_path / "state.pth"), log=lambda m: None,
                            plot_file=str(tmp_path / "tpp.png"))
    targets = set(peft.target_parameters(net))
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= targets
    assert any(n.startswith("conv_blocks_context") for n in changed)
    assert not any(n.startswith("conv_blocks_localization") for n in changed)  # the pretext sees the encoder only
    assert {n: p.requires_grad for n, p in net.named_parameters()} == requires  # supervised freezing restored
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert (tmp_path / "tpp.png").stat().st_size > 0


def test_a_stopped_stage_resumes_where_it_stopped(tmp_path):
    state = str(tmp_path / "state.pth")
    net = _net()
    first = run_dino_stage(net, _sampler().sample, PretextSchedule(epochs=2, iterations_per_epoch=2, batch_size=1,
                                                                    feature_stages=(5,)),
                           CFG, torch.device("cpu"), state, log=lambda m: None)
    messages = []
    losses = run_dino_stage(net, _sampler(1).sample, PretextSchedule(epochs=3, iterations_per_epoch=2, batch_size=1,
                                                                      feature_stages=(5,)),
                            CFG, torch.device("cpu"), state, log=messages.append)
    assert losses[:2] == first and len(losses) == 3
    assert messages[0].startswith("TPP pretext: resuming at epoch 2")


def test_target_parameter_files_are_checked(tmp_path):
    net = _net()
    with torch.no_grad():
        for p in peft.target_parameters(net).values():
            p.normal_()
    save_target_parameters(net, str(tmp_path / "t.pth"))
    fresh = _net()
    load_target_parameters(fresh, str(tmp_path / "t.pth"))
    for name, value in peft.target_parameters(fresh).items():
        assert torch.equal(value, peft.target_parameters(net)[name])
    with pytest.raises(TargetParameterError, match="holds target parameters of conv_adapter"):
        load_target_parameters(_net("lora"), str(tmp_path / "t.pth"))
    with pytest.raises(TargetParameterError, match="not found"):
        load_target_parameters(fresh, str(tmp_path / "missing.pth"))


def test_dino_loss_decreases_on_the_real_ct_with_a_trained_backbone(tmp_path):
    """The backbone is first trained briefly on the CT's own labels (a stand-in for a published STU-Net, whose
    features differ between views; a random backbone's do not), then DINO trains the adapters."""
    import torch.nn.functional as F
    from tests.conftest import CT_LABELS
    torch.manual_seed(0)
    backbone = STUNet(1, 3, [1] * 6, [4, 8, 16, 16, 16, 16], POOLS)
    image = torch.from_numpy(_CTDataset().data[None, :, :48, :48, :48].copy())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(require(CT_LABELS))))[::2, ::2, ::2][:48, :48, :48]
    target = torch.from_numpy(labels.astype(np.int64))[None]
    opt = torch.optim.Adam(backbone.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(backbone(image)[0], target).backward()
        opt.step()
    net = peft.apply(backbone, "conv_adapter")
    cfg = DINOConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, base_lr=1.0, warmup_epochs=1,
                     momentum_teacher=0.99)
    losses = run_dino_stage(net, _sampler().sample, PretextSchedule(epochs=3, iterations_per_epoch=4, batch_size=2,
                                                                     feature_stages=(3, 5)),
                            cfg, torch.device("cpu"), str(tmp_path / "state.pth"), log=lambda m: None)
    assert losses[-1] < 0.8 * losses[0]
