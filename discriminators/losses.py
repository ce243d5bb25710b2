"""GAN losses as tiny pure functions, over the logits of several heads: a list of [B, N_k] tensors, one logit per
head and token.

The hinge acts on every logit by itself (ADD eq. 3 sums it over heads; StyleGAN-T's projected discriminator
applies it to each token), so a head or token that has cleared the margin stops contributing while the others
still get a gradient; a hinge on the sum of token-averaged logits would silence every head at once.
"""
import torch


def hinge_d(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017), per logit, summed over heads:
    sum_k E[max(0, 1 - D_k(real))] + E[max(0, 1 + D_k(fake))]."""
    return sum(torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))


def hinge_g(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss: -sum_k E[D_k(fake)]."""
    return -sum(f.mean() for f in fake_logits)


def per_sample(logits: list[torch.Tensor]) -> torch.Tensor:
    """One score per sample, [B]: the token-averaged logits summed over heads (for logs and R1)."""
    return sum(f.flatten(1).mean(1) for f in logits)
