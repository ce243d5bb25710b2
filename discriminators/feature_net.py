"""ADD's discriminator (Sauer et al. 2023, sec. 3.2): trainable heads on a frozen feature network.

The feature network is a ViT from timm (DINOv2 ViT-S/14 in the paper; weights from a local
safetensors file where given, random otherwise, e.g. in tests). Heads read the patch embedding and
several blocks; each is a small spectral-normalised 1-D convolution stack over tokens whose output
is projected onto a conditioning embedding (Miyato & Koyama 2018). For data that are not images
(the exact 2-D teacher) an `mlp` feature network of frozen random layers plays the same role.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from discriminators.teacher_heads import capture
from distill.errors import DistillError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FeatureNetwork(nn.Module):
    """A frozen network and the layers whose tokens the heads read."""

    def __init__(self, kind: str, weights: str | None = None, image_size: int = 224, in_dim: int = 2):
        super().__init__()
        self.kind, self.image_size = kind, image_size
        if kind == "mlp":
            g = torch.Generator().manual_seed(0)  # the same random features on every rank and every run
            layers = [nn.Linear(in_dim, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU()]
            for layer in layers[::2]:
                layer.weight.data = torch.randn(layer.weight.shape, generator=g) / math.sqrt(layer.in_features)
                layer.bias.data.zero_()
            self.net = nn.Sequential(*layers)
            self.layers = (("1", None), ("3", None))
        else:
            import timm

            kwargs = {"img_size": image_size, "num_classes": 0}
            if weights:
                kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
            try:
                self.net = timm.create_model(kind, **kwargs)
            except (RuntimeError, OSError, ValueError) as e:
                raise DistillError(f"cannot build feature network '{kind}' ({str(e).splitlines()[0]}); give a timm "
                                   "ViT name and a local .safetensors for method.params.feature_weights") from e
            depth = len(self.net.blocks)
            picks = sorted({max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4)})
            self.layers = (("patch_embed", None), *((f"blocks.{i}", None) for i in picks))
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None], persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None], persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer tokens for pixels in [-1, 1] (or raw vectors for `mlp`)."""
        if self.kind != "mlp":
            x = nn.functional.interpolate(x.float(), size=self.image_size, mode="bilinear", antialias=True)
            x = ((x + 1) / 2 - self.mean) / self.std
        with capture(self.net, self.layers) as feats:
            self.net(x.float())
        return feats


class ConvHead(nn.Module):
    """Spectral-normalised 1-D convolutions over tokens, with a projection onto the conditioning."""

    def __init__(self, channels: int, cond_dim: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(spectral_norm(nn.Conv1d(channels, hidden, 1)), nn.LeakyReLU(0.2),
                                  spectral_norm(nn.Conv1d(hidden, hidden, 3, padding=1)), nn.LeakyReLU(0.2))
        self.out = spectral_norm(nn.Conv1d(hidden, 1, 1))
        self.cond = nn.Linear(cond_dim, hidden)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(tokens.float().transpose(1, 2))  # [B, hidden, N]
        proj = (h * self.cond(cond)[:, :, None]).sum(1) / math.sqrt(h.shape[1])
        return self.out(h).squeeze(1) + proj  # [B, N]: one logit per token (losses.hinge_d)


class FeatureHeads(nn.Module):
    """One trainable head per layer the feature network exposes; logits per head and token."""

    def __init__(self, channels: list[int], cond_dim: int, hidden: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(ConvHead(c, cond_dim, hidden) for c in channels)

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor) -> list[torch.Tensor]:
        return [head(f, cond.float()) for head, f in zip(self.heads, feats)]
