"""Plain denoising-diffusion training: pre-train or fine-tune a teacher with the trainer used for distillation.

The loss is the teacher family's own objective: epsilon or v prediction for VP teachers (Ho et al.
2020; Salimans & Ho 2022), velocity eps - x0 for flow teachers with logit-normal times (Esser et al.
2024, sec. 3.1). Prompts are dropped with probability `uncond_prob` so the model learns the
unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError, check_choice
from distill.methods.base import LossOut, Method, denoising_loss, family_times, ranged

@dataclass
class DenoiseParams:
    uncond_prob: float = ranged(0.1, 0.0, lt=1.0)  # 1 would never show the model a prompt
    time_sampling: str = "auto"  # uniform | logit_normal | auto (logit-normal for flow teachers)

    def check(self) -> None:
        check_choice("method.params.time_sampling", self.time_sampling, ("auto", "uniform", "logit_normal"))


class Denoise(Method):
    Params = DenoiseParams

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.student.kind == "full" and cfg.student.guidance_embedding:
            raise ConfigError("student.guidance_embedding", True, "denoising training learns CFG by prompt dropout")

    def loss(self, batch, turn) -> LossOut:
        p, teacher, g = self.params, self.teacher, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        n = len(x0)
        t = family_times(teacher, n, g, x0, {"auto": None, "logit_normal": True, "uniform": False}[p.time_sampling])
        drop = (torch.rand(n, generator=g) < p.uncond_prob).to(x0.device)
        loss = denoising_loss(teacher, self.student.backbone, x0, cond.dropped(drop), t, g)
        return LossOut(loss, {"uncond_share": drop.float().mean().item()})
