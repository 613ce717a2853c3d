"""Several self-supervised ViT backbones in one classifier (Khan & Fang: combining SSL models adds up to
+3.57%): the backbones see the same image; their pooled features are concatenated for one linear head
(``concat``), or each backbone has its own head and the class probabilities are averaged (``average``).

Parameter names are ``backbones.<i>.<timm name>``; the heads (``head`` / ``heads``) always train. A PEFT
method applied to this model adapts every backbone.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_tpp.models.vit import VisionTransformer
from nnunet_tpp.models.vit_heads import VIT_PEFT_DEFAULTS

MODES = ("concat", "average")


class CombinedClassifier(nn.Module):
    """Image -> class logits from several backbones.

    Args:
        backbones: the ViTs (any widths; same input channels).
        num_classes: classes.
        mode: ``concat`` (features concatenated, one head) or ``average`` (one head per backbone; the
            output is the log of the mean of their softmax probabilities, so cross-entropy and argmax work
            on it as on logits).
        pool: ``cls`` or ``mean`` (as :class:`~nnunet_tpp.models.vit_heads.ViTClassifier`).
    """

    head_prefixes = ("head", "heads")
    peft_defaults = VIT_PEFT_DEFAULTS

    def __init__(self, backbones: list[VisionTransformer], num_classes: int, mode: str = "concat",
                 pool: str = "cls"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"combine mode must be one of {MODES}, got {mode!r}")
        if len(backbones) < 2:
            raise ValueError("a combined classifier needs at least two backbones")
        chans = {b.config.in_chans for b in backbones}
        if len(chans) != 1:
            raise ValueError(f"the backbones take different input channels {sorted(chans)}")
        self.backbones = nn.ModuleList(backbones)
        self.mode, self.pool = mode, pool
        dims = [b.embed_dim for b in backbones]
        if mode == "concat":
            self.head = nn.Linear(sum(dims), num_classes)
        else:
            self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.out_features == num_classes:
                nn.init.trunc_normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.size_name = "+".join(f"d{b.config.embed_dim}x{b.config.depth}-p{b.config.patch_size}" for b in backbones)

    def _pooled(self, backbone: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
        tokens = backbone(image)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, backbone.num_prefix_tokens:].mean(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        features = [self._pooled(b, image) for b in self.backbones]
        if self.mode == "concat":
            return self.head(torch.cat(features, dim=1))
        probs = torch.stack([torch.softmax(h(f).float(), 1) for h, f in zip(self.heads, features)]).mean(0)
        return probs.clamp_min(1e-12).log()
