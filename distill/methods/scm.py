"""Continuous-time consistency distillation (sCM: Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sec. 4 and Algorithm 1, sCD), for every family through TrigFlow.

TrigFlow (sec. 2): x = cos(s) x0 + sin(s) z, z = sigma_d eps, s in [0, pi/2]. A family point x_t = alpha x0 +
sigma eps is the TrigFlow point x = (cos s / alpha) x_t at tan s = sigma / (alpha sigma_d), for VP and flow teachers
alike (SANA-Sprint maps flow teachers so). The backbone answers at the family point and continuous time
(Teacher.time_at), its (x0, eps) read with the exact alpha, sigma of s; the TrigFlow network output is
F = cos(s) eps - sin(s) x0 / sigma_d (so dx/ds = sigma_d F), and the consistency function
f = cos(s) x - sin(s) sigma_d F is the backbone's x0: the student samples as ADD's does, re-noising x0.

The loss (Algorithm 1, eq. 8 with the tangent warm-up and normalisation of sec. 4.2 and the adaptive weighting of
sec. 4.3): dx/ds = sigma_d F_teacher (with CFG), F^- = stopgrad(F_student),
    g = -cos^2(s) (sigma_d F^- - dx/ds) - r cos(s) sin(s) (x + sigma_d dF^-/ds),   g <- g / (rms(g) + c),
    L = e^{w(s)} / D ||F - F^- - g||^2 - w(s),
with r ramping 0 -> 1 over `warmup` steps, w a linear layer on Fourier features of s (zero at the start), and
s = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2). dF^-/ds is the total derivative along the teacher's ODE:
a Jacobian-vector product through the student with tangents (cos s sin s dx/ds, cos s sin s), as the paper does for
stability (torch.func.jvp, on the math attention kernel: the fused kernels have no forward-mode derivative), or a
central finite difference of the same (`tangent: finite_difference`). The normalisation divides by the root mean
square, not the paper's norm (as NVIDIA FastGen's size-invariant option), so c means the same at every latent size.

The JVP goes through the backbone's time input: sCM sec. 4.1 finds a high-frequency time embedding (1000 t) makes
it unstable. The exact teachers' residual reads t / 100 for this reason; SDXL, SD3 and FLUX keep their 0..1000
sinusoids (docs/methods/scm.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from discriminators.teacher_heads import time_features
from distill.errors import check_choice
from distill.methods.base import LossOut, Renoising, cfg_scale, check_guidance_range, ranged, uniform
from distill.sampling import randn
from distill.solvers import bcast


@dataclass
class SCMParams:
    sigma_d: float = ranged(0.5, gt=0.0)  # TrigFlow's data standard deviation
    p_mean: float = ranged(-1.0, -5.0, 5.0)  # tau ~ N(p_mean, p_std^2), s = arctan(e^tau / sigma_d) (sCM App. G)
    p_std: float = ranged(1.4, gt=0.0)
    tangent_c: float = ranged(0.1, gt=0.0)  # c of the tangent normalisation g / (rms(g) + c)
    warmup: int = ranged(1000, 0)  # steps over which r ramps from 0 to 1 (the paper: 10k)
    prior_weighting: bool = False  # weight the loss by 1 / (sigma_d tan s) = alpha / sigma (SANA-Sprint's prior)
    tangent: str = "jvp"  # jvp | finite_difference
    fd_step: float = ranged(1e-3, gt=0.0)  # h of the central difference, in s
    guidance_min: float = cfg_scale(3.0)  # the teacher's CFG scale w ~ U[guidance_min, guidance_max]
    guidance_max: float = cfg_scale(3.0)

    def check(self) -> None:
        check_choice("method.params.tangent", self.tangent, ("jvp", "finite_difference"))
        check_guidance_range(self.guidance_min, self.guidance_max)


class SCM(Renoising):
    Params = SCMParams
    extras = ("weighting",)

    def __init__(self, teacher, student, params: SCMParams):
        super().__init__(teacher, student, params)
        self.weighting = nn.Linear(16, 1)  # w(s), the adaptive weight; zero at the start
        nn.init.zeros_(self.weighting.weight)
        nn.init.zeros_(self.weighting.bias)
        # s between the family's time 1 and its last train timestep, where the map to the family point is finite
        ends = teacher.alpha_sigma(torch.tensor([1.0, teacher.num_train_timesteps - 2.0]))
        self.s_range = [math.atan(float(s / a) / params.sigma_d) for a, s in zip(*ends)]
        self.done = 0

    def parameters_for(self, turn: str) -> list[nn.Parameter]:
        return [*self.student.trainable_parameters(), *self.weighting.parameters()]

    def step_done(self, done: int) -> None:
        self.done = done

    def resume_at(self, step: int) -> None:
        self.done = step

    def family_scales(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's (alpha, sigma) with sigma / alpha = sigma_d tan(s)."""
        ratio = self.params.sigma_d * torch.tan(s)
        alpha = 1 / (1 + ratio) if self.teacher.flow else torch.rsqrt(1 + ratio**2)
        return alpha, ratio * alpha

    def trig_F(self, backbone, x, s, cond, guidance=1.0, w=None) -> torch.Tensor:
        """F(x, s) of TrigFlow from the backbone's (x0, eps) at the family point of (x, s)."""
        sd, cos, sin = self.params.sigma_d, torch.cos(s), torch.sin(s)
        alpha, sigma = self.family_scales(s)
        x0, eps = self.teacher.predict(bcast(alpha / cos, x) * x, self.teacher.time_at(alpha, sigma), cond, guidance,
                                       backbone, w, scales=(alpha, sigma))
        return bcast(cos, x) * eps - bcast(sin / sd, x) * x0

    def tangent(self, x, s, cond, dxds, w) -> torch.Tensor:
        """cos(s) sin(s) dF^-/ds along the ODE: the derivative of F^- in the direction (dx/ds, 1), scaled."""
        cs = torch.cos(s) * torch.sin(s)
        dx, ds = bcast(cs, x) * dxds, cs

        def F(x_, s_):
            return self.trig_F(self.student.backbone, x_, s_, cond, w=w)
        if self.params.tangent == "finite_difference":
            h = self.params.fd_step
            return (F(x + h * dx, s + h * ds) - F(x - h * dx, s - h * ds)) / (2 * h)
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F, (x, s), (dx, ds))[1]

    def loss(self, batch, turn) -> LossOut:
        p, g = self.params, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        n, sd = len(x0), p.sigma_d
        tau = p.p_mean + p.p_std * torch.randn(n, generator=g)
        s = torch.atan(tau.exp() / sd).clamp(*self.s_range).to(x0.device)
        x = bcast(torch.cos(s), x0) * x0 + bcast(torch.sin(s) * sd, x0) * randn(x0.shape, g, x0)
        w_cfg = uniform(n, p.guidance_min, p.guidance_max, g, x0)
        w = w_cfg if self.student.guidance_input else None
        with torch.no_grad():
            dxds = sd * self.trig_F(None, x, s, cond, guidance=1.0 if p.guidance_max == 1.0 else w_cfg)
            dF = self.tangent(x, s, cond, dxds, w)  # cos s sin s dF^-/ds
        F = self.trig_F(self.student.backbone, x, s, cond, w=w)
        F_minus = F.detach()
        r = min(1.0, self.done / p.warmup) if p.warmup else 1.0
        cos, cs = bcast(torch.cos(s), x), bcast(torch.cos(s) * torch.sin(s), x)
        target = -cos**2 * (sd * F_minus - dxds) - r * (cs * x + sd * dF)
        norm = target.flatten(1).pow(2).mean(1).sqrt()  # the root mean square: the same c at every size
        target = target / bcast(norm + p.tangent_c, target)
        weight = self.weighting(time_features(s * 2000 / math.pi)).squeeze(1)  # s in [0, pi/2] as 0..1000
        per_sample = (F - F_minus - target).flatten(1).pow(2).sum(1) / x[0].numel()
        if p.prior_weighting:
            per_sample = per_sample / (sd * torch.tan(s))
        loss = (weight.exp() * per_sample - weight).mean()
        return LossOut(loss, {"s_mean": float(s.mean()), "tangent_norm": float(norm.mean()), "warmup_r": r})
