"""A LoRA ViT compiled by Inductor (``torch.compile`` with its default backend) trains like the eager one: same
logits, same LoRA and head gradients, one graph. Kept alone and small on purpose: it builds the ViT through the
package's current 2-D builder (``build_vit`` + ``ViTClassifier``), so pointing it at another builder is a change to
``_lora_vit`` only."""
import torch

from nnunet_tpp import peft
from nnunet_tpp.models.vit import build_vit
from nnunet_tpp.models.vit_heads import ViTClassifier


def _lora_vit():
    """A tiny ViT classifier (2 blocks, 16x16 images of 4x4 patches) with LoRA and non-zero LoRA updates (B starts at
    zero, which would hide A's gradient and the update's effect on the logits)."""
    torch.manual_seed(0)
    net = peft.apply(ViTClassifier(build_vit("vit_tiny", img_size=16, patch_size=4, in_chans=1, depth=2,
                                             embed_dim=24, num_heads=2), 3), "lora")
    with torch.no_grad():
        for name, p in peft.target_parameters(net).items():
            p.add_(torch.randn(p.shape) * 0.05)
    return net


def test_inductor_compiles_a_lora_vit_in_one_graph_with_the_eager_gradients():
    net = _lora_vit().train()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])

    def step(model):
        net.zero_grad(set_to_none=True)
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    eager_logits, eager_grads = step(net)
    logits, grads = step(torch.compile(net, fullgraph=True))  # Inductor; fullgraph: a graph break is an error
    assert any("lora" in n for n in grads) and any(n.startswith("head") for n in grads)
    assert grads.keys() == eager_grads.keys()
    assert torch.allclose(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, g in eager_grads.items():
        assert g.abs().max() > 0, name  # every trained parameter gets a gradient
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
