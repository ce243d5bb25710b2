"""Prediction conversions and solver steps, written once for every teacher family."""
from __future__ import annotations

import torch


def bcast(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] value shaped to broadcast against a [B, ...] tensor."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def to_x0_eps(out: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str):
    """(x0, eps) from a network output, given x = alpha*x0 + sigma*eps.

    v-prediction follows Salimans & Ho 2022 (v = alpha*eps - sigma*x0); flow velocity follows
    SD3 (v = eps - x0, for alpha = 1 - sigma)."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, s * x + a * out
    if prediction_type == "flow":
        return x - s * out, x + (1 - s) * out
    if prediction_type == "sample":
        return out, (x - a * out) / s.clamp(min=1e-8)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_s, sigma_s) -> torch.Tensor:
    """Deterministic DDIM step to time s (Song et al. 2021, eq. 12 with sigma=0).

    Under a linear flow (alpha = 1 - sigma) this is exactly the Euler step of the flow ODE, and under
    VP it equals the Euler step of the variance-exploding ODE in x/alpha, so one solver serves all."""
    return bcast(alpha_s, x0) * x0 + bcast(sigma_s, x0) * eps


def one_step_target(z: torch.Tensor, z2: torch.Tensor, alpha, sigma, alpha2, sigma2) -> torch.Tensor:
    """The x0 with which one DDIM step takes z (at alpha, sigma) to z2 (at alpha2, sigma2): Salimans & Ho 2022,
    Algorithm 2, x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha). At sigma2 = 0 it is z2."""
    ratio = bcast(sigma2 / sigma, z)
    return (z2 - ratio * z) / (bcast(alpha2, z) - ratio * bcast(alpha, z))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance at diffusers' scale w: uncond + w * (cond - uncond); w = 1 is no guidance."""
    return uncond + bcast(scale, cond) * (cond - uncond)


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's boundary-condition scalings c_skip, c_out (Luo et al. 2023, eq. 5 / Song et al. 2023, eq. 8).

    c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x. t is in train timesteps, scaled as diffusers does."""
    st = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of w (as LCM and diffusers' pipelines embed w - 1), [B] -> [B, dim]."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                     * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def loss_space(prediction_type: str) -> str:
    """The space a family's own denoising loss compares in (prediction_loss): eps, v, flow or x."""
    return {"epsilon": "eps", "v_prediction": "v", "flow": "flow", "sample": "x"}[prediction_type]


def prediction_loss(x_pred, eps_pred, x_target, eps_target, alpha, sigma, space: str) -> torch.Tensor:
    """Mean squared error between two predictions of the same x_t, compared as x (weighted by the truncated SNR
    max(alpha^2 / sigma^2, 1), Salimans & Ho 2022, sec. 4), as eps, as v = alpha*eps - sigma*x, or as the flow
    velocity eps - x."""
    a, s = bcast(alpha, x_pred), bcast(sigma, x_pred)
    if space == "x":
        return (torch.clamp(a**2 / s**2, min=1.0) * (x_pred - x_target) ** 2).mean()
    if space == "eps":
        return ((eps_pred - eps_target) ** 2).mean()
    if space == "v":
        return ((a * eps_pred - s * x_pred) - (a * eps_target - s * x_target)).pow(2).mean()
    if space == "flow":  # the velocity eps - x0 of a linear flow
        return ((eps_pred - x_pred) - (eps_target - x_target)).pow(2).mean()
    raise ValueError(f"unknown loss space {space!r}")
