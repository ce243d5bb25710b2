"""Consistency distillation, after Latent Consistency Models (Luo et al. 2023, Algorithm 1), and its phased form
(Phased Consistency Models, Wang et al. 2024; Hyper-SD's trajectory-segmented distillation, Ren et al. 2024).

One student step maps any point of the teacher's probability-flow ODE to its clean end:
f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t). Training enforces self-consistency between
adjacent points of the CFG-augmented teacher ODE, reached by one skipping DDIM step.

With `phases: K` > 1 the grid is cut into K phases of equal length and f maps a point to its phase's lower edge s
instead, as PCM's code parameterises it: one DDIM step from t to s with the student's own x0 and eps (no c_skip /
c_out; at t = s the step is the identity, the phase's boundary condition). The teacher's solver step never crosses
an edge, and where it lands on one the target is the point itself. The last edge is the teacher's clean time, so
sampling is the student's deterministic DDIM through the K edges, which diffusers' DDIM/Euler schedulers reproduce.
K = 1 is LCM exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError, DistillError, check_choice
from distill.methods.base import LossOut, Method, cfg_scale, check_guidance_range, ranged, uniform
from distill.sampling import randn, renoise_chain
from distill.schedules import subsample
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
    phases: int = ranged(1, 1)  # K: PCM's phases; 1 is LCM

    def check(self) -> None:
        if self.num_teacher_steps % self.phases:
            raise ConfigError("method.params.phases", self.phases,
                              f"must divide num_teacher_steps ({self.num_teacher_steps}): the phases are equal")
        if self.skip >= self.num_teacher_steps:
            raise ConfigError("method.params.skip", self.skip, f"must be in [1, {self.num_teacher_steps - 1}]")
        check_guidance_range(self.guidance_min, self.guidance_max)
        check_choice("method.params.loss", self.loss, ("l2", "huber"))


class Consistency(Method):
    Params = ConsistencyParams
    reads_ema = True  # the target network theta^- (LCM, Algorithm 1)

    def grid(self, shape=None) -> torch.Tensor:
        """t_1 > ... > t_N evenly spaced on the teacher's scale (VP: its trailing DDIM grid; flow: shifted sigmas
        without FlowMatchEuler's sigma_min point, so n-step sampling has no near-zero time), closed by t = 0
        where f(x, 0) = x (c_skip = 1, c_out = 0); with phases, by the teacher's clean time (the last edge)."""
        end = 0.0 if self.params.phases == 1 else self.teacher.end_time
        return self.student_times(self.params.num_teacher_steps, shape, end)

    def consistency_fn(self, x, t, cond, backbone, w, edge=None):
        """f(x, t) = c_skip(t) x + c_out(t) x0(x, t)  (LCM eq. 5); with `edge` (phases > 1), the DDIM step of the
        backbone's x0 and eps from t to the phase's lower edge (PCM)."""
        x0, eps = self.teacher.predict(x, t, cond, backbone=backbone,
                                       guidance_cond=w if self.student.guidance_input else None)
        if edge is not None:
            return ddim_step(x0, eps, *(v.to(x.device) for v in self.teacher.alpha_sigma(edge)))
        c_skip, c_out = consistency_scalings(t, self.params.sigma_data, self.params.timestep_scaling)
        return bcast(c_skip.to(x.device), x) * x + bcast(c_out.to(x.device), x) * x0

    def loss(self, batch, turn) -> LossOut:
        p, teacher, g = self.params, self.teacher, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        n = torch.randint(0, p.num_teacher_steps, (len(x0),), generator=g).to(x0.device)
        span = p.num_teacher_steps // p.phases
        lower = (n // span + 1) * span  # index of the phase's lower edge (the grid's end for K = 1)
        grid = self.grid(x0.shape)
        t_hi, t_lo = grid[n], grid[torch.minimum(n + p.skip, lower)]
        edge = grid[lower] if p.phases > 1 else None
        x_hi = teacher.add_noise(x0, randn(x0.shape, g, x0), t_hi)  # Alg. 1 line 4: z_{t_{n+k}} ~ q(z | x0)
        w = uniform(len(x0), p.guidance_min, p.guidance_max, g, x0)  # Alg. 1 line 3: omega ~ U[w_min, w_max]
        guidance = 1.0 if p.guidance_max == 1.0 else w  # w = 1 everywhere: skip the unconditional pass

        pred = self.consistency_fn(x_hi, t_hi, cond, self.student.backbone, w, edge)
        with torch.no_grad():
            # Alg. 1 line 5: the CFG-augmented teacher solver, one DDIM step from t_{n+k} to t_n (LCM eq. 9).
            x0_t, eps_t = teacher.predict(x_hi, t_hi, cond, guidance=guidance)
            x_lo = ddim_step(x0_t, eps_t, *teacher.alpha_sigma(t_lo))
            # Target network theta^-: the EMA for a full student, the no-grad student itself for a LoRA.
            target = self.consistency_fn(x_lo, t_lo, cond, self.student.target, w, edge)
            if edge is not None:  # the solver landed on the edge: the boundary condition, f = x (PCM's c_skip = 1)
                target = torch.where((t_lo == edge).view(-1, *([1] * (x0.ndim - 1))), x_lo, target)

        diff = pred.float() - target.float()
        if p.loss == "l2":
            loss = diff.pow(2).mean()
        else:
            loss = (diff.pow(2) + p.huber_c**2).sqrt().sub(p.huber_c).mean()
        return LossOut(loss, {"t_mean": float(t_hi.float().mean()), "w_mean": float(w.mean())})

    @property
    def renoises(self) -> bool:
        return self.params.phases == 1  # LCM's multistep sampler; with phases, deterministic DDIM edge to edge

    @classmethod
    def check_config(cls, cfg) -> None:
        k = cfg.method.params.get("phases", 1)
        if k != 1 and cfg.sample.steps != k:
            raise ConfigError("sample.steps", cfg.sample.steps, f"a {k}-phase consistency student samples in {k} steps, "
                              f"one per phase; set sample.steps={k}")

    def sample_times(self, steps: int, shape=None) -> list[float]:
        """`steps` points of the training grid, LCMScheduler's choice; with phases, the K phases' upper edges."""
        k = self.params.phases
        if k > 1:
            if steps != k:
                raise DistillError(f"--steps {steps}: this phased consistency student samples in one step per phase, "
                                   f"{k} steps")
            return self.grid(shape)[:-1:self.params.num_teacher_steps // k].tolist()
        return subsample(self.grid(shape)[:-1].cpu(), steps).tolist()

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        """Multistep consistency sampling at sample_times(steps); with phases, DDIM from edge to edge."""
        if self.params.phases > 1:
            return super().sample(cond, steps, generator, shape, guidance)
        cfg, w = self.guidance_args(guidance, len(cond))
        x = randn((len(cond), *shape), generator, self.teacher.device)
        return renoise_chain(self.teacher, self.student.backbone, x, cond, self.sample_times(steps, shape), generator,
                             cfg, w, boundary=(self.params.sigma_data, self.params.timestep_scaling))
