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
from distill.errors import check_choice
from distill.methods.base import Adversarial, LossOut, cfg_scale, latent_shape, ranged
from distill.sampling import ddim_sample, randn


@dataclass
class LADDParams:
    # the student's grid: it learns to denoise from each of these teacher times
    student_steps: int = ranged(4, 1, teacher_times=True)
    # renoising t = round(sigmoid(N(mean, std)) * (T - 1)), biased toward noise (LADD sec. 3.2)
    logit_mean: float = ranged(1.0)
    logit_std: float = ranged(1.0, gt=0.0)
    head_hidden: int = ranged(128, 1)
    real: str = "data"  # data | teacher: what the discriminator sees as real (teacher: its own samples)
    teacher_steps: int = ranged(25, 1, teacher_times=True)  # the teacher's sampling steps for real: teacher
    teacher_guidance: float = cfg_scale(5.0)
    # optional x0-matching term against the teacher (ADD eq. 4 style); LADD uses 0
    distill_weight: float = ranged(0.0, 0.0)

    def check(self) -> None:
        check_choice("method.params.real", self.real, ("data", "teacher"))


class StepSamples:
    """The teacher's samples of one training step, drawn by the step's first turn for each of its (micro-)batches
    and reused by the other turn, which the trainer runs over the same batches in the same order: half the
    teacher's sampling passes. Forgotten at the step's end (step_done), or when the drawing turn runs again after
    the other reused them (a caller that steps without step_done)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.owner, self.reused, self.samples, self.calls = None, False, [], {}

    def get(self, turn: str, prompts: tuple, draw) -> torch.Tensor:
        if turn == self.owner and self.reused:
            self.clear()
        self.owner = self.owner or turn
        i = self.calls.get(turn, 0)  # this turn's i-th batch of the step
        self.calls[turn] = i + 1
        if i < len(self.samples) and self.samples[i][0] == prompts:
            self.reused |= turn != self.owner
            return self.samples[i][1]
        sample = draw()
        if turn == self.owner and i == len(self.samples):
            self.samples.append((prompts, sample))
        return sample


class LADD(Adversarial):
    Params = LADDParams

    def __init__(self, teacher, student, params: LADDParams):
        super().__init__(teacher, student, params)
        self.discriminator = TeacherHeads.sized_for(teacher, teacher.feature_layers(), params.head_hidden)
        self.step_samples = StepSamples()

    @property
    def needs_latents(self) -> bool:
        return self.params.real == "data"

    def logits(self, x0, cond, g):
        """Renoise at t ~ logit-normal, run the frozen teacher, read its features with the heads. LADD sec. 3.2 draws
        t in (0, 1) as sigmoid(N(mean, std)); on the teacher's scale that is (T - 1) * t, rounded: the integer
        times 0..T-1 a VP teacher has (alpha_sigma reads abar at the rounded index, and T itself is past its last
        one); on a flow teacher it tops out at sigma = 0.999."""
        p, T = self.params, self.teacher.num_train_timesteps
        z = torch.randn(len(x0), generator=g) * p.logit_std + p.logit_mean
        t = (torch.sigmoid(z) * (T - 1)).round().to(x0.device)
        x_t = self.teacher.add_noise(x0, randn(x0.shape, g, x0), t)
        feats = features(self.teacher, self.teacher.feature_layers(), x_t, t, cond)
        return self.discriminator(feats, self.teacher.pooled(cond.pos), t), x_t, t

    def real_for(self, batch, turn: str, g) -> torch.Tensor:
        """What the discriminator sees as real for this batch: the data, or with real: teacher the teacher's own
        samples, so no real images are needed (sec. 3.3), drawn once per step for both turns (StepSamples)."""
        if self.params.real == "data":
            return batch["latents"].float()
        shape = latent_shape(self.teacher, batch)
        return self.step_samples.get(turn, tuple(batch["prompt"]), lambda: ddim_sample(
            self.teacher, batch["cond"], self.params.teacher_steps, g, shape, self.params.teacher_guidance))

    def step_done(self, done: int) -> None:
        self.step_samples.clear()

    def loss(self, batch, turn) -> LossOut:
        p, g, cond = self.params, batch["generator"], batch["cond"]
        real = self.real_for(batch, turn, g)
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
