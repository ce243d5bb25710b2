"""What every method is: turns, the parameters each turn trains, and a loss per turn.

The trainer owns optimisers, Accelerate, I/O and logging; a method only computes losses. All
randomness comes from the generator the trainer puts in the batch, so a run repeats exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distill import checkpoint
from distill.config import MAX_STEPS, coerce_params
from distill.errors import ConfigError
from distill.sampling import ddim_sample, randn, renoise_chain
from distill.solvers import loss_space, prediction_loss
from students import Companion, Student
from teachers.base import Teacher


@dataclass
class LossOut:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Holds the teacher, the student (and any discriminator) in one module that Accelerate prepares once."""

    turns: tuple[str, ...] = ("student",)
    Params: type = type(None)  # the method's own typed config, filled from `method.params`
    extras: tuple[str, ...] = ()  # attributes naming the other networks it trains, which checkpoints carry
    reads_ema: bool = False  # whether its loss reads a full student's EMA (student.target); else the EMA is not made

    def __init__(self, teacher: Teacher, student: Student, params):
        super().__init__()
        self.teacher, self.student, self.params = teacher, student, params

    @classmethod
    def parse_params(cls, raw: dict):
        params = coerce_params(cls.Params, raw, "method.params.")
        if hasattr(params, "check"):
            params.check()
        return params

    needs_latents = True  # whether the data must carry images or latents

    def parameters_for(self, turn: str) -> list[nn.Parameter]:
        return self.student.trainable_parameters()

    def loss(self, batch: dict, turn: str) -> LossOut:
        raise NotImplementedError

    def forward(self, batch: dict, turn: str) -> LossOut:
        # Called through the Accelerate-wrapped module so DDP sees every forward.
        return self.loss(batch, turn)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks across config sections that this method needs (run before any model loads)."""

    def guidance_args(self, guidance, n: int) -> tuple:
        """(CFG scale, w input) for sampling at guidance `guidance`: a student that reads w gets it as input
        and runs one pass; any other applies classifier-free guidance."""
        if self.student.guidance_input:
            return 1.0, torch.full((n,), float(guidance))
        return guidance, None

    # How the student samples: deterministic DDIM/Euler steps (False), or denoise to x0 and re-noise with fresh
    # noise at the next time (True: consistency and adversarial students; diffusers' LCM schedulers).
    renoises: bool = False
    # How the student's backbone output is read (None: as the teacher's; progressive's student_output: x or v).
    student_prediction: str | None = None

    def sample_times(self, steps: int) -> list[float]:
        """The `steps` times (teacher units, descending) the student's sampler visits."""
        return self.teacher.timesteps(steps).tolist()

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        """How this method's student samples; by default DDIM on the teacher's grid with the student's backbone."""
        cfg, w = self.guidance_args(guidance, len(cond))
        return ddim_sample(self.teacher, cond, steps, generator, shape, cfg, backbone=self.student.backbone,
                           times=self.sample_times(steps) + [self.teacher.end_time], guidance_cond=w,
                           prediction_type=self.student_prediction)

    def after_step(self, turn: str, step: int) -> None:
        """Called after `turn`'s optimiser step at (0-based) global step `step`."""
        if turn == "student":
            self.student.update_ema()

    def step_done(self, done: int) -> None:
        """Called after every training step, `done` steps in all, whether its updates were skipped or not, and
        before that step's checkpoint."""

    def resume_at(self, step: int) -> None:
        """Restore any step-dependent state after loading a checkpoint taken at `step`."""

    def checkpoint_for(self, steps: int) -> int | None:
        """The training step whose checkpoint samples at `steps` (None: the final one)."""
        return None

    def milestone(self, step: int) -> bool:
        """Whether the student after `step` steps deserves a checkpoint kept whatever the retention."""
        return False

    def phase_starts(self, max_steps: int) -> list[int]:
        """The steps at which the optimisers and LR schedules start afresh, each schedule running to the next start
        (or to max_steps). One phase, [0], unless a method trains in stages with their own optimiser."""
        return [0]

    def sharded_modules(self) -> list[nn.Module]:
        """What `train.fsdp` shards (distill.sharding): every module a turn trains, and the student's EMA."""
        extras = [getattr(self, name) for name in self.extras]
        extras = [net.copy if isinstance(net, Companion) else net for net in extras]  # an adapter is the student's
        return [m for m in (self.student.backbone, self.student.ema, *extras) if m is not None]

    def state_to_save(self) -> dict[str, torch.Tensor]:
        state = {f"student.{k}": v for k, v in self.student.state_to_save().items()}
        for name in self.extras:
            net = getattr(self, name)
            saved = net.state_to_save() if isinstance(net, Companion) else net.state_dict()
            state |= {f"{name}.{k}": v for k, v in saved.items()}
        return state

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        self.student.load_saved(checkpoint.section(state, "student."))
        for name in self.extras:
            net = getattr(self, name)
            saved = checkpoint.section(state, f"{name}.")
            if isinstance(net, Companion):
                net.load_saved(saved)
            else:
                net.load_state_dict(saved)


