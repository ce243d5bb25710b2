"""Samplers, written once over the teacher interface: the teacher's DDIM and multistep consistency; and the
diffusers scheduler and pipeline call that sample as a method does."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from distill import data
from distill.errors import DistillError
from distill.solvers import bcast, consistency_scalings, ddim_step
from teachers.base import Cond, Teacher


def randn(shape, generator: torch.Generator, like) -> torch.Tensor:
    """Normal noise drawn on the CPU in float32 from an explicit generator (as diffusers' randn_tensor does for a CPU
    generator), then moved to `like` (a device, or a tensor's device): identical on every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(getattr(like, "device", like))


@torch.no_grad()
def ddim_sample(teacher: Teacher, cond: Cond, steps: int, generator: torch.Generator, shape, guidance=1.0,
                backbone=None, times: list[float] | None = None, guidance_cond=None,
                prediction_type: str | None = None) -> torch.Tensor:
    """The deterministic sampler on the teacher's own n-step grid, or on `times` (steps + 1 points, ending
    clean); for flow teachers this is Euler (see solvers.ddim_step)."""
    times = times or teacher.timesteps(steps, shape).tolist() + [teacher.end_time]
    x = randn((len(cond), *shape), generator, teacher.device)
    for t, s in zip(times[:-1], times[1:]):
        x0, eps = teacher.predict(x, t, cond, guidance, backbone, guidance_cond, prediction_type)
        x = ddim_step(x0, eps, *teacher.alpha_sigma(torch.tensor(s)))
    return x


def renoise_chain(teacher: Teacher, backbone, x: torch.Tensor, cond: Cond, times: list[float],
                  generator: torch.Generator, guidance=1.0, guidance_cond=None, boundary: tuple | None = None):
    """The few-step students' sampler: denoise x at each of `times` in turn to the backbone's clean estimate, and
    re-noise that with fresh noise to the next time (ADD sec. 3.1; multistep consistency sampling, Song et al. 2023,
    Alg. 1, LCM Alg. 3, when `boundary` = (sigma_data, timestep_scaling) turns each estimate into the consistency
    function f = c_skip x + c_out x0, LCM eq. 5). Draws noise in the order diffusers' LCMScheduler does."""
    for i, t in enumerate(times):
        x0 = teacher.predict(x, t, cond, guidance, backbone=backbone, guidance_cond=guidance_cond)[0]
        if boundary is not None:
            c_skip, c_out = consistency_scalings(torch.tensor(t), *boundary)
            x0 = bcast(c_out, x0) * x0 + bcast(c_skip, x) * x
        x = x0
        if i + 1 < len(times):
            noise = teacher.step_noise(x.shape, lambda shape: randn(shape, generator, x))
            x = teacher.add_noise(x, noise, times[i + 1])
    return x


class Stitched(torch.nn.Module):
    """T-Stitch (Pan et al. 2024, sec. 3): a sampling trajectory shared by two denoisers, the smaller one for the
    first `k` of the `steps` steps and the larger for the rest. Students call their backbone once per step (CFG
    runs as one batched call), so the i-th call of each run of `steps` calls is step i. `dtype` and `config` are
    those of the backbone the next call goes to (the teacher casts the input to its dtype first)."""

    def __init__(self, first: torch.nn.Module, rest: torch.nn.Module, k: int, steps: int):
        super().__init__()
        self.first, self.rest, self.k, self.steps, self.calls = first, rest, k, steps, 0

    def _next(self) -> torch.nn.Module:
        return self.first if self.calls % self.steps < self.k else self.rest

    @property
    def dtype(self):
        return self._next().dtype

    @property
    def config(self):
        return self._next().config

    def forward(self, *args, **kwargs):
        backbone = self._next()
        self.calls += 1
        return backbone(*args, **kwargs)


def check_stitch(method, other, other_source: str) -> None:
    """`other`'s student can take the first steps of `method`'s sampler: same teacher, same outputs and inputs."""
    if other.teacher.size != method.teacher.size or type(other.teacher) is not type(method.teacher):
        raise DistillError(f"--stitch {other_source}: its teacher is not this run's (family and size must match)")
    if (other.student_prediction, other.student.guidance_input) != (method.student_prediction,
                                                                     method.student.guidance_input):
        raise DistillError(f"--stitch {other_source}: its student reads or predicts something else than this run's "
                           "(a progressive or w-conditioned student stitches only with its own kind)")


@contextmanager
def stitched(method, other, fraction: float, steps: int):
    """`method` samples with `other`'s student for the first round(fraction * steps) of `steps` steps (T-Stitch);
    yields that count."""
    k = round(fraction * steps)
    own = method.student.backbone
    method.student.backbone = Stitched(other.student.backbone, own, k, steps)
    try:
        yield k
    finally:
        method.student.backbone = own


def conditioning(teacher: Teacher, prompts: list[str], size: tuple[int, int], sized: bool) -> Cond:
    """The prompts encoded for images of (height, width) `size`. A student trained on aspect-ratio buckets, or a
    teacher (`sized`), reads each size's own size conditioning (SDXL: original = target = `size`, no crop, as
    diffusers' pipeline conditions by default); other students read their one trained size's, as they were trained."""
    cond = teacher.encode_prompts(prompts)
    if not sized:
        return cond
    hw = torch.tensor([size]).expand(len(cond), 2)
    return teacher.with_sizes(cond, hw, torch.zeros_like(hw), size)


def parse_stitch(value: str, teacher: bool = False) -> tuple[str, float]:
    """--stitch RUN:FRACTION -> (RUN, FRACTION), the fraction in [0, 1]; refused with --teacher (`teacher`)."""
    if teacher:
        raise DistillError("--stitch samples students; drop --teacher or --stitch")
    run, sep, fraction = value.rpartition(":")
    try:
        f = float(fraction)
    except ValueError:
        f = None
    if not sep or not run or f is None or not 0 <= f <= 1:
        raise DistillError(f"--stitch {value!r}: give RUN:FRACTION, the share of the steps (0 to 1) the other run's "
                           "smaller student takes first, e.g. runs/small:0.4")
    return run, f


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] -> 8-bit PIL images, rounding as diffusers' VaeImageProcessor does."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    arr = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def diffusers_sampling(method, cfg, steps: int | None = None) -> tuple[object, dict]:
    """The diffusers scheduler with which the teacher family's pipeline samples as `method.sample` does at
    `steps` (default sample.steps), and the facts a user needs: {"scheduler": its class, "scheduler_config":
    what differs from it built from the teacher's scheduler config, "pipeline_call": every call kwarg but the
    prompt and the generator}. The times come from method.sample_times, never re-derived here."""
    teacher, params = method.teacher, method.params
    steps = steps or cfg.sample.steps
    # Consistency students end every step with LCM's boundary scalings, which their params carry; the other
    # re-noising students (ADD, LADD) take the backbone's x0 as it is.
    boundary = (params.sigma_data, params.timestep_scaling) if hasattr(params, "timestep_scaling") else None
    sched, times = teacher.scheduler_for(method.renoises, method.sample_times(steps),
                                         getattr(method, "student_prediction", None), boundary)
    size = teacher.call_size(*data.sample_size(cfg, teacher), sized=cfg.data.buckets is not None)
    guidance = teacher.call_guidance(cfg.sample.guidance_scale, method.student.guidance_input)
    call = {"num_inference_steps": steps, **guidance, **size, **times}
    plain = type(sched).from_config(teacher.pipe.scheduler.config).config
    changed = {k: v for k, v in sched.config.items() if not k.startswith("_") and plain.get(k) != v}
    return sched, {"scheduler": type(sched).__name__, "scheduler_config": changed, "pipeline_call": call}


def student_folder_sampling(method, cfg) -> tuple[object, dict] | None:
    """diffusers_sampling for a run's student/ folder, or None where there is none: no pipeline, or a
    sample.steps this student cannot sample at (the folder then keeps the teacher's scheduler, with a warning)."""
    if not method.teacher.is_pipeline:
        return None
    try:
        return diffusers_sampling(method, cfg)
    except DistillError as e:
        warnings.warn(f"student/ keeps the teacher's scheduler: {e}", stacklevel=2)
        return None
