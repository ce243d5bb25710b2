"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one).

A full student that reads the guidance scale w (student.guidance_embedding) learns to give, in one
network pass, the teacher's classifier-free-guided prediction at w: half the evaluations per step.
Its run can seed progressive distillation (student.init_from, method.params.teacher_from_student).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError, check_choice
from distill.methods.base import LossOut, Method, cfg_scale, check_guidance_range, uniform
from distill.sampling import randn
from distill.solvers import prediction_loss


@dataclass
class GuidanceParams:
    guidance_min: float = cfg_scale(1.0)  # w ~ U[min, max] in diffusers' scale (Meng et al. use w in [0, 4] for 1 + w)
    guidance_max: float = cfg_scale(8.0)
    target: str = "eps"  # x | eps | v | flow (velocity): where the student's prediction meets the guided teacher's

    def check(self) -> None:
        check_guidance_range(self.guidance_min, self.guidance_max)
        check_choice("method.params.target", self.target, ("x", "eps", "v", "flow"))


class Guidance(Method):
    Params = GuidanceParams

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.student.kind != "full" or not cfg.student.guidance_embedding:
            raise ConfigError("student.guidance_embedding", cfg.student.guidance_embedding,
                              "guidance distillation needs student.kind=full and student.guidance_embedding=true")

    def __init__(self, teacher, student, params):
        if teacher.guidance_embedded:
            raise ConfigError("method.name", "guidance", f"the {teacher.family} teacher already reads the guidance "
                              "scale as an input (one pass per guided prediction): there is nothing to distil; "
                              "train another method on it, or use a teacher without embedded guidance")
        if params.target == "flow" and not teacher.flow:
            raise ConfigError("method.params.target", "flow", "is the velocity of a rectified-flow teacher; a VP "
                              "teacher's student matches in x, eps or v")
        super().__init__(teacher, student, params)

    def loss(self, batch, turn) -> LossOut:
        p, teacher, g = self.params, self.teacher, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        t = torch.randint(0, teacher.num_train_timesteps, (len(x0),), generator=g).float().to(x0.device)
        z = teacher.add_noise(x0, randn(x0.shape, g, x0), t)
        w = uniform(len(x0), p.guidance_min, p.guidance_max, g, x0)
        with torch.no_grad():
            x_t, eps_t = teacher.predict(z, t, cond, guidance=w)  # the guided teacher: two passes
        x_s, eps_s = teacher.predict(z, t, cond, backbone=self.student.backbone, guidance_cond=w)  # one pass
        alpha, sigma = (v.to(x0.device) for v in teacher.alpha_sigma(t))
        loss = prediction_loss(x_s, eps_s, x_t, eps_t, alpha, sigma, p.target)
        return LossOut(loss, {"w_mean": w.mean().item()})