def check_guidance_range(lo: float, hi: float) -> None:
    """The CFG scales a method draws w from: diffusers' scale, so 1 means no guidance."""
    if not 1.0 <= lo <= hi:
        raise ConfigError("method.params.guidance_min", lo, "need 1 <= guidance_min <= guidance_max")


def check_student_steps(n: int) -> None:
    """A student grid on the teacher's integer times 0..MAX_STEPS - 1 (ADD, LADD, DMD2)."""
    if not 1 <= n <= MAX_STEPS:
        raise ConfigError("method.params.student_steps", n,
                          f"the teacher's grid has times 0..{MAX_STEPS - 1}: need 1 <= student_steps <= {MAX_STEPS}")


def family_times(teacher: Teacher, n: int, generator: torch.Generator, like: torch.Tensor,
                 logit_normal: bool | None = None) -> torch.Tensor:
    """Times as the family's own denoising training draws them (None: by the family): logit-normal for flow
    teachers (Esser et al. 2024, sec. 3.1), uniform over the train timesteps for VP."""
    T = teacher.num_train_timesteps
    if logit_normal is None:
        logit_normal = teacher.flow
    if logit_normal:
        return (torch.sigmoid(torch.randn(n, generator=generator)) * T).to(like.device)
    return torch.randint(0, T, (n,), generator=generator).float().to(like.device)


def denoising_loss(teacher: Teacher, backbone: nn.Module, x0, cond, t, generator: torch.Generator) -> torch.Tensor:
    """The family's own objective for `backbone` at x_t = alpha(t) x0 + sigma(t) noise: epsilon or v for VP
    teachers (Ho et al. 2020; Salimans & Ho 2022), the velocity for flow teachers."""
    noise = randn(x0.shape, generator, x0)
    x_pred, eps_pred = teacher.predict(teacher.add_noise(x0, noise, t), t, cond, backbone=backbone)
    alpha, sigma = (v.to(x0.device) for v in teacher.alpha_sigma(t))
    return prediction_loss(x_pred, eps_pred, x0, noise, alpha, sigma, loss_space(teacher.prediction_type))


def uniform(n: int, lo: float, hi: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(like.device)


class Adversarial(Method):
    """What ADD and LADD share: two turns, a student that denoises from a few teacher times, and the
    few-step sampler that denoises then renoises to the next time (ADD sec. 3.1)."""

    turns = ("discriminator", "student")
    extras = ("discriminator",)
    discriminator: nn.Module

    def __init__(self, teacher: Teacher, student: Student, params):
        super().__init__(teacher, student, params)
        # n distinct useful times from pure noise: {999, 749, 499, 249} (VP), {1000, 900, 750, 500} (flow, shift 3)
        self.register_buffer("student_grid", teacher.student_timesteps(params.student_steps).float(),
                             persistent=False)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.student.guidance_embedding:  # its training never passes w, its sampler would (guidance_args)
            raise ConfigError("student.guidance_embedding", True, f"{cfg.method.name} trains the student without a "
                              "w input, so a student that reads w would get w only when sampling; leave it false")

    def parameters_for(self, turn: str) -> list[nn.Parameter]:
        if turn == "discriminator":
            return list(self.discriminator.parameters())
        return self.student.trainable_parameters()

    def generate(self, x0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """The student's sample from x0 noised to one of its times. The first time gets pure noise, as in
        sampling: ADD sec. 4 sets tau_n = 1000 with zero terminal SNR (Lin et al. 2024). On VP, t = 999 keeps
        sqrt(abar) = 0.068 of the data, which the sampler never has; feeding pure noise at t = 999 (the
        conversion to x0 still reads abar_999, as the sampler's does) makes training and sampling agree without
        changing the teacher's schedule, which an epsilon teacher needs (alpha = 0 has no x0 from eps)."""
        pick = torch.randint(0, len(self.student_grid), (len(x0),), generator=generator).to(x0.device)
        t = self.student_grid[pick]
        noise = randn(x0.shape, generator, x0)
        first = (pick == 0).reshape(-1, *[1] * (x0.ndim - 1))
        x_t = torch.where(first, noise, self.teacher.add_noise(x0, noise, t))
        return self.teacher.predict(x_t, t, cond, backbone=self.student.backbone)[0]

    renoises = True

    def sample_times(self, steps: int) -> list[float]:
        """`steps` distinct times from pure noise (Teacher.student_timesteps), the training grid's for
        steps = student_steps."""
        return self.teacher.student_timesteps(steps).tolist()

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        cfg, w = self.guidance_args(guidance, len(cond))
        x = randn((len(cond), *shape), generator, self.student_grid)
        return renoise_chain(self.teacher, self.student.backbone, x, cond, self.sample_times(steps), generator, cfg, w)
