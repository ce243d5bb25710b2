"""An exact teacher: class-conditional Gaussian mixtures whose denoiser is known in closed form.

Data: K classes in 2-D; class k is an equal mixture of two Gaussians on opposite sides of a circle,
so its distribution is bimodal and a one-step teacher sample (the posterior mean) falls between
the modes. A distilled student is judged by how close its samples come to the true distribution.

For x_t = alpha*x0 + sigma*eps and x0 ~ sum_m pi_m N(mu_m, s^2 I), the posterior is again a mixture:
  r_m(x_t) ∝ pi_m N(x_t; alpha*mu_m, (alpha^2 s^2 + sigma^2) I)
  E[x0 | x_t] = sum_m r_m (mu_m + alpha*s^2 / (alpha^2 s^2 + sigma^2) * (x_t - alpha*mu_m)).

Three schedules: `vp` (SDXL's), `flow` (SD3's, shift 3) and `flux`, FLUX.1-dev in miniature: a flow whose shift
follows a notional image size (teacher.resolution x width px, (H/16)(W/16) packed tokens, FLUX.1's dynamic shift)
and a guidance-embedded denoiser, whose guidance input w gives the exact CFG prediction in one pass,
E[x0 | x_t, uncond] + w (E[x0 | x_t, class] - E[x0 | x_t, uncond]).
"""
from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from distill.errors import DistillError
from distill.schedules import (dynamic_shift, flow_alpha_sigma, flow_student_timesteps, flow_timesteps,
                               vp_alpha_sigma, vp_alphas_cumprod, vp_timesteps)
from distill.solvers import cfg_combine
from teachers.base import Cond, Teacher


