"""Which LoRA is Hugging Face peft's, and why the CNN LoRA is not: our convolution LoRA computes what peft's computes
(same factors, same output, same merge), but peft's injection renames the adapted weight and, on nnU-Net's networks,
which hold each convolution twice, replaces only one reference and leaves the forward pass unadapted."""
import torch
from torch import nn

from nnunet_tpp import peft


def test_our_conv3d_lora_is_peft_conv3d_lora(micro_stunet):
    from peft import LoraConfig
    from peft.tuners.lora import Conv3d as PeftConv3d
    net = peft.apply(micro_stunet(), "lora", rank=2, alpha=4)
    name, ours = next((n, m) for n, m in net.named_modules() if hasattr(m, "lora_A") and isinstance(m, nn.Conv3d))
    plain = nn.Conv3d(ours.in_channels, ours.out_channels, ours.kernel_size, ours.stride, ours.padding, bias=True)
    with torch.no_grad():
        plain.weight.copy_(ours.weight)
        plain.bias.copy_(ours.bias) if ours.bias is not None else plain.bias.zero_()
        ours.lora_B.weight.normal_()
    theirs = PeftConv3d(plain, "default", config=LoraConfig(r=2, lora_alpha=4), r=2, lora_alpha=4)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if ours.bias is None:
            plain.bias.zero_()
        x = torch.randn(1, ours.in_channels, 8, 8, 8)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        assert torch.allclose(ours.weight + ours.delta_weight(), theirs.get_delta_weight("default") + plain.weight,
                              atol=1e-6)
    assert "base_layer.weight" in dict(theirs.named_parameters()) and "weight" in dict(ours.named_parameters())


def test_peft_injection_leaves_an_nnunet_network_unadapted():
    """nnU-Net's ``ConvDropoutNormReLU`` holds its convolution as ``conv`` and as ``all_modules.0`` and runs the
    latter: ``inject_adapter_in_model`` swaps one reference, so a non-zero LoRA changes nothing computed. Ours
    replaces every reference (``models.sites.replace_module``)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from peft import LoraConfig, inject_adapter_in_model

    def unet():
        torch.manual_seed(0)
        return PlainConvUNet(1, 2, (4, 8), nn.Conv3d, 3, (1, 2), 2, 3, (2,), False, nn.InstanceNorm3d,
                             {"affine": True}, None, None, nn.LeakyReLU).eval()

    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        before = unet()(x)
    hf = unet()
    names = [n for n, m in hf.named_modules() if isinstance(m, nn.Conv3d) and n.endswith(".conv")]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=names), hf)
    ours = peft.apply(unet(), "lora", rank=2)
    with torch.no_grad():
        for net in (hf, ours):
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        assert torch.equal(hf(x), before)  # peft's LoRA never ran
        assert not torch.allclose(ours(x), before)
