"""Noise schedules and time grids, as pure functions.

Every teacher is read through one lens, x_t = alpha(t) * x0 + sigma(t) * eps, with t in the
teacher's own units on [0, T] (T = num_train_timesteps = 1000 for SDXL and SD3):
- VP (SDXL): alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), t a train timestep (abar linear between them);
- rectified flow (SD3): alpha = 1 - s, sigma = s, with s = t / T the (shifted) flow sigma.
t < 0 (VP) or t = 0 (flow) is clean data: alpha = 1, sigma = 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from distill.errors import DistillError


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012, beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """abar_t for t = 0..T-1, computed in float32 exactly as diffusers' DDPM-family schedulers do."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)


def vp_alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, sigma at train timestep t: abar from the table, linear between its entries (exact at integer t, and
    differentiable in t for continuous-time methods); t < 0 is clean data."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    tc = t.clamp(0, len(alphas_cumprod) - 1)
    lo = tc.detach().floor().long()
    hi = (lo + 1).clamp(max=len(alphas_cumprod) - 1)
    abar = torch.lerp(alphas_cumprod[lo], alphas_cumprod[hi], (tc - lo).to(alphas_cumprod.dtype))
    abar = torch.where(t >= 0, abar, torch.ones_like(abar))
    return abar.sqrt(), (1.0 - abar).sqrt()


def flow_alpha_sigma(t: torch.Tensor, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(t, dtype=torch.float32) / num_train_timesteps
    return 1.0 - s, s


def flow_shift(s, shift: float):
    """SD3's resolution shift of flow sigmas (Esser et al. 2024, eq. 23): s' = shift*s / (1 + (shift-1)*s)."""
    return shift * s / (1 + (shift - 1) * s)


def flow_unshift(s, shift: float):
    """The inverse of flow_shift: the sigma that flow_shift maps to s."""
    return s / (shift - (shift - 1) * s)


def vp_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n descending train timesteps, 'trailing' spacing: starts at T-1, e.g. n=50 gives 999, 979, ..., 19.

    For n dividing T this is also LCM's distillation grid (Luo et al. 2023, sec. 4.3)."""
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1
    return torch.from_numpy(ts)


def dynamic_shift(tokens: int, config) -> float:
    """FLUX's shift for an image of `tokens` packed latent tokens: exp(mu), mu interpolated linearly from base_shift
    at base_image_seq_len tokens to max_shift at max_image_seq_len (diffusers' calculate_shift). The scheduler's
    exponential time shift exp(mu) / (exp(mu) + 1/s - 1) is SD3's shift s' = k s / (1 + (k - 1) s) with k = exp(mu)."""
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return math.exp(base + (top - base) * (tokens - lo) / (hi - lo))


def flow_timesteps(n: int, shift: float = 3.0, num_train_timesteps: int = 1000, dynamic: bool = False) -> torch.Tensor:
    """The n descending timesteps (sigma * T) that diffusers' FlowMatchEulerDiscreteScheduler uses. Its last
    unshifted sigma is its smallest train sigma: shifted once more with a static shift, 1/T with a `dynamic` one."""
    sigma_min = 1.0 / num_train_timesteps if dynamic else flow_shift(1.0 / num_train_timesteps, shift)
    sigmas = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, n) / num_train_timesteps
    return torch.from_numpy(flow_shift(sigmas, shift).astype(np.float32) * num_train_timesteps)


def flow_student_timesteps(n: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n distinct times for a few-step student of a flow teacher: the shift applied to the evenly spaced sigmas
    1, (n-1)/n, ..., 1/n (4 steps, shift 3: 1000, 900, 750, 500), the flow counterpart of VP's trailing grid.
    FlowMatchEuler's own grid ends at sigma_min (shifted, 0.009), so a re-noising sampler on it would spend its
    last step (and training its last time) on a near-identity denoise: 2 steps would be [1000, 8.9]."""
    sigmas = np.arange(n, 0, -1, dtype=np.float64) / n
    return torch.from_numpy(flow_shift(sigmas, shift).astype(np.float32) * num_train_timesteps)


def with_end(grid: torch.Tensor, end: float) -> torch.Tensor:
    """The grid followed by the clean-data time, so step i goes from grid[i] to grid[i + 1]."""
    return torch.cat([grid.float(), torch.tensor([float(end)])])


def subsample(grid: torch.Tensor, n: int) -> torch.Tensor:
    """n of a descending grid's points, evenly spaced by index from its first (LCMScheduler's rule)."""
    if not 1 <= n <= len(grid):
        raise DistillError(f"--steps {n}: this student samples on its {len(grid)}-point training grid, so it takes 1 "
                           f"to {len(grid)} steps")
    idx = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return grid[torch.from_numpy(idx)]