def gmm_components(num_classes: int = 4, radius: float = 1.5):
    """Means [2K, 2] on a circle and the class of each: class k owns angles k and k + K (opposite)."""
    angles = torch.arange(2 * num_classes, dtype=torch.float32) * (math.pi / num_classes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return means, torch.arange(2 * num_classes) % num_classes


class GMMDenoiser(nn.Module):
    """x0-prediction network: the exact posterior mean plus a trainable residual MLP (zero at init). With a
    guidance input, the exact part is the CFG combination at the input w and the MLP reads w too."""

    def __init__(self, num_classes: int = 4, std: float = 0.15, hidden: int = 128, guidance_input: bool = False):
        super().__init__()
        self.guidance_input = guidance_input
        means, owner = gmm_components(num_classes)
        self.register_buffer("means", means)
        self.register_buffer("owner", nn.functional.one_hot(owner, num_classes).float())  # [M, K]
        self.std = std
        self.net = nn.Sequential(nn.Linear(2 + 16 + num_classes + guidance_input, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def exact(self, x, alpha, sigma, label):
        a, s2 = alpha[:, None], self.std**2
        var = a**2 * s2 + sigma[:, None] ** 2  # [B, 1]
        weight = label @ self.owner.T  # [B, M]; all-zero label = unconditional
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
        d2 = ((x[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)  # [B, M]
        r = torch.softmax(weight.clamp(min=1e-30).log() - d2 / (2 * var), dim=1)
        x0_m = self.means[None] + (a * s2 / var)[:, :, None] * (x[:, None, :] - a[:, :, None] * self.means[None])
        return (r[:, :, None] * x0_m).sum(1)

    def forward(self, x, t, label, alpha, sigma, guidance=None):
        # The MLP reads t / 100 (periods of 2 pi 100 to 2 pi 1e5 timesteps): smooth in t, so that a continuous-time
        # method's JVP through it (sCM, sec. 4.1: stable time conditioning) is not dominated by d sin(t) / dt.
        freqs = torch.exp(torch.arange(8, device=x.device) * -math.log(1000.0) / 8) / 100
        temb = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], dim=1)
        # The residual vanishes with the noise, as any denoiser is the identity at sigma = 0 (x0 -> x): else an
        # x0-predicting student can shift its clean end freely, and F = (cos s x - x0) / (sigma_d sin s) of TrigFlow
        # is unbounded, so sCM's boundary condition f(x, 0) = x no longer holds.
        gate = (sigma / (alpha**2 + sigma**2).sqrt())[:, None]
        exact = self.exact(x, alpha, sigma, label)
        if not self.guidance_input:
            return exact + gate * self.net(torch.cat([x, temb, label], dim=1))
        w = torch.ones(len(x)).to(x) if guidance is None else guidance.to(x)
        exact = cfg_combine(exact, self.exact(x, alpha, sigma, torch.zeros_like(label)), w)
        return exact + gate * self.net(torch.cat([x, temb, label, w[:, None] - 1], dim=1))


class GMMTeacher(Teacher):
    family = "gmm"
    prediction_type = "sample"
    makes_images = False
    lora_targets = ("net.0", "net.2", "net.4")
    probe_prompt = "class 0"

    # FLUX.1's scheduler: mu from 0.5 at 256 tokens to 1.15 at 4,096 (1024 px)
    FLUX_SHIFT = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                  "base_shift": 0.5, "max_shift": 1.15}

    def __init__(self, schedule: str = "vp", num_classes: int = 4, shift: float = 3.0, resolution: int = 64,
                 width: int | None = None):
        super().__init__()
        if schedule not in ("vp", "flow", "flux"):
            raise DistillError(f"unknown GMM schedule {schedule!r} (vp, flow or flux)")
        self.schedule, self.num_classes, self.resolution, self.width = schedule, num_classes, resolution, width
        if schedule == "flux":
            shift = dynamic_shift((resolution // 16) * ((width or resolution) // 16), self.FLUX_SHIFT)
        self.shift, self.guidance_embedded = shift, schedule == "flux"
        self.backbone = GMMDenoiser(num_classes, guidance_input=self.guidance_embedded)
        self.register_buffer("alphas_cumprod", vp_alphas_cumprod(), persistent=False)
        self.flow = schedule != "vp"
        self.end_time = 0.0 if self.flow else -1.0
        self.freeze()

    def feature_layers(self):
        return (("net.1", None), ("net.3", None))

    def pooled(self, cond):
        return cond["label"]

    def alpha_sigma(self, t):
        if self.schedule == "vp":
            return vp_alpha_sigma(self.alphas_cumprod, t)
        return flow_alpha_sigma(t, self.num_train_timesteps)

    def timesteps(self, n, shape=None):
        if self.schedule == "flux":  # FluxPipeline's grid, as teachers/flux.py
            return flow_student_timesteps(n, self.shift)
        return vp_timesteps(n) if self.schedule == "vp" else flow_timesteps(n, self.shift)

    def student_timesteps(self, n, shape=None):
        return vp_timesteps(n) if self.schedule == "vp" else flow_student_timesteps(n, self.shift)

    def labels(self, prompts: list[str]) -> torch.Tensor:
        ks = []
        for p in prompts:
            m = re.search(r"(\d+)", p)
            if not m or int(m.group(1)) >= self.num_classes:
                raise DistillError(f"prompt {p!r} names no class 0..{self.num_classes - 1}")
            ks.append(int(m.group(1)))
        return torch.tensor(ks)

    def encode_prompts(self, prompts, negative=None) -> Cond:
        onehot = nn.functional.one_hot(self.labels(prompts), self.num_classes).float().to(self.device)
        return Cond({"label": onehot}, {"label": torch.zeros_like(onehot)})

    def _forward(self, backbone, x, t, cond, guidance_cond):
        alpha, sigma = self.alpha_sigma(t)
        w = None
        if self.guidance_embedded:  # students read the input too; unguided is w = 1
            w = torch.as_tensor(1.0 if guidance_cond is None else guidance_cond, device=x.device).expand(len(x))
        return backbone(x, t, cond["label"], alpha.to(x), sigma.to(x), w)

    def latent_shape(self, height, width):
        return (2,)

    def add_guidance_input(self, backbone):
        if not self.guidance_embedded:
            return super().add_guidance_input(backbone)
        return copy.deepcopy(backbone)  # its guidance input is the w input, as FLUX.1-dev's

    def encode(self, images, generator=None):
        return images

    def decode(self, latents):
        return latents

    def sample_data(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact samples x0 ~ p(x0 | class)."""
        side = torch.randint(0, 2, labels.shape, generator=generator)
        means = self.backbone.means.cpu()[labels + side * self.num_classes]
        return means + self.backbone.std * torch.randn(means.shape, generator=generator)

    def dataset(self, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.num_classes, (size,), generator=g)
        x0 = self.sample_data(labels, g)
        return [{"prompt": f"class {k}", "latents": x} for k, x in zip(labels.tolist(), x0)]


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2E|a-b| - E|a-a'| - E|b-b'| (Székely & Rizzo 2013): 0 iff the laws agree."""
    d = lambda u, v: torch.cdist(u.double(), v.double()).mean()  # noqa: E731
    return float(2 * d(a, b) - d(a, a) - d(b, b))


def class_energy_distance(x: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor) -> float:
    """The energy distance of each class's samples to its own exact samples, averaged over the classes: how far a
    class-conditional sampler is from every class's true law."""
    classes = labels.unique().tolist()
    return sum(energy_distance(x[labels == k], truth[labels == k]) for k in classes) / len(classes)


def mode_coverage(teacher: GMMTeacher, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """How a class-conditional sample covers its class's two modes (means k and k + K, opposite on the circle):
    balance, 1 - |n_a - n_b| / n per class averaged (1: both modes equally, 0: one only, mode collapse), and spread,
    the median distance to the nearest mean over the truth's (std sqrt(2 ln 2), a 2-D Gaussian's median radius):
    1 at the truth, below 1 when samples are drawn in toward the means (mode-seeking), above when they stray."""
    distance = torch.cdist(x.float(), teacher.backbone.means.cpu()).min(1).values
    balance = sum(1 - abs(2 * p - 1) for p in mode_shares(teacher, x, labels)) / teacher.num_classes
    return balance, float(distance.median()) / (teacher.backbone.std * math.sqrt(2 * math.log(2)))


def mode_shares(teacher: GMMTeacher, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each class's share of its samples nearest its second mode (mean k + K): 0.5 when both modes hold as many,
    0 or 1 when one mode holds them all."""
    k = teacher.num_classes
    far = (torch.cdist(x.float(), teacher.backbone.means.cpu()).argmin(1) >= k).float()
    return [float(far[labels == c].mean()) for c in range(k)]
