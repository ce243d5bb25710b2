"""Distribution matching (DMD, Yin et al. 2023; DMD2, Yin et al. 2024), as DMD2 (distill/methods/dmd2.py) and rCM
(distill/methods/rcm.py) share it: the fake score, the student's samples by backward simulation, the
distribution-matching loss through them, and the fake score's own loss. Constants follow the reference code's SDXL
recipe (tianweiy/DMD2, main/sd_guidance.py and train_sd.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import students
from distill.errors import ConfigError, check_choice
from distill.methods.base import cfg_scale, denoising_loss, family_times, ranged
from distill.sampling import randn, renoise_chain


@dataclass
class MatchingParams:
    """The distribution-matching term's settings, shared by DMD2 and rCM (distill/methods/rcm.py)."""
    real_guidance: float = cfg_scale(8.0)  # CFG of the real score (DMD2's SDXL recipe)
    # the distribution-matching loss draws t in [min, max] * T (reference: 20..980)
    min_time: float = ranged(0.02, 0.0, 1.0)
    max_time: float = ranged(0.98, 0.0, 1.0)
    fake_score: str = "adapter"  # adapter: a second LoRA beside a LoRA student's; copy: a trainable full copy
    fake_adapter: str = "fake"  # the fake score's adapter name
    fake_rank: int = ranged(0, 0)  # its LoRA rank (0: the student's)
    # its LoRA alpha (None: its rank, so scale alpha/rank = 1 whatever the student's scale). The reference trains the
    # fake score as a full network at its own learning rate; an undamped adapter is the closer analogue, and lets it
    # keep up with the generator it must track. Set it to rank * student.lora_alpha / student.lora_rank for the
    # student's scale.
    fake_alpha: float | None = ranged(None, gt=0.0)

    def check(self) -> None:
        if self.min_time >= self.max_time:
            raise ConfigError("method.params.min_time", self.min_time,
                              f"must be < method.params.max_time ({self.max_time})")
        check_choice("method.params.fake_score", self.fake_score, ("adapter", "copy"))
        students.check_adapter_name("method.params.fake_adapter", self.fake_adapter)


def check_fake_score_config(cfg, params: MatchingParams) -> None:
    """The fake score's settings against the student's kind (before any model loads)."""
    if params.fake_score == "copy" or cfg.student.kind == "full":  # the fake score is a full copy: no adapter
        for name in ("fake_rank", "fake_alpha"):
            if getattr(params, name):
                raise ConfigError(f"method.params.{name}", getattr(params, name), "sets the fake score's LoRA "
                                  "adapter, and this one is a full copy (fake_score: copy, or a full student): "
                                  "leave it unset")
    if cfg.student.kind == "compressed" and cfg.train.fsdp and params.fake_score == "adapter":
        raise ConfigError("method.params.fake_score", "adapter", "beside a compressed student is an adapter on the "
                          "teacher, which train.fsdp does not shard; set it to copy (a sharded full copy)")


def fake_score(teacher, student, params: MatchingParams) -> students.Companion:
    """The fake score: a second adapter on the student's (or, beside a compressed student, the teacher's) backbone,
    or a full copy of the teacher's, checkpointed as the student is."""
    fake = students.Companion(student, teacher.backbone, params.fake_adapter, params.fake_rank,
                              separate=params.fake_score == "copy", alpha=params.fake_alpha,
                              targets=list(teacher.lora_targets))
    if getattr(student.backbone, "is_gradient_checkpointing", False) and fake.network is not student.backbone:
        # a full copy, or the teacher carrying the adapter, checkpoints as the student does
        # (student.gradient_checkpointing): each has the teacher's size; no-grad teacher passes are unaffected
        fake.network.enable_gradient_checkpointing(students.checkpoint_with_adapter_state)
    return fake


def simulate(teacher, backbone, grid: torch.Tensor, cond, g, latent: tuple[int, ...],
             guidance_cond=None) -> torch.Tensor:
    """Backward simulation (DMD2 sec. 4.4) of samples of `latent` shape: the student's input at grid step k (one k
    per batch) is its own k-step sample re-noised to that time, as at inference; step 0 is pure noise. Only the last
    step has a gradient."""
    shape = (len(cond), *latent)
    k = int(torch.randint(0, len(grid), (1,), generator=g))
    x = randn(shape, g, grid)
    if k:
        with torch.no_grad():
            x = renoise_chain(teacher, backbone, x, cond, grid[:k].tolist(), g, guidance_cond=guidance_cond)
            x = teacher.add_noise(x, teacher.step_noise(shape, lambda s: randn(s, g, x)), grid[k])
    return teacher.predict(x, grid[k], cond, backbone=backbone, guidance_cond=guidance_cond)[0]


def dm_loss(teacher, fake: students.Companion, params: MatchingParams, x0, cond, g) -> torch.Tensor:
    """DMD eq. 7-8 as the reference trains it: grad = (mu_fake - mu_real) / mean|x0 - mu_real| at x0 noised to
    t ~ U[min, max] * T, applied through 0.5 * ||x0 - sg(x0 - grad)||^2, whose gradient in x0 is grad."""
    p, T = params, teacher.num_train_timesteps
    high = min(int(p.max_time * T) + 1, T)  # integer times up to T - 1, the last the teacher has
    t = torch.randint(int(p.min_time * T), high, (len(x0),), generator=g).float().to(x0.device)
    with torch.no_grad():
        x_t = teacher.add_noise(x0, randn(x0.shape, g, x0), t)
        real = teacher.predict(x_t, t, cond, p.real_guidance)[0]
        with fake.active() as backbone:
            fake_x0 = teacher.predict(x_t, t, cond, backbone=backbone)[0]
        norm = (x0 - real).abs().flatten(1).mean(1).reshape(-1, *[1] * (x0.ndim - 1))
        grad = torch.nan_to_num((fake_x0 - real) / norm)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def fake_loss(teacher, fake: students.Companion, x0, cond, g) -> torch.Tensor:
    """The fake score learns the student's distribution with the family's own denoising loss and times: uniform
    over [0, T) on VP, as the reference draws them (main/sd_guidance.py, compute_loss_fake); logit-normal on
    flow teachers, where uniform times reaching sigma = 0 made the exact flow teacher's run diverge."""
    t = family_times(teacher, len(x0), g, x0)
    with fake.active() as backbone:
        return denoising_loss(teacher, backbone, x0, cond, t, g)
