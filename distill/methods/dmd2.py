"""Improved distribution matching distillation (DMD2; Yin et al. 2024), for VP and flow teachers alike.

The student (generator) is pushed along the difference of two scores at its own noised samples: the frozen
teacher with CFG (real) and a fake score that keeps learning the student's distribution by plain denoising
(DMD, Yin et al. 2023, eq. 7). A GAN term on the fake score's bottleneck features (DMD2 sec. 4.3) replaces the
regression loss (sec. 4.1), and the fake score takes several updates per generator update (sec. 4.2; five
unless train.turn_every sets the student's turn). Multi-step students are trained by backward simulation (sec. 4.4).

A LoRA student's fake score is a second adapter on the same frozen backbone, so one copy of the base weights
serves teacher (adapters off), student (adapter `default`) and fake score (adapter `fake`); a compressed
student's is an adapter on the frozen teacher's backbone. The parts rCM shares (fake score, backward simulation,
the two losses) are in distill/methods/matching.py; constants follow the reference code's SDXL recipe
(tianweiy/DMD2, main/sd_guidance.py and train_sd.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from discriminators.teacher_heads import TeacherHeads, features
from distill.errors import ConfigError
from distill.methods.base import Adversarial, LossOut, family_times, latent_shape, ranged
from distill.methods.matching import MatchingParams, check_fake_score_config, dm_loss, fake_loss, fake_score, simulate
from distill.sampling import randn


@dataclass
class DMD2Params(MatchingParams):
    # {999, 749, 499, 249} on VP; the shifted equivalent on flow teachers
    student_steps: int = ranged(4, 1, teacher_times=True)
    gan_student_weight: float = ranged(5e-3, 0.0)  # the generator's non-saturating GAN loss (DMD2's SDXL recipe)
    gan_fake_weight: float = ranged(1e-2, 0.0)  # the head's classification loss, added to the fake score's
    head_hidden: int = ranged(128, 1)

    def check(self) -> None:
        super().check()
        weights = (self.gan_student_weight, self.gan_fake_weight)
        if (min(weights) > 0) != (max(weights) > 0):
            # one side alone trains a generator against a head that never learns, or disturbs the fake score
            # for nothing; the reference only ever switches both on together
            raise ConfigError("method.params.gan_student_weight/gan_fake_weight", weights,
                              "must be >= 0, and both > 0 (GAN on) or both 0 (GAN off)")

    @property
    def gan(self) -> bool:
        return self.gan_student_weight > 0 or self.gan_fake_weight > 0


class DMD2(Adversarial):
    Params = DMD2Params
    turns = ("student", "fake")  # generator first, then the fake score on fresh (no-grad) samples of it
    extras = ("discriminator", "fake")
    # Five fake-score updates per generator update unless train.turn_every says otherwise (DMD2 sec. 4.2: the
    # reference's experiment scripts set dfake_gen_update_ratio to 5 or 10, though the flag defaults to 1): with
    # one, the fake score lags the generator it must describe.
    default_turn_every = {"student": 5}

    def __init__(self, teacher, student, params: DMD2Params):
        super().__init__(teacher, student, params)
        self.fake = fake_score(teacher, student, params)
        self.layer = teacher.bottleneck_layer()  # the fake score's features have the teacher's shapes
        self.discriminator = TeacherHeads.sized_for(teacher, (self.layer,), params.head_hidden)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        params = cls.parse_params(cfg.method.params)
        check_fake_score_config(cfg, params)
        if params.gan and cfg.data.kind == "prompts":  # every other kind carries real images or latents
            raise ConfigError("data.kind", cfg.data.kind, "DMD2's GAN term needs real images (images, shards, "
                              "latents or digits), or set method.params.gan_student_weight and gan_fake_weight to 0")

    @property
    def needs_latents(self) -> bool:
        return self.params.gan

    def parameters_for(self, turn: str) -> list:
        if turn == "fake":
            return self.fake.trainable_parameters() + list(self.discriminator.parameters())
        return self.student.trainable_parameters()

    def logits(self, x0, cond, g):
        """The head's logits on the fake score's bottleneck tokens (DMD2 sec. 4.3) for x0 noised at its own
        t ~ U[0, T) (reference: independent t for real and fake)."""
        t = family_times(self.teacher, len(x0), g, x0, logit_normal=False)
        with self.fake.active() as backbone:
            x_t = self.teacher.add_noise(x0, randn(x0.shape, g, x0), t)
            feats = features(self.teacher, (self.layer,), x_t, t, cond, backbone)
        return self.discriminator(feats, self.teacher.pooled(cond.pos), t)[0]

    def loss(self, batch, turn) -> LossOut:
        p, g, cond = self.params, batch["generator"], batch["cond"]
        shape = latent_shape(self.teacher, batch)
        grid = self.student_times(p.student_steps, shape)
        if turn == "student":
            x0 = simulate(self.teacher, self.student.backbone, grid, cond, g, shape)
            loss = dm_loss(self.teacher, self.fake, p, x0, cond, g)
            logs = {"dm": loss.item()}
            if p.gan_student_weight > 0:  # non-saturating: softplus(-D(fake))
                gan = F.softplus(-self.logits(x0, cond, g)).mean()
                loss = loss + p.gan_student_weight * gan
                logs["gan"] = gan.item()
            return LossOut(loss, logs)
        with torch.no_grad():
            x0 = simulate(self.teacher, self.student.backbone, grid, cond, g, shape)
        loss = fake_loss(self.teacher, self.fake, x0, cond, g)
        logs = {"denoise": loss.item()}
        if p.gan_fake_weight > 0:
            real_logits, fake_logits = self.logits(batch["latents"].float(), cond, g), self.logits(x0, cond, g)
            cls = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            loss = loss + p.gan_fake_weight * cls
            logs |= {"cls": cls.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}
        return LossOut(loss, logs)
