"""LADD's discriminator (Sauer et al. 2024, sec. 3): small trainable heads on the frozen teacher's features.

The teacher itself is the feature network: forward hooks collect its activations at the layers the
teacher family names (UNet blocks for SDXL, transformer blocks for SD3) while it denoises a renoised
sample, and each head turns one layer's tokens into logits. Nothing of the teacher is copied.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


def tokens(out) -> torch.Tensor:
    """A block's output as [B, N, C] tokens: [B, C, H, W] maps, [B, N, C] sequences or [B, C] vectors."""
    if out.ndim == 4:
        return out.flatten(2).transpose(1, 2)
    return out[:, None, :] if out.ndim == 2 else out


@contextmanager
def capture(backbone: nn.Module, layers: tuple[tuple[str, int | None], ...]):
    """Collect the outputs of named submodules (element `index` of a tuple output) during the block."""
    feats: list[torch.Tensor] = []

    def hook(index):
        return lambda module, inputs, out: feats.append(tokens(out if index is None else out[index]))

    handles = [backbone.get_submodule(name).register_forward_hook(hook(index)) for name, index in layers]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def features(teacher, layers, x_t, t, cond, backbone: nn.Module | None = None) -> list[torch.Tensor]:
    """The tokens of `layers` when `backbone` (the teacher's own, adapters off, by default) denoises x_t at t."""
    with capture(backbone if backbone is not None else teacher.backbone, layers) as feats:
        teacher.predict(x_t, t, cond, backbone=backbone)
    return feats


def time_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    freqs = torch.exp(torch.arange(dim // 2, device=t.device) * -math.log(1000.0) / (dim // 2))
    arg = t.float()[:, None] * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class Head(nn.Module):
    """Per-token MLP with a projection onto the conditioning (Miyato & Koyama 2018): logit = w.f + <f, c>."""

    def __init__(self, channels: int, cond_dim: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.cond = nn.Linear(cond_dim, hidden)

    def forward(self, feats: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        f = self.body(feats.float())
        # [B, N]: one logit per token; the hinge acts on each (discriminators.losses)
        return self.out(f).squeeze(-1) + (f * self.cond(cond)[:, None, :]).sum(-1) / math.sqrt(f.shape[-1])


class TeacherHeads(nn.Module):
    """One head per hooked teacher layer; logits per head and token."""

    def __init__(self, channels: list[int], cond_dim: int, hidden: int = 128):
        super().__init__()
        self.cond_dim = cond_dim
        self.heads = nn.ModuleList(Head(c, cond_dim + 16, hidden) for c in channels)

    @classmethod
    @torch.no_grad()
    def sized_for(cls, teacher, layers, hidden: int = 128) -> "TeacherHeads":
        """One head per layer of `layers`, sized from a probe forward of the teacher."""
        x, cond = teacher.probe()
        feats = features(teacher, layers, x, teacher.num_train_timesteps // 2, cond)
        return cls([f.shape[-1] for f in feats], teacher.pooled(cond.pos).shape[-1], hidden)

    def forward(self, feats: list[torch.Tensor], pooled: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        cond = torch.cat([pooled.float(), time_features(t)], dim=1)
        return [head(f, cond) for head, f in zip(self.heads, feats)]
