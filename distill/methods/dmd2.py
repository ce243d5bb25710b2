"""Improved distribution matching distillation (DMD2; Yin et al. 2024), for VP and flow teachers alike.

The student (generator) is pushed along the difference of two scores at its own noised samples: the frozen
teacher with CFG (real) and a fake score that keeps learning the student's distribution by plain denoising
(DMD, Yin et al. 2023, eq. 7). A GAN term on the fake score's bottleneck features (DMD2 sec. 4.3) replaces the
regression loss (sec. 4.1), and the fake score takes several updates per generator update (sec. 4.2; five
unless train.turn_every sets the student's turn). Multi-step students are trained by backward simulation (sec. 4.4).

A LoRA student's fake score is a second adapter on the same frozen backbone, so one copy of the base weights
serves teacher (adapters off), student (adapter `default`) and fake score (adapter `fake`); a compressed
student's is an adapter on the frozen teacher's backbone. Constants follow
the reference code's SDXL recipe (tianweiy/DMD2, main/sd_guidance.py and train_sd.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import students
from discriminators.teacher_heads import TeacherHeads, features
from distill.errors import ConfigError, check_choice
from distill.methods.base import Adversarial, LossOut, cfg_scale, denoising_loss, family_times, ranged
from distill.sampling import randn, renoise_chain


@dataclass
class DMD2Params:
    # {999, 749, 499, 249} on VP; the shifted equivalent on flow teachers
    student_steps: int = ranged(4, 1, teacher_times=True)
    real_guidance: float = cfg_scale(8.0)  # CFG of the real score (DMD2's SDXL recipe)
    # the distribution-matching loss draws t in [min, max] * T (reference: 20..980)
    min_time: float = ranged(0.02, 0.0, 1.0)
    max_time: float = ranged(0.98, 0.0, 1.0)
    gan_student_weight: float = ranged(5e-3, 0.0)  # the generator's non-saturating GAN loss (DMD2's SDXL recipe)
    gan_fake_weight: float = ranged(1e-2, 0.0)  # the head's classification loss, added to the fake score's
    fake_score: str = "adapter"  # adapter: a second LoRA beside a LoRA student's; copy: a trainable full copy
    fake_adapter: str = "fake"  # the fake score's adapter name
    fake_rank: int = ranged(0, 0)  # its LoRA rank (0: the student's)
    # its LoRA alpha (None: its rank, so scale alpha/rank = 1 whatever the student's scale). The reference trains the
    # fake score as a full network at its own learning rate; an undamped adapter is the closer analogue, and lets it
    # keep up with the generator it must track. Set it to rank * student.lora_alpha / student.lora_rank for the
    # student's scale.
    fake_alpha: float | None = ranged(None, gt=0.0)
    head_hidden: int = ranged(128, 1)

    def check(self) -> None:
        if self.min_time >= self.max_time:
            raise ConfigError("method.params.min_time", self.min_time,
                              f"must be < method.params.max_time ({self.max_time})")
        weights = (self.gan_student_weight, self.gan_fake_weight)
        if (min(weights) > 0) != (max(weights) > 0):
            # one side alone trains a generator against a head that never learns, or disturbs the fake score
            # for nothing; the reference only ever switches both on together
            raise ConfigError("method.params.gan_student_weight/gan_fake_weight", weights,
                              "must be >= 0, and both > 0 (GAN on) or both 0 (GAN off)")
        check_choice("method.params.fake_score", self.fake_score, ("adapter", "copy"))
        students.check_adapter_name("method.params.fake_adapter", self.fake_adapter)

    @property
    def gan(self) -> bool:
        return self.gan_student_weight > 0 or self.gan_fake_weight > 0


class DMD2(Adversarial):
    Params = DMD2Params
    turns = ("student", "fake")  # generator first, then the fake score on fresh (no-grad) samples of it
    extras = ("discriminator", "fake")
    # Five fake-score updates per generator update unless train.turn_every says otherwise (DMD2 sec. 4.2: the
    # reference's experiment scripts set dfake_gen_update_ratio to 5 or 10, though the flag defaults to 1): with
    # one, the fake score lags the generator it must describe.
    default_turn_every = {"student": 5}

    def __init__(self, teacher, student, params: DMD2Params):
        super().__init__(teacher, student, params)
        self.fake = students.Companion(student, teacher.backbone, params.fake_adapter, params.fake_rank,
                                       separate=params.fake_score == "copy", alpha=params.fake_alpha,
                                       targets=list(teacher.lora_targets))
        if getattr(student.backbone, "is_gradient_checkpointing", False) and self.fake.network is not \
                student.backbone:
            # a full copy, or the teacher carrying the adapter, checkpoints as the student does
            # (student.gradient_checkpointing): each has the teacher's size; no-grad teacher passes are unaffected
            self.fake.network.enable_gradient_checkpointing(students.checkpoint_with_adapter_state)
        self.layer = teacher.bottleneck_layer()  # the fake score's features have the teacher's shapes
        self.discriminator = TeacherHeads.sized_for(teacher, (self.layer,), params.head_hidden)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        params = cls.parse_params(cfg.method.params)
        if params.fake_score == "copy" or cfg.student.kind == "full":  # the fake score is a full copy: no adapter
            for name in ("fake_rank", "fake_alpha"):
                if getattr(params, name):
                    raise ConfigError(f"method.params.{name}", getattr(params, name), "sets the fake score's LoRA "
                                      "adapter, and this one is a full copy (fake_score: copy, or a full student): "
                                      "leave it unset")
        if cfg.student.kind == "compressed" and cfg.train.fsdp and params.fake_score == "adapter":
            raise ConfigError("method.params.fake_score", "adapter", "beside a compressed student is an adapter on the "
                              "teacher, which train.fsdp does not shard; set it to copy (a sharded full copy)")
        if params.gan and cfg.data.kind == "prompts":  # every other kind carries real images or latents
            raise ConfigError("data.kind", cfg.data.kind, "DMD2's GAN term needs real images (images, shards, "
                              "latents or digits), or set method.params.gan_student_weight and gan_fake_weight to 0")

    @property
    def needs_latents(self) -> bool:
        return self.params.gan

    def parameters_for(self, turn: str) -> list:
        if turn == "fake":
            return self.fake.trainable_parameters() + list(self.discriminator.parameters())
        return self.student.trainable_parameters()

    def logits(self, x0, cond, g):
        """The head's logits on the fake score's bottleneck tokens (DMD2 sec. 4.3) for x0 noised at its own
        t ~ U[0, T) (reference: independent t for real and fake)."""
        t = family_times(self.teacher, len(x0), g, x0, logit_normal=False)
        with self.fake.active() as backbone:
            x_t = self.teacher.add_noise(x0, randn(x0.shape, g, x0), t)
            feats = features(self.teacher, (self.layer,), x_t, t, cond, backbone)
        return self.discriminator(feats, self.teacher.pooled(cond.pos), t)[0]

    def simulate(self, cond, g) -> torch.Tensor:
        """Backward simulation (DMD2 sec. 4.4): the student's input at grid step k (one k per batch) is its own
        k-step sample re-noised to that time, as at inference; step 0 is pure noise."""
        shape = (len(cond), *self.teacher.latent_shape(*self.teacher.size))
        k = int(torch.randint(0, len(self.student_grid), (1,), generator=g))
        x = randn(shape, g, self.student_grid)
        if k:
            with torch.no_grad():
                x = renoise_chain(self.teacher, self.student.backbone, x, cond, self.student_grid[:k].tolist(), g)
                x = self.teacher.add_noise(x, randn(shape, g, x), self.student_grid[k])
        return self.teacher.predict(x, self.student_grid[k], cond, backbone=self.student.backbone)[0]

    def dm_loss(self, x0, cond, g):
        """DMD eq. 7-8 as the reference trains it: grad = (mu_fake - mu_real) / mean|x0 - mu_real| at x0 noised to
        t ~ U[min, max] * T, applied through 0.5 * ||x0 - sg(x0 - grad)||^2, whose gradient in x0 is grad."""
        p, T = self.params, self.teacher.num_train_timesteps
        high = min(int(p.max_time * T) + 1, T)  # integer times up to T - 1, the last the teacher has
        t = torch.randint(int(p.min_time * T), high, (len(x0),), generator=g).float().to(x0.device)
        with torch.no_grad():
            x_t = self.teacher.add_noise(x0, randn(x0.shape, g, x0), t)
            real = self.teacher.predict(x_t, t, cond, p.real_guidance)[0]
            with self.fake.active() as backbone:
                fake = self.teacher.predict(x_t, t, cond, backbone=backbone)[0]
            norm = (x0 - real).abs().flatten(1).mean(1).reshape(-1, *[1] * (x0.ndim - 1))
            grad = torch.nan_to_num((fake - real) / norm)
        return 0.5 * F.mse_loss(x0, (x0 - grad).detach())

    def loss(self, batch, turn) -> LossOut:
        p, g, cond = self.params, batch["generator"], batch["cond"]
        if turn == "student":
            x0 = self.simulate(cond, g)
            loss = self.dm_loss(x0, cond, g)
            logs = {"dm": loss.item()}
            if p.gan_student_weight > 0:  # non-saturating: softplus(-D(fake))
                gan = F.softplus(-self.logits(x0, cond, g)).mean()
                loss = loss + p.gan_student_weight * gan
                logs["gan"] = gan.item()
            return LossOut(loss, logs)
        with torch.no_grad():
            x0 = self.simulate(cond, g)
        # The fake score learns the student's distribution with the family's own denoising loss and times: uniform
        # over [0, T) on VP, as the reference draws them (main/sd_guidance.py, compute_loss_fake); logit-normal on
        # flow teachers, where uniform times reaching sigma = 0 made the exact flow teacher's run diverge.
        t = family_times(self.teacher, len(x0), g, x0)
        with self.fake.active() as backbone:
            loss = denoising_loss(self.teacher, backbone, x0, cond, t, g)
        logs = {"denoise": loss.item()}
        if p.gan_fake_weight > 0:
            real_logits, fake_logits = self.logits(batch["latents"].float(), cond, g), self.logits(x0, cond, g)
            cls = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            loss = loss + p.gan_fake_weight * cls
            logs |= {"cls": cls.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}
        return LossOut(loss, logs)
