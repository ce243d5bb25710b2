"""Consistency distillation, after Latent Consistency Models (Luo et al. 2023, Algorithm 1).

One student step maps any point of the teacher's probability-flow ODE to its clean end:
f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t). Training enforces self-consistency between
adjacent points of the CFG-augmented teacher ODE, reached by one skipping DDIM step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError, check_choice
from distill.methods.base import LossOut, Method, cfg_scale, check_guidance_range, ranged, uniform
from distill.sampling import randn, renoise_chain
from distill.schedules import subsample, with_end
from distill.solvers import bcast, consistency_scalings, ddim_step


@dataclass
class ConsistencyParams:
    # N, the teacher's DDIM grid (LCM, sec. 4.3: 50 of 1000 timesteps)
    num_teacher_steps: int = ranged(50, 2, teacher_times=True)
    skip: int = ranged(1, 1)  # k, grid intervals one solver step spans (LCM's skipping-step, sec. 4.3)
    # LCM samples omega in [w_min, w_max] = [2, 14] for eps = (1 + omega) eps_c - omega eps_u; here in
    # diffusers' scale w = 1 + omega.
    guidance_min: float = cfg_scale(3.0)
    guidance_max: float = cfg_scale(15.0)
    loss: str = "huber"  # l2 | huber (pseudo-Huber, Song & Dhariwal 2023, eq. 5)
    huber_c: float = ranged(0.001, gt=0.0)
    sigma_data: float = ranged(0.5, gt=0.0)  # at 0, c_skip(0) of LCM eq. 5 is 0/0
    # LCM scales t by 10 in c_skip / c_out so the boundary is sharp; at 0, f(x, t) = x and the student never learns
    timestep_scaling: float = ranged(10.0, gt=0.0)

    def check(self) -> None:
        if self.skip >= self.num_teacher_steps:
            raise ConfigError("method.params.skip", self.skip, f"must be in [1, {self.num_teacher_steps - 1}]")
        check_guidance_range(self.guidance_min, self.guidance_max)
        check_choice("method.params.loss", self.loss, ("l2", "huber"))


class Consistency(Method):
    Params = ConsistencyParams
    reads_ema = True  # the target network theta^- (LCM, Algorithm 1)

    def __init__(self, teacher, student, params: ConsistencyParams):
        super().__init__(teacher, student, params)
        # t_1 > ... > t_N evenly spaced on the teacher's scale (VP: its trailing DDIM grid; flow: shifted sigmas
        # without FlowMatchEuler's sigma_min point, so n-step sampling has no near-zero time), closed by t = 0
        # where f(x, 0) = x (c_skip = 1, c_out = 0).
        self.register_buffer("grid", with_end(teacher.student_timesteps(params.num_teacher_steps), 0.0),
                             persistent=False)

    def consistency_fn(self, x, t, cond, backbone, w):
        """f(x, t) = c_skip(t) x + c_out(t) x0(x, t)  (LCM eq. 5)."""
        x0, _ = self.teacher.predict(x, t, cond, backbone=backbone,
                                     guidance_cond=w if self.student.guidance_input else None)
        c_skip, c_out = consistency_scalings(t, self.params.sigma_data, self.params.timestep_scaling)
        return bcast(c_skip.to(x.device), x) * x + bcast(c_out.to(x.device), x) * x0

    def loss(self, batch, turn) -> LossOut:
        p, teacher, g = self.params, self.teacher, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        n = torch.randint(0, p.num_teacher_steps, (len(x0),), generator=g).to(x0.device)
        t_hi, t_lo = self.grid[n], self.grid[(n + p.skip).clamp(max=p.num_teacher_steps)]
        x_hi = teacher.add_noise(x0, randn(x0.shape, g, x0), t_hi)  # Alg. 1 line 4: z_{t_{n+k}} ~ q(z | x0)
        w = uniform(len(x0), p.guidance_min, p.guidance_max, g, x0)  # Alg. 1 line 3: omega ~ U[w_min, w_max]
        guidance = 1.0 if p.guidance_max == 1.0 else w  # w = 1 everywhere: skip the unconditional pass

        pred = self.consistency_fn(x_hi, t_hi, cond, self.student.backbone, w)
        with torch.no_grad():
            # Alg. 1 line 5: the CFG-augmented teacher solver, one DDIM step from t_{n+k} to t_n (LCM eq. 9).
            x0_t, eps_t = teacher.predict(x_hi, t_hi, cond, guidance=guidance)
            x_lo = ddim_step(x0_t, eps_t, *teacher.alpha_sigma(t_lo))
            # Target network theta^-: the EMA for a full student, the no-grad student itself for a LoRA.
            target = self.consistency_fn(x_lo, t_lo, cond, self.student.target, w)

        diff = pred.float() - target.float()
        if p.loss == "l2":
            loss = diff.pow(2).mean()
        else:
            loss = (diff.pow(2) + p.huber_c**2).sqrt().sub(p.huber_c).mean()
        return LossOut(loss, {"t_mean": float(t_hi.float().mean()), "w_mean": float(w.mean())})

    renoises = True

    def sample_times(self, steps: int) -> list[float]:
        """`steps` points of the training grid, LCMScheduler's choice."""
        return subsample(self.grid[:-1].cpu(), steps).tolist()

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        """Multistep consistency sampling at sample_times(steps)."""
        cfg, w = self.guidance_args(guidance, len(cond))
        x = randn((len(cond), *shape), generator, self.teacher.device)
        return renoise_chain(self.teacher, self.student.backbone, x, cond, self.sample_times(steps), generator, cfg, w,
                             boundary=(self.params.sigma_data, self.params.timestep_scaling))
