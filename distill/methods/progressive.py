"""Progressive distillation (Salimans & Ho 2022, Algorithm 2).

Round r: the student learns to match two deterministic DDIM steps of its teacher with one step.
Each round halves the step count (start_steps -> start_steps/2 -> ... -> end_steps); the student of
round r becomes the teacher of round r + 1. All grids nest: round r's points are every 2^r-th
point of the teacher's start_steps grid, so a student of N steps samples on every other point of
the grid its teacher used.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from distill.errors import ConfigError, DistillError, check_choice
from distill.methods.base import LossOut, Method, cfg_scale, check_guidance_range, ranged, uniform
from distill.sampling import randn
from distill.solvers import bcast, ddim_step, one_step_target, prediction_loss


# student_output -> the prediction type its backbone output is read as (None: the teacher's own)
STUDENT_OUTPUTS = {"teacher": None, "x": "sample", "v": "v_prediction"}


@dataclass
class ProgressiveParams:
    start_steps: int = ranged(64, 2, teacher_times=True)  # the teacher's steps in round 0
    end_steps: int = ranged(1, 1)  # the last round's student steps
    round_steps: int = ranged(1000, 1)  # optimiser steps per round
    target: str = "x"  # x | eps | v: the space the loss compares in
    # The guidance scale w ~ U[guidance_min, guidance_max] of the teacher's CFG in round 0. A student that reads
    # w (student.guidance_embedding) gets w as input in every round, as in Meng et al. 2023, sec. 4.
    guidance_min: float = cfg_scale(1.0)
    guidance_max: float = cfg_scale(1.0)
    # Round 0's teacher is the initial student (a guidance-distilled one, via student.init_from) instead of the
    # teacher with CFG: Meng et al.'s stage two.
    teacher_from_student: bool = False
    # What the student's backbone outputs (Salimans & Ho 2022, sec. 4): the teacher's own parameterisation, x, or
    # v = alpha*eps - sigma*x (VP teachers). An eps student's x0 = (z - sigma*eps)/alpha amplifies its error by
    # sigma/alpha (14.6 at t = 999), which is what 1-2 step students sample with; x and v do not amplify.
    student_output: str = "teacher"

    def check(self) -> None:
        ratio = self.start_steps / self.end_steps
        if ratio < 2 or not float(math.log2(ratio)).is_integer():
            raise ConfigError("method.params.end_steps", self.end_steps,
                              f"start_steps / end_steps must be a power of 2 >= 2 (start_steps={self.start_steps})")
        check_choice("method.params.target", self.target, ("x", "eps", "v"))
        check_guidance_range(self.guidance_min, self.guidance_max)
        check_choice("method.params.student_output", self.student_output, STUDENT_OUTPUTS)
        if self.teacher_from_student and self.student_output != "teacher":
            raise ConfigError("method.params.student_output", self.student_output,
                              "teacher_from_student needs student_output: teacher (the initial student's output "
                              "is the teacher's parameterisation)")

    @property
    def rounds(self) -> int:
        return int(math.log2(self.start_steps // self.end_steps))


class Progressive(Method):
    Params = ProgressiveParams

    def __init__(self, teacher, student, params: ProgressiveParams):
        super().__init__(teacher, student, params)
        if params.student_output == "v" and teacher.flow:
            raise ConfigError("method.params.student_output", "v", "v = alpha*eps - sigma*x needs a variance-"
                              "preserving teacher (a flow teacher's own output already is a velocity): use teacher or x")
        self.student_prediction = STUDENT_OUTPUTS[params.student_output]
        self.round = 0
        self.previous = None  # the previous round's student: a frozen module (full) or LoRA tensors
        # A full student's round teacher is made once and refilled at each round's end (a sharded module cannot be
        # copied, only filled).
        self.round_backbone = (copy.deepcopy(student.backbone).requires_grad_(False).eval()
                               if student.kind == "full" else None)
        if params.teacher_from_student:
            self.previous = self.student.snapshot(self.round_backbone)

    def grid(self, shape=None) -> torch.Tensor:
        """Evenly spaced from pure noise on the family's scale, so every n-step student nests in it with n useful
        times (a flow teacher's own Euler grid ends at sigma_min, a near-identity last step)."""
        return self.student_times(self.params.start_steps, shape, self.teacher.end_time)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.round_backbone is not None:  # a frozen round teacher, as the teacher itself stays in eval
            self.round_backbone.eval()
        return self

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cls.parse_params(cfg.method.params)
        if p.guidance_min < p.guidance_max and not cfg.student.guidance_embedding:
            raise ConfigError("method.params.guidance_min/guidance_max", (p.guidance_min, p.guidance_max),
                              "a range of w needs a student that reads w (student.kind=full, student."
                              "guidance_embedding=true), or it learns an average over w; else set them equal")

    def round_of(self, step: int) -> int:
        return min(step // self.params.round_steps, self.params.rounds - 1)

    def loss(self, batch, turn) -> LossOut:
        p, teacher, g = self.params, self.teacher, batch["generator"]
        x0, cond = batch["latents"].float(), batch["cond"]
        n = p.start_steps // 2 ** (self.round + 1)  # this round's student steps
        times = self.grid(x0.shape)[:: p.start_steps // (2 * n)]  # the teacher's 2n-step grid, 2n + 1 points
        j = torch.randint(0, n, (len(x0),), generator=g).to(x0.device)
        t, t1, t2 = times[2 * j], times[2 * j + 1], times[2 * j + 2]
        a, s = teacher.alpha_sigma(t)
        z = teacher.add_noise(x0, randn(x0.shape, g, x0), t)
        w = uniform(len(x0), p.guidance_min, p.guidance_max, g, x0)
        w_in = w if self.student.guidance_input else None
        # The backbone that plays teacher this round: the teacher itself, then the previous student.
        with torch.no_grad(), self.student.as_snapshot(self.previous) as backbone:
            # The raw teacher applies CFG at w; a previous student already has it built in (or reads w).
            cfg = (1.0 if p.guidance_max == 1.0 else w) if backbone is None else 1.0
            w_teacher, out = (None, None) if backbone is None else (w_in, self.student_prediction)
            z1 = ddim_step(*teacher.predict(z, t, cond, cfg, backbone, w_teacher, out), *teacher.alpha_sigma(t1))
            z2 = ddim_step(*teacher.predict(z1, t1, cond, cfg, backbone, w_teacher, out), *teacher.alpha_sigma(t2))
            x_target = one_step_target(z, z2, a, s, *teacher.alpha_sigma(t2))  # two teacher steps as one
        x_pred, eps_pred = teacher.predict(z, t, cond, backbone=self.student.backbone, guidance_cond=w_in,
                                           prediction_type=self.student_prediction)
        eps_target = (z - bcast(a, z) * x_target) / bcast(s, z)
        loss = prediction_loss(x_pred, eps_pred, x_target, eps_target, a, s, p.target)
        return LossOut(loss, {"round": float(self.round), "student_steps": float(n)})

    def step_done(self, done: int) -> None:
        """At a round's end the student becomes the next round's teacher. Decided by the step count, not by an
        optimiser step: a skipped (non-finite) last step of a round must still switch before the milestone
        checkpoint, or a resume would pair the next round with the old teacher."""
        new_round = self.round_of(done)
        if new_round != self.round:
            self.previous = self.student.snapshot(self.round_backbone)
            self.round = new_round

    def sharded_modules(self) -> list:
        return super().sharded_modules() + ([self.round_backbone] if self.round_backbone is not None else [])

    def checkpoint_for(self, steps: int) -> int | None:
        """The end of the round whose student samples in `steps` (start_steps / 2^(r+1) after round r)."""
        halvings = math.log2(self.params.start_steps / steps)
        if not halvings.is_integer() or not 1 <= halvings <= self.params.rounds:
            return None
        return int(halvings) * self.params.round_steps

    def milestone(self, step: int) -> bool:
        return step % self.params.round_steps == 0 and step // self.params.round_steps <= self.params.rounds

    def phase_starts(self, max_steps: int) -> list[int]:
        """Each round trains with a fresh optimiser and its own LR schedule, as the reference code does (google-
        research diffusion_distillation: a new Adam state per halving, the LR annealed linearly over
        steps_per_iter); the last round runs on to max_steps. The trainer asks before its first step, so a run too
        short for every round is refused there."""
        self.check_rounds_fit(self.params, max_steps)
        starts = [r * self.params.round_steps for r in range(self.params.rounds)]
        return [s for s in starts if s < max_steps]

    @classmethod
    def check_training(cls, cfg) -> None:
        cls.check_rounds_fit(cls.parse_params(cfg.method.params), cfg.train.max_steps)

    @staticmethod
    def check_rounds_fit(p, max_steps: int) -> None:
        """Every round must end within train.max_steps: a shorter run silently skips the last rounds, and a bench
        then asks for a round's-end checkpoint (checkpoint_for) that was never written. Checked for a config about
        to train (runs.checked) and again by the trainer; a finished run's config must still load to sample."""
        if max_steps < p.rounds * p.round_steps:
            raise ConfigError("train.max_steps", max_steps, f"progressive distillation from {p.start_steps} to "
                              f"{p.end_steps} steps runs {p.rounds} rounds of method.params.round_steps="
                              f"{p.round_steps}: need train.max_steps >= {p.rounds * p.round_steps}, or lower "
                              "method.params.round_steps")

    def state_to_save(self):
        return super().state_to_save() | self.student.snapshot_state(self.previous, "previous")

    def load_saved(self, state) -> None:
        super().load_saved(state)
        self.previous = self.student.snapshot_from(state, "previous", self.round_backbone)

    def resume_at(self, step: int) -> None:
        self.round = self.round_of(step)

    def sample_times(self, steps: int, shape=None) -> list[float]:
        """The nested grid: every (start_steps / steps)-th point of the start grid (the base class's DDIM)."""
        if self.params.start_steps % steps:
            raise DistillError(f"a progressive student samples at a divisor of start_steps={self.params.start_steps}"
                               f", not {steps} steps")
        return self.grid(shape)[:: self.params.start_steps // steps][:-1].tolist()
