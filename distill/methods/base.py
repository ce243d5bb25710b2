"""What every method is: turns, the parameters each turn trains, and a loss per turn.

The trainer owns optimisers, Accelerate, I/O and logging; a method only computes losses. All
randomness comes from the generator the trainer puts in the batch, so a run repeats exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer

from distill import checkpoint
from distill.config import MAX_STEPS, coerce_params
from distill.errors import ConfigError
from distill.sampling import ddim_sample, randn, renoise_chain
from distill.schedules import with_end
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
        check_fits_teacher(teacher, params)
        self.teacher, self.student, self.params = teacher, student, params

    def train(self, mode: bool = True):
        """Train mode for what trains; the frozen teacher stays in eval (Teacher.train). A LoRA student shares the
        teacher's backbone, which Student.train would put in train mode for every teacher pass too: its frozen base
        layers go back to eval, and only the adapters' own modules (lora_A/B, lora_dropout) follow `mode`."""
        super().train(mode)
        if self.student.kind == "lora":
            keep_base_in_eval(self.student.backbone, mode)
        return self

    @classmethod
    def parse_params(cls, raw: dict):
        """The method's params from `method.params`: each numeric one in its declared range (`ranged`), then the
        checks across fields (the Params class's own `check`)."""
        params = coerce_params(cls.Params, raw, "method.params.")
        check_ranges(params)
        if hasattr(params, "check"):
            params.check()
        return params

    # Turns that run every k steps unless train.turn_every says otherwise; distill.methods.check_config writes
    # them into the config, so the saved config shows what ran.
    default_turn_every: dict[str, int] = {}

    needs_latents = True  # whether the data must carry images or latents

    def parameters_for(self, turn: str) -> list[nn.Parameter]:
        return self.student.trainable_parameters()

    def loss(self, batch: dict, turn: str) -> LossOut:
        raise NotImplementedError

    def forward(self, batch: dict, turn: str) -> LossOut:
        # Called through the Accelerate-wrapped module so DDP sees every forward.
        out = self.loss(batch, turn)
        if turn == "student" and self.student.feature_weight:  # a compressed student: the step loss + feature KD
            kd, logs = self.feature_distillation(batch)
            out = LossOut(out.loss + self.student.feature_weight * kd, {**out.logs, **logs})
        return out

    def feature_distillation(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """students.compressed.feature_loss on the batch's latents noised at the family's training times (noise
        alone, x0 = 0 at the last time, where the method reads no latents). Feature and output distillation pull
        towards the teacher's one-step denoiser; BK-SDM and KOALA use them to pretrain a compressed denoiser, so a
        few-step method can also start from a compressed `denoise` run (student.init_from)."""
        from students.compressed import feature_loss

        g, cond = batch["generator"], batch["cond"]
        x0 = batch.get("latents")
        n = len(cond)
        if x0 is None:
            x0 = torch.zeros(n, *latent_shape(self.teacher, batch), device=self.teacher.device)
            t = torch.full((n,), float(self.teacher.num_train_timesteps - 1), device=x0.device)
        else:
            t = family_times(self.teacher, n, g, x0)
        w = torch.ones(n, device=x0.device) if self.student.guidance_input else None
        return feature_loss(self.teacher, self.student.backbone, self.student.plan, x0.float(), cond, t,
                            randn(x0.shape, g, x0), self.student_prediction, w)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks across config sections that this method needs (run before any model loads)."""

    @classmethod
    def check_training(cls, cfg) -> None:
        """Checks that only a config about to train must pass (a finished run's config still loads to sample)."""

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

    def sample_times(self, steps: int, shape=None) -> list[float]:
        """The `steps` times (teacher units, descending) the student's sampler visits for latents of `shape` (None:
        the teacher's own size; only FLUX.1's schedule, shifted by the token count, depends on it)."""
        return self.teacher.timesteps(steps, shape).tolist()

    def student_times(self, n: int, shape=None, end: float | None = None) -> torch.Tensor:
        """Teacher.student_timesteps(n) for latents of `shape`, on the teacher's device; with `end`, closed by that
        clean time (so step i goes from grid[i] to grid[i + 1])."""
        times = self.teacher.student_timesteps(n, shape).float()
        return (times if end is None else with_end(times, end)).to(self.teacher.device)

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        """How this method's student samples; by default DDIM on the teacher's grid with the student's backbone."""
        cfg, w = self.guidance_args(guidance, len(cond))
        return ddim_sample(self.teacher, cond, steps, generator, shape, cfg, backbone=self.student.backbone,
                           times=self.sample_times(steps, shape) + [self.teacher.end_time], guidance_cond=w,
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


def keep_base_in_eval(backbone: nn.Module, mode: bool) -> None:
    """Every module of a shared backbone in eval except the LoRA adapters' own parts, which follow `mode`."""
    backbone.eval()
    for layer in backbone.modules():
        if isinstance(layer, BaseTunerLayer):
            for name, part in layer.named_children():
                if name != "base_layer":
                    part.train(mode)


# --- params: every numeric field declares its range --------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """The values a numeric param may take: bounds inclusive (ge, le) or exclusive (gt, lt), any may be None. NaN
    and inf never pass: a NaN compares false with everything, so an unchecked one would slip through any `<`."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def allows(self, v) -> bool:
        return (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if low and high:
            return f"must be {kind} in {low}, {high}"
        if low:
            return f"must be {kind} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"must be {kind} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return f"must be {kind}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def ranged(default, ge=None, le=None, *, gt=None, lt=None, teacher_times: bool = False):
    """A Params field and its allowed range, which Method.parse_params checks before any model loads.
    teacher_times: a count of the teacher's train timesteps (a grid of that many distinct times), so also at most
    the loaded teacher's num_train_timesteps (check_fits_teacher); MAX_STEPS (1,000) before it loads."""
    if teacher_times:
        le = MAX_STEPS if le is None else le
    return field(default=default, metadata={"range": Range(ge, gt, le, lt), "teacher_times": teacher_times})


def cfg_scale(default: float):
    """A classifier-free-guidance scale in diffusers' convention: 1 is no guidance."""
    return ranged(default, 1.0)


def check_ranges(params, prefix: str = "method.params.") -> None:
    for f in dataclasses.fields(params):
        bound, value = f.metadata.get("range"), getattr(params, f.name)
        if bound is not None and value is not None and not bound.allows(value):
            raise ConfigError(prefix + f.name, value, bound.describe(isinstance(value, int)))


def check_fits_teacher(teacher: Teacher, params) -> None:
    """Counts of the teacher's times fit its schedule: known only once it is loaded (every built-in family has
    1,000, the bound parse_params already applied), so checked when the method is built, before any step."""
    if not dataclasses.is_dataclass(params):
        return
    T = teacher.num_train_timesteps
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.metadata.get("teacher_times") and value is not None and value > T:
            raise ConfigError(f"method.params.{f.name}", value, f"the teacher has {T} train timesteps: must be <= {T}")


def check_guidance_range(lo: float, hi: float) -> None:
    """The CFG scales a method draws w from (each already >= 1 and finite): an interval, lowest first."""
    if lo > hi:
        raise ConfigError("method.params.guidance_min", lo, f"must be <= method.params.guidance_max ({_num(hi)})")


def latent_shape(teacher: Teacher, batch: dict) -> tuple[int, ...]:
    """One sample's latent shape in this batch: its latents' (a bucket's size), else the teacher's own size."""
    if "latents" in batch:
        return tuple(batch["latents"].shape[1:])
    return teacher.latent_shape(*teacher.size)


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


class Renoising(Method):
    """A student that gives x0 at a few distinct times from pure noise, each re-noised to the next time: the
    multistep consistency sampler (sCM sec. 2), shared by the adversarial methods and sCM/rCM."""

    renoises = True

    def sample_times(self, steps: int, shape=None) -> list[float]:
        """`steps` distinct times from pure noise (Teacher.student_timesteps), the training grid's for
        steps = student_steps."""
        return self.teacher.student_timesteps(steps, shape).tolist()

    @torch.no_grad()
    def sample(self, cond, steps: int, generator, shape, guidance=1.0):
        cfg, w = self.guidance_args(guidance, len(cond))
        x = randn((len(cond), *shape), generator, self.teacher.device)
        return renoise_chain(self.teacher, self.student.backbone, x, cond, self.sample_times(steps, shape), generator,
                             cfg, w)


class Adversarial(Renoising):
    """What ADD and LADD share: two turns, a student that denoises from a few teacher times, and the
    few-step sampler that denoises then renoises to the next time (ADD sec. 3.1)."""

    turns = ("discriminator", "student")
    extras = ("discriminator",)
    discriminator: nn.Module

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
        # n distinct useful times from pure noise: {999, 749, 499, 249} (VP), {1000, 900, 750, 500} (flow, shift 3)
        grid = self.student_times(self.params.student_steps, x0.shape)
        pick = torch.randint(0, len(grid), (len(x0),), generator=generator).to(x0.device)
        t = grid[pick]
        noise = randn(x0.shape, generator, x0)
        first = (pick == 0).reshape(-1, *[1] * (x0.ndim - 1))
        x_t = torch.where(first, noise, self.teacher.add_noise(x0, noise, t))
        return self.teacher.predict(x_t, t, cond, backbone=self.student.backbone)[0]

