"""Khan & Fang's model combination: features concatenated for one head, or predictions averaged."""
import pytest
import torch

from nnunet_tpp.models.vit import build_vit
from nnunet_tpp.models.vit_combine import CombinedClassifier


def _vit(seed: int, embed_dim: int = 48, in_chans: int = 1):
    torch.manual_seed(seed)
    return build_vit("vit_tiny", img_size=32, patch_size=4, in_chans=in_chans, depth=2, embed_dim=embed_dim,
                     num_heads=3).eval()


def test_concat_feeds_one_head_with_every_backbones_class_token():
    a, b = _vit(0), _vit(1, embed_dim=96)
    net = CombinedClassifier([a, b], 3, mode="concat").eval()
    x = torch.randn(2, 1, 32, 32)
    assert net.head.in_features == 48 + 96
    expected = net.head(torch.cat([a(x)[:, 0], b(x)[:, 0]], dim=1))
    assert torch.allclose(net(x), expected)


def test_average_is_the_log_of_the_mean_of_each_heads_probabilities():
    a, b = _vit(0), _vit(1)
    net = CombinedClassifier([a, b], 3, mode="average", pool="mean").eval()
    x = torch.randn(2, 1, 32, 32)
    probs = [torch.softmax(h(v(x)[:, 1:].mean(1)), 1) for h, v in zip(net.heads, (a, b))]
    out = net(x)
    assert torch.allclose(out.exp(), (probs[0] + probs[1]) / 2, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-6)  # cross-entropy works on it as on logits


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        CombinedClassifier([_vit(0)], 2)
    with pytest.raises(ValueError, match="input channels"):
        CombinedClassifier([_vit(0), _vit(1, in_chans=3)], 2)
    with pytest.raises(ValueError, match="combine mode"):
        CombinedClassifier([_vit(0), _vit(1)], 2, mode="vote")
