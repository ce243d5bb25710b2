"""Adversarial diffusion distillation (ADD; Sauer et al. 2023, SDXL-Turbo).

The student denoises latents noised to one of a few teacher times. Its sample is decoded to pixels
and judged by a discriminator of trainable heads on a frozen ViT (hinge loss, R1 penalty on real
images), and pulled toward the teacher by a distillation term: renoise the sample, let the teacher
denoise it, and match, weighted by c(t) (ADD eq. 5).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from discriminators.feature_net import FeatureHeads, FeatureNetwork
from discriminators.losses import hinge_d, hinge_g, per_sample
from distill.errors import ConfigError
from distill.config import MAX_PIXELS
from distill.methods.base import Adversarial, LossOut, cfg_scale, ranged
from distill.sampling import randn
from distill.solvers import bcast


@dataclass
class ADDParams:
    # ADD's student times: {999, 749, 499, 249} on the VP scale for 4 steps
    student_steps: int = ranged(4, 1, teacher_times=True)
    feature_net: str = "vit_small_patch14_dinov2"  # a timm ViT name, or mlp for non-image data
    feature_weights: str | None = None  # local .safetensors of the ViT (random weights if unset)
    # pixels are resized to this before the ViT: at least one 16-pixel patch, at most the largest image
    feature_size: int = ranged(224, 16, MAX_PIXELS)
    head_hidden: int = ranged(64, 1)
    distill_weight: float = ranged(2.5, 0.0)  # lambda of ADD eq. 5
    teacher_guidance: float = cfg_scale(1.0)  # CFG of the teacher in the distillation target
    r1_gamma: float = ranged(1e-5, 0.0)  # R1 penalty on real images (Mescheder et al. 2018)

    def check(self) -> None:
        if self.feature_weights and not self.feature_weights.endswith(".safetensors"):
            raise ConfigError("method.params.feature_weights", self.feature_weights, "must be a .safetensors file")


class ADD(Adversarial):
    Params = ADDParams

    def __init__(self, teacher, student, params: ADDParams):
        super().__init__(teacher, student, params)
        with torch.no_grad():
            latents, cond = teacher.probe()
            pixels = teacher.decode(latents)
            self.feature_net = FeatureNetwork(params.feature_net, params.feature_weights, params.feature_size,
                                              pixels.shape[-1]).to(teacher.device)
            channels = [f.shape[-1] for f in self.feature_net(pixels)]
            cond_dim = teacher.pooled(cond.pos).shape[-1]
        self.discriminator = FeatureHeads(channels, cond_dim, params.head_hidden)

    def logits(self, pixels, cond):
        return self.discriminator(self.feature_net(pixels), self.teacher.pooled(cond.pos))

    def loss(self, batch, turn) -> LossOut:
        p, g, cond, x0 = self.params, batch["generator"], batch["cond"], batch["latents"].float()
        if turn == "discriminator":
            with torch.no_grad():
                fake = self.teacher.decode(self.generate(x0, cond, g))
                real = batch["image"] if "image" in batch else self.teacher.decode(x0)
            real = real.float().detach().requires_grad_(p.r1_gamma > 0)
            # R1 differentiates twice; fused attention kernels have no double backward, the math one has.
            with sdpa_kernel(SDPBackend.MATH) if p.r1_gamma > 0 else contextlib.nullcontext():
                real_logits = self.logits(real, cond)
            fake_logits = self.logits(fake, cond)
            real_score, fake_score = per_sample(real_logits), per_sample(fake_logits)
            loss, logs = hinge_d(real_logits, fake_logits), {"d_real": real_score.mean().item(),
                                                             "d_fake": fake_score.mean().item()}
            if p.r1_gamma > 0:  # R1: gamma/2 * E||grad_x D(x)||^2 on real data, D = the per-sample score
                (grad,) = torch.autograd.grad(real_score.sum(), real, create_graph=True)
                r1 = grad.pow(2).flatten(1).sum(1).mean()
                loss = loss + p.r1_gamma / 2 * r1
                logs["r1"] = r1.item()
            return LossOut(loss, logs)
        sample = self.generate(x0, cond, g)
        adv = hinge_g(self.logits(self.teacher.decode(sample), cond))
        logs = {"g_adv": adv.item()}
        loss = adv
        if p.distill_weight > 0:
            # ADD eq. 5: renoise the student's sample at t ~ U over teacher times, denoise with the teacher,
            # weight by c(t) = abar_t = alpha_t^2 (the paper's exponential weighting).
            t = torch.randint(0, self.teacher.num_train_timesteps, (len(x0),), generator=g).float().to(x0.device)
            with torch.no_grad():
                x_t = self.teacher.add_noise(sample.detach(), randn(x0.shape, g, x0), t)
                target = self.teacher.predict(x_t, t, cond, p.teacher_guidance)[0]
            c = bcast(self.teacher.alpha(t).to(x0.device) ** 2, sample)
            distill = (c * (sample - target) ** 2).mean()
            loss = loss + p.distill_weight * distill
            logs["distill"] = distill.item()
        return LossOut(loss, logs)
