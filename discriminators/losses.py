"""GAN losses as tiny pure functions."""
import torch


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E[D(fake)]."""
    return -fake_logits.mean()
