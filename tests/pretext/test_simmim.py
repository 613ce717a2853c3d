"""SimMIM as microsoft/SimMIM writes it (``data/data_simmim.py``'s MaskGenerator, ``models/simmim.py``'s mask token,
decoder and loss), on LiteMedSAM's encoder: the mask, the loss by hand, the mask token in place of the stem's
output, and a stage that trains only the target parameters, the mask token and the decoder."""
import pytest
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.litemedsam import LiteMedSAMBackbone, LiteMedSAMSegmenter
from nnunet_tpp.pretext.simmim import MaskedStem, SimMIMPretext, simmim_loss, simmim_mask, upsample_mask


def test_the_mask_hides_exactly_ceil_ratio_of_the_squares_per_image():
    mask = simmim_mask(5, 256, 32, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 8, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.flatten(1).sum(1).tolist() == [39.0] * 5  # ceil(64 * 0.6), as SimMIM's generator
    assert not torch.equal(mask[0], mask[1])
    pixels = upsample_mask(mask, 32)
    assert pixels.shape == (5, 1, 256, 256) and torch.equal(pixels[0, 0, ::32, ::32], mask[0])
    with pytest.raises(ValueError, match="multiple of the mask patch size"):
        simmim_mask(1, 250, 32, 0.6)


def test_the_loss_is_l1_on_the_masked_pixels_over_their_count_and_channels():
    target = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    reconstruction = target.clone()
    reconstruction[:, :, 4:] += 5.0  # wrong only where nothing is masked: no loss
    assert float(simmim_loss(target, reconstruction, mask)) == pytest.approx(0.0, abs=1e-7)
    reconstruction[:, :, :4] += 0.5
    expected = (0.5 * 2 * 3 * 4 * 8) / (2 * 4 * 8 + 1e-5) / 3
    assert float(simmim_loss(target, reconstruction, mask)) == pytest.approx(expected, rel=1e-5)


def test_the_mask_token_replaces_the_stem_output_only_where_masked_and_leaves_no_trace():
    torch.manual_seed(0)
    backbone = LiteMedSAMBackbone(None).eval()
    stem, channels, stride = backbone.simmim_stem()
    assert (channels, stride) == (64, 1)
    image = torch.randn(1, 3, 256, 256)
    prepared = backbone.prepare(image)
    plain_stem = stem(prepared).detach()
    with torch.no_grad():
        plain = backbone(image)
    hook = MaskedStem(stem, channels)
    hook.mask = upsample_mask(simmim_mask(1, 256, 32, 0.6, torch.Generator().manual_seed(1)), 32)
    masked_stem = stem(prepared).detach()
    where = hook.mask.expand_as(masked_stem).bool()
    assert torch.equal(masked_stem[~where], plain_stem[~where])
    assert torch.equal(masked_stem[where], hook.mask_token.detach().expand_as(masked_stem)[where])
    hook.mask = None
    hook.remove()
    with torch.no_grad():
        assert torch.equal(backbone(image), plain)


def test_a_simmim_stage_trains_the_adapters_token_and_decoder_and_lowers_the_held_out_loss():
    torch.manual_seed(0)
    model = peft.apply(LiteMedSAMSegmenter(LiteMedSAMBackbone(), 2), "adapter")
    targets = peft.target_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in targets)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in targets}
    pretext = SimMIMPretext(model.backbone)
    trained = {n for n, p in pretext.named_parameters() if p.requires_grad}
    assert trained == set(targets) | {"stem.mask_token", "decoder.0.weight", "decoder.0.bias"}
    start = {n: p.detach().clone() for n, p in pretext.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in pretext.parameters() if p.requires_grad], lr=1.5e-3)
    images, held_out = torch.randn(2, 3, 256, 256), torch.randn(1, 3, 256, 256)

    def held_out_loss():
        with torch.no_grad():
            return float(pretext(held_out, torch.Generator().manual_seed(7)))

    pretext.train()
    before = held_out_loss()
    for step in range(4):
        loss = pretext(images, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < before
    assert all(not torch.equal(p, start[n]) for n, p in pretext.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)  # BN stats too


def test_the_pretext_runs_under_bfloat16_autocast_and_reaches_every_trained_tensor():
    """The users' GPU path (the stage runs under bfloat16 autocast on CUDA), here on the CPU."""
    torch.manual_seed(0)
    model = peft.apply(LiteMedSAMSegmenter(LiteMedSAMBackbone(None), 2), "adapter")
    targets = peft.target_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in targets)
    pretext = SimMIMPretext(model.backbone).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pretext(torch.randn(1, 3, 256, 256), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    trained = {name: param for name, param in pretext.named_parameters() if param.requires_grad}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.values())
    for name in ("stem.mask_token", "decoder.0.weight",
                 "backbone.image_encoder.layers.1.blocks.0.adapter_attn.up.weight"):  # the adapter's zero-init side
        assert trained[name].grad.abs().sum() > 0, name
