"""Latent adversarial diffusion distillation (LADD; Sauer et al. 2024, SD3-Turbo).

The student denoises in one of a few steps; a discriminator made of small heads on the frozen
teacher's own features judges its samples against real (or teacher-generated) latents, both
renoised to a time drawn from a logit-normal biased toward high noise. Hinge loss; no
distillation term unless asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from discriminators.losses import hinge_d, hinge_g, per_sample
from discriminators.teacher_heads import TeacherHeads, features
from distill.errors import ConfigError, check_choice
from distill.methods.base import Adversarial, LossOut, check_student_steps
from distill.sampling import ddim_sample, randn


@dataclass
class LADDParams:
    student_steps: int = 4  # the student's grid: it learns to denoise from each of these teacher times
    logit_mean: float = 1.0  # renoising t = sigmoid(N(mean, std)) * T, biased toward noise (LADD sec. 3.2)
    logit_std: float = 1.0
    head_hidden: int = 128
    real: str = "data"  # data | teacher: what the discriminator sees as real (teacher: its own samples)
    teacher_steps: int = 25
    teacher_guidance: float = 5.0
    distill_weight: float = 0.0  # optional x0-matching term against the teacher (ADD eq. 4 style); LADD uses 0

    def check(self) -> None:
        check_student_steps(self.student_steps)
        if self.logit_std <= 0:
            raise ConfigError("method.params.logit_std", self.logit_std, "must be > 0")
        check_choice("method.params.real", self.real, ("data", "teacher"))
        if self.distill_weight < 0:
            raise ConfigError("method.params.distill_weight", self.distill_weight, "must be >= 0")


class LADD(Adversarial):
    Params = LADDParams

    def __init__(self, teacher, student, params: LADDParams):
        super().__init__(teacher, student, params)
        self.discriminator = TeacherHeads.sized_for(teacher, teacher.feature_layers(), params.head_hidden)

    @property
    def needs_latents(self) -> bool:
        return self.params.real == "data"

    def logits(self, x0, cond, g):
        """Renoise at t ~ logit-normal, run the frozen teacher, read its features with the heads."""
        p, T = self.params, self.teacher.num_train_timesteps
        z = torch.randn(len(x0), generator=g) * p.logit_std + p.logit_mean
        t = (torch.sigmoid(z) * (T - 1)).round().to(x0.device)
        x_t = self.teacher.add_noise(x0, randn(x0.shape, g, x0), t)
        feats = features(self.teacher, self.teacher.feature_layers(), x_t, t, cond)
        return self.discriminator(feats, self.teacher.pooled(cond.pos), t), x_t, t

    def loss(self, batch, turn) -> LossOut:
        p, g, cond = self.params, batch["generator"], batch["cond"]
        if p.real == "data":
            real = batch["latents"].float()
        else:  # LADD trains on the teacher's own samples, so no real images are needed (sec. 3.3)
            shape = self.teacher.latent_shape(*self.teacher.size)
            real = ddim_sample(self.teacher, cond, p.teacher_steps, g, shape, p.teacher_guidance)
        if turn == "discriminator":
            with torch.no_grad():
                fake = self.generate(real, cond, g)
            real_logits, fake_logits = self.logits(real, cond, g)[0], self.logits(fake, cond, g)[0]
            return LossOut(hinge_d(real_logits, fake_logits),
                           {"d_real": per_sample(real_logits).mean().item(),
                            "d_fake": per_sample(fake_logits).mean().item()})
        fake = self.generate(real, cond, g)
        fake_logits, x_t, t = self.logits(fake, cond, g)
        loss, logs = hinge_g(fake_logits), {"g_adv": per_sample(fake_logits).mean().item()}
        if p.distill_weight > 0:
            with torch.no_grad():
                target = self.teacher.predict(x_t, t, cond)[0]
            distill = (fake - target).pow(2).mean()
            loss = loss + p.distill_weight * distill
            logs["distill"] = distill.item()
        return LossOut(loss, logs)
