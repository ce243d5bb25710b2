"""rCM: sCM regularised by distribution matching (Zheng et al. 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", NVlabs/rcm), for every family.

The student's loss is sCM's (distill/methods/scm.py) plus DMD's distribution-matching term at the student's own
few-step samples, and a fake score keeps learning the student's distribution in its own turn. The term, the fake
score and the backward simulation are DMD2's (distill/methods/matching.py: `fake_score`, `simulate`, `dm_loss`,
`fake_loss`), without its GAN head: the sCM term keeps the student on the teacher's trajectories (mode coverage),
the DMD term sharpens its few-step samples. Both terms read one guided teacher (the reference's single
teacher_guidance): guidance_min = guidance_max = real_guidance.

`dmd_weight` is in the reference's units (its loss: 100 L_sCM + 1 L_DMD, so 0.01), whose sCM term divides the
tangent by its L2 norm and sums over the D elements of a sample, and whose DMD term has no 1/2. Here the tangent is
divided by its root mean square and both terms are means, so the same balance of gradients takes the weight
2 sqrt(D) / sigma_d * dmd_weight (sigma_d: the reference's is 1), whatever the latent size.

As in the reference, the DMD term joins after the tangent warm-up (counted in training steps). Departures
(docs/methods/rcm.md): the student trains every `train.turn_every` steps from the first (the reference trains it
every step during the warm-up), and the fake score from the first step, several updates per student update;
DMD's times are DMD2's uniform [min, max] * T, not the reference's shifted rectified-flow times; the fake score
learns by the family's own denoising loss, not an x0 loss weighted by 1 / sin^2(t), at the student's learning rate
unless train.turn_learning_rates sets its own (the reference: 0.2x); the simulation's step k is uniform over a
fixed grid (the reference cycles k with the iteration over random times); sCM's own departures (scm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError
from distill.methods.base import LossOut, cfg_scale, latent_shape, ranged
from distill.methods.matching import MatchingParams, check_fake_score_config, dm_loss, fake_loss, fake_score, simulate
from distill.methods.scm import SCM, SCMParams


@dataclass
class RCMParams(SCMParams, MatchingParams):
    dmd_weight: float = ranged(0.01, gt=0.0)  # the DMD term's weight in the reference's units (1 against 100)
    real_guidance: float = cfg_scale(5.0)  # the teacher's CFG in both terms (reference: 5)
    guidance_min: float = cfg_scale(5.0)
    guidance_max: float = cfg_scale(5.0)
    student_steps: int = ranged(4, 1, teacher_times=True)  # the backward simulation's grid (reference: up to 4)

    def check(self) -> None:
        SCMParams.check(self)
        MatchingParams.check(self)
        if not self.guidance_min == self.guidance_max == self.real_guidance:
            raise ConfigError("method.params.real_guidance", self.real_guidance, "rCM's two terms read one guided "
                              "teacher: set guidance_min = guidance_max = real_guidance")


class RCM(SCM):
    Params = RCMParams
    turns = ("student", "fake")
    extras = ("weighting", "fake")
    default_turn_every = {"student": 5}

    def __init__(self, teacher, student, params: RCMParams):
        super().__init__(teacher, student, params)
        self.fake = fake_score(teacher, student, params)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_fake_score_config(cfg, cls.parse_params(cfg.method.params))
        if cfg.student.guidance_embedding:  # the real and fake scores would read no w
            raise ConfigError("student.guidance_embedding", True, "rcm trains the student at the one guidance "
                              "scale its DMD term reads, so a student that reads w has nothing to learn; "
                              "leave it false")

    def parameters_for(self, turn: str) -> list:
        if turn == "fake":
            return self.fake.trainable_parameters()
        return super().parameters_for(turn)

    def generate(self, batch) -> torch.Tensor:
        shape = latent_shape(self.teacher, batch)
        grid = self.student_times(self.params.student_steps, shape)
        return simulate(self.teacher, self.student.backbone, grid, batch["cond"], batch["generator"], shape)

    def dm_scale(self, x0: torch.Tensor) -> float:
        """dmd_weight in this loss's units: 2 sqrt(D) / sigma_d times it (the module's docstring)."""
        return 2 * x0[0].numel() ** 0.5 / self.params.sigma_d * self.params.dmd_weight

    def loss(self, batch, turn) -> LossOut:
        g, cond = batch["generator"], batch["cond"]
        if turn == "fake":
            with torch.no_grad():
                x0 = self.generate(batch)
            loss = fake_loss(self.teacher, self.fake, x0, cond, g)
            return LossOut(loss, {"denoise": loss.item()})
        out = super().loss(batch, turn)
        if self.done < self.params.warmup:  # the DMD term joins after the tangent warm-up
            return out
        x0 = self.generate(batch)
        dm = dm_loss(self.teacher, self.fake, self.params, x0, cond, g)
        return LossOut(out.loss + self.dm_scale(x0) * dm, {**out.logs, "dm": dm.item()})
