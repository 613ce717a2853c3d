"""A TPP pretext step compiled with Inductor, the default ``torch.compile`` backend (as nnU-Net compiles its network
on CUDA), on the CPU: the masked reconstruction's output and the gradients of the target parameters and the output
layer equal eager mode's to float32 rounding. A two-stage nnU-Net U-Net keeps the generated code small (69 kernels;
compiling took 274 s in one run, the whole test 86 s in another, on the shared 2-core machine under a load of 10-15,
to re-measure on a quiet one)."""
import torch

from nnunet_tpp import peft
from nnunet_tpp.pretext.masked import Reconstruction, masked_mse


def _net():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunet_tpp.models.nnunet_networks import prepare_unet
    from tests.models.test_nnunet_checkpoint import COMMON
    torch.manual_seed(0)
    net = prepare_unet(PlainConvUNet(input_channels=1, num_classes=2, n_stages=2, features_per_stage=(4, 8),
                                     strides=(1, 2), n_conv_per_stage=1, n_conv_per_stage_decoder=1, **COMMON))
    net = peft.apply(net, "conv_adapter")
    targets = set(peft.target_parameters(net))
    for name, param in net.named_parameters():
        param.requires_grad_(name in targets)
    return net


def test_a_compiled_masked_reconstruction_step_equals_eager():
    model = Reconstruction(_net())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16, generator=generator)
    mask = (torch.rand(2, 1, 16, 16, 16, generator=generator) > 0.75).float()

    def step(run):
        for param in model.parameters():
            param.grad = None
        out = run(x * mask)
        masked_mse(out, x, mask).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with model.attached():
        eager_out, eager_grads = step(model)
        compiled_out, compiled_grads = step(torch.compile(model))  # no backend argument: Inductor
    assert torch.allclose(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and any(n.startswith("output.") for n in eager_grads)
    assert any(".adapter." in n for n in eager_grads)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-3, atol=1e-6 * float(grad.abs().max())), name
