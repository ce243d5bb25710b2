"""The one teacher interface: x_t = alpha(t) * x0 + sigma(t) * eps, whatever the family.

A family subclass says how to call its backbone (`_forward`) and what the output means
(`prediction_type`); everything else, classifier-free guidance included, is written here once.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from distill import checkpoint
from distill.errors import ConfigError, DistillError
from distill.solvers import bcast, cfg_combine, to_x0_eps


@dataclass
class Cond:
    """Prompts encoded once: the tensors the backbone reads, for the prompts and for their negatives."""

    pos: dict[str, torch.Tensor]
    neg: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.pos.values())))

    def __getitem__(self, idx) -> "Cond":
        return Cond({k: v[idx] for k, v in self.pos.items()}, {k: v[idx] for k, v in self.neg.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        def move(v):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return Cond({k: move(v) for k, v in self.pos.items()}, {k: move(v) for k, v in self.neg.items()})

    def dropped(self, mask: torch.Tensor) -> "Cond":
        """The prompts with those where `mask` is true replaced by their negatives (CFG training dropout)."""
        def mix(p, n):
            return torch.where(mask.reshape(-1, *([1] * (p.ndim - 1))), n, p)
        return Cond({k: mix(v, self.neg[k]) for k, v in self.pos.items()}, self.neg)

    def flat(self) -> dict[str, torch.Tensor]:
        return {**{f"pos.{k}": v for k, v in self.pos.items()}, **{f"neg.{k}": v for k, v in self.neg.items()}}

    @staticmethod
    def from_flat(flat: dict[str, torch.Tensor]) -> "Cond":
        return Cond(checkpoint.section(flat, "pos."), checkpoint.section(flat, "neg."))


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """The LoRA (peft tuner) layers inside a module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state(layers: list[nn.Module]) -> list[tuple[bool, object]]:
    """Per LoRA layer: whether its adapters are on, and which adapter is active."""
    return [(not m.disable_adapters, m.active_adapter) for m in layers]


def set_adapter_state(layers: list[nn.Module], state: list[tuple[bool, object]]) -> None:
    # Only what a LoRA layer's forward reads. peft's enable_adapters() and set_adapter() also flip the adapters'
    # requires_grad, which belongs to the trainer's per-turn selection and must not change while a backward pass
    # recomputes a checkpointed block (students.checkpoint_with_adapter_state).
    for m, (on, active) in zip(layers, state):
        m._disable_adapters, m._active_adapter = not on, active


@contextmanager
def adapters_as(module: nn.Module, active: str | None):
    """Run a backbone with only adapter `active` switched on, or as the bare teacher (None: adapters off)."""
    layers = adapter_layers(module)
    before = adapter_state(layers)
    set_adapter_state(layers, [(active is not None, active or was) for _, was in before])
    try:
        yield
    finally:
        set_adapter_state(layers, before)


def adapters_disabled(module: nn.Module):
    """Run a backbone as the bare teacher: any LoRA adapters on it are switched off inside."""
    return adapters_as(module, None)


def kohya_module(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """One LoRA module in kohya's keys: lora_unet_<original module path, dots as underscores> with .lora_down.weight,
    .lora_up.weight and .alpha (the module's update is up @ down * alpha / rank)."""
    key = "lora_unet_" + name.replace(".", "_")
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(float(alpha), dtype=down.dtype)}


class Teacher(nn.Module):
    """A frozen diffusion model seen as a denoiser: `predict` gives (x0, eps) for x_t at time t."""

    family: str
    prediction_type: str
    num_train_timesteps: int = 1000
    lora_targets: tuple[str, ...] = ()
    shard_blocks: tuple[type, ...] = ()  # the backbone's repeated blocks: FSDP's units (distill.sharding)
    single_file: bool = False  # whether single_file_state and ldm_names know this family's original layout
    single_file_w: bool = False  # whether that layout has a guidance (w) input (FLUX.1-dev's guidance_in)
    single_file_marker: str = "model.diffusion_model."  # in the keys of a single file that holds the backbone
    is_pipeline: bool = False  # a diffusers pipeline stands behind it: students save, export and sample through it
    makes_images: bool = True  # False: its samples are points (the exact 2-D teachers), with no images to write
    flow: bool = False  # a rectified-flow schedule (x_t = (1 - t) x0 + t eps); otherwise variance-preserving
    guidance_embedded: bool = False  # the backbone reads the guidance scale (FLUX.1-dev): guided = one pass
    lora_formats: tuple[str, ...] = ()  # LoRA files of its students that its ecosystem loads: lora (diffusers), kohya
    kohya_base_model: str | None = None  # kohya's ss_base_model_version for a kohya LoRA of this family
    backbone: nn.Module

    # --- family-specific ---------------------------------------------------------------
    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def timesteps(self, n: int, shape=None) -> torch.Tensor:
        """The teacher's own n-step grid, descending, in train timesteps, for latents of `shape` (..., h, w; None:
        the teacher's own size). Only a schedule shifted by the token count (FLUX.1's) depends on the shape."""
        raise NotImplementedError

    def student_timesteps(self, n: int, shape=None) -> torch.Tensor:
        """n distinct, useful times (descending) for a few-step student: evenly spaced in the family's own
        noise scale from pure noise, with no point at ~zero noise. VP's trailing grid already is that
        ({999, 749, 499, 249}); flow teachers override (their sampler grid ends at sigma_min)."""
        return self.timesteps(n, shape)

    def scheduler_for(self, renoises: bool, times: list[float], prediction_type: str | None = None,
                      boundary: tuple[float, float] | None = None):
        """(diffusers scheduler, pipeline-call kwargs) with which the family's pipeline samples at `times` as
        distill's sampler does, reading the backbone as `prediction_type` (None: the teacher's) and, for a
        re-noising sampler, ending each step with LCM's boundary scalings at `boundary` = (sigma_data,
        timestep_scaling), or with x0 as it is (None)."""
        raise DistillError(f"the {self.family} teacher has no diffusers pipeline to export to")

    def call_guidance(self, guidance: float, reads_w: bool) -> dict:
        """Pipeline-call kwargs that guide as distill's sampler does at `guidance` (`reads_w`: a w-student)."""
        return {"guidance_scale": guidance}

    def call_size(self, height: int, width: int, sized: bool = False) -> dict:
        """Pipeline-call kwargs for images of height x width conditioned as distill conditions them (`sized`: a
        student trained on aspect-ratio buckets, conditioned on each size: distill.sampling.conditioning)."""
        return {"height": height, "width": width}

    def step_noise(self, shape, draw) -> torch.Tensor:
        """Fresh noise for latents of `shape`, from `draw` (shape -> standard normal tensor), laid out as the family's
        pipeline lays out its scheduler's noise (the backbone output's layout), so that a re-noising sampler's export
        draws the same numbers for the same places."""
        return draw(shape)

    def size_config(self) -> dict:
        """Backbone config that makes the family's pipeline default to the trained resolution (diffusers
        defaults to the backbone's sample_size, in latent pixels)."""
        return {"sample_size": self.resolution // self.pipe.vae_scale_factor}

    end_time: float = 0.0  # the clean-data time that closes every grid
    probe_prompt: str = ""  # a prompt any teacher of the family can encode (for shape probes)
    resolution: int = 8  # pixels (the height) of the images it makes (pipeline teachers set it from the config)
    width: int | None = None  # pixels across, where not square

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images it makes."""
        return self.resolution, self.width or self.resolution

    @property
    def size_multiple(self) -> int:
        """What both sides of its images must be multiples of: the VAE's factor times the backbone's patch."""
        return self.pipe.vae_scale_factor * self.backbone.config.get("patch_size", 1)

    def check_sizes(self, sizes: list[tuple[int, int]], field: str) -> None:
        """Refuse image sizes (height, width) it cannot train or sample at, naming the config `field`."""
        if not self.is_pipeline:
            raise ConfigError(field, sizes, f"the {self.family} teacher makes one kind of sample; leave it unset")
        m = self.size_multiple
        for h, w in sizes:
            if h % m or w % m:
                raise ConfigError(field, [h, w], f"the {self.family} teacher makes images whose sides are multiples "
                                  f"of {m} px (its VAE's factor times its patch)")

    def with_sizes(self, cond: Cond, original: torch.Tensor, crop: torch.Tensor, target: tuple[int, int]) -> Cond:
        """The conditioning of images cut from originals of (height, width) `original` [B, 2] at (top, left) `crop`
        [B, 2] to `target`, for a family that reads sizes (SDXL); the others read the latent's own grid."""
        return cond

    def feature_layers(self) -> tuple[tuple[str, int | None], ...]:
        """Backbone submodules whose outputs (element `index` of a tuple) LADD's heads read."""
        raise NotImplementedError

    def bottleneck_layer(self) -> tuple[str, int | None]:
        """The middle of feature_layers (SDXL: the UNet's mid block), where DMD2's GAN head reads."""
        layers = self.feature_layers()
        return layers[len(layers) // 2]

    def pooled(self, cond: dict) -> torch.Tensor:
        """One vector per prompt that summarises it (the pooled text embedding)."""
        return cond["pooled"]

    def encode_prompts(self, prompts: list[str], negative: list[str] | None = None) -> Cond:
        raise NotImplementedError

    def _forward(self, backbone: nn.Module, x, t, cond: dict, guidance_cond) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> latents."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The latent of one image; this default is a diffusers pipeline's (backbone channels, VAE-scaled size)."""
        f = self.pipe.vae_scale_factor
        return (self.backbone.config.in_channels, height // f, width // f)

    def add_guidance_input(self, backbone: nn.Module) -> nn.Module:
        """A copy of the backbone that also reads the CFG scale w (for guidance-distilled students)."""
        raise DistillError(f"student.guidance_embedding is not available for the {self.family} family: its "
                           "backbone has no w input that diffusers loads; use a LoRA or a plain full student")

    def single_file_state(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """The pipeline with `backbone` in place, as the one file of the family's original layout."""
        raise DistillError(f"no single-file layout is known for the {self.family} family")

    @classmethod
    def from_single_file(cls, path: str, config: str | None, dtype: torch.dtype):
        """The family's pipeline from a single file in the original layout, the rest from `config` (a pipeline
        folder or hub id; None: the file's own, or diffusers' default repository for the family)."""
        return cls.pipeline_class.from_single_file(path, config=config, dtype=dtype)

    def single_file_usage(self, path: str, config: str) -> str:
        """The diffusers line that loads the single file at `path` as a pipeline, configs from `config`."""
        return f'pipe = {self.pipeline_class.__name__}.from_single_file("{path}", config="{config}")'

    def ldm_names(self):
        """A function from a backbone module name (diffusers) to its name in the original layout."""
        raise DistillError(f"no original layout is known for the {self.family} family")

    def kohya_lora(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
        """A LoRA, {diffusers module: (A [r, in], B [out, r])} scaled by alpha / r, in kohya's keys: each module by
        its name in the original layout (ldm_names)."""
        ldm = self.ldm_names()
        state = {}
        for module, (down, up) in pairs.items():
            state |= kohya_module(ldm(module), down, up, alpha)
        return state

    # --- shared ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def alpha(self, t):
        return self.alpha_sigma(t)[0]

    def probe(self) -> tuple[torch.Tensor, Cond]:
        """One zero latent at the teacher's resolution and an encoded prompt: inputs for shape probes."""
        shape = self.latent_shape(*self.size)
        return torch.zeros(1, *shape, device=self.device), self.encode_prompts([self.probe_prompt])

    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        # Frozen parts stay in eval mode (dropout off) whatever the trainer asks.
        return super().train(False)

    def predict(self, x: torch.Tensor, t, cond: Cond, guidance=1.0, backbone: nn.Module | None = None,
                guidance_cond=None, prediction_type: str | None = None,
                scales: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) for x at time t. `guidance` > 1 applies classifier-free guidance with the negatives.

        With `backbone=None` the teacher itself answers, adapters off; a student passes its own backbone
        (and, if it reads w, `guidance_cond`; if its output means something else than the teacher's,
        `prediction_type`, e.g. a progressive student's x or v). `scales`: (alpha, sigma) of a continuous time t
        (time_at), used in place of alpha_sigma(t)."""
        if self.guidance_embedded and guidance_cond is None:  # the scale is an input: one pass, no negatives
            guidance, guidance_cond = 1.0, guidance
        work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 only where asked (tests)
        t = torch.as_tensor(t, device=x.device).to(work).expand(x.shape[0])
        alpha, sigma = self.alpha_sigma(t) if scales is None else scales
        alpha, sigma = alpha.to(x.device), sigma.to(x.device)
        use_cfg = not (isinstance(guidance, (int, float)) and guidance == 1.0)
        if backbone is None:
            with adapters_disabled(self.backbone):
                return self.predict(x, t, cond, guidance, self.backbone, guidance_cond, prediction_type, scales)
        if use_cfg:
            if guidance_cond is not None:
                guidance_cond = torch.as_tensor(guidance_cond, device=x.device).expand(len(x)).repeat(2)
            both = self._forward(backbone, torch.cat([x, x]), torch.cat([t, t]), _cat(cond.neg, cond.pos),
                                 guidance_cond)
            out = cfg_combine(*both.to(work).chunk(2)[::-1], guidance)
        else:
            out = self._forward(backbone, x, t, cond.pos, guidance_cond).to(work)
        return to_x0_eps(out, x.to(work), alpha, sigma, prediction_type or self.prediction_type)

    def time_at(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous time at which the schedule has sigma / alpha (the inverse of alpha_sigma, differentiable):
        a flow teacher's sigma * T, a VP teacher's timestep interpolated linearly in its abar table, kept within its
        timesteps 0 .. T-1 (outside them alpha_sigma is clean data, or clamped)."""
        if self.flow:
            return sigma / (alpha + sigma) * self.num_train_timesteps
        abar = (alpha**2 / (alpha**2 + sigma**2)).to(self.alphas_cumprod.dtype)
        table = self.alphas_cumprod.flip(0)  # ascending
        i = torch.searchsorted(table, abar.detach().clamp(table[0], table[-1])).clamp(1, len(table) - 1)
        lo, hi = table[i - 1], table[i]
        # abar falls from index T-1-(i-1) to T-1-i of the original table as it rises from lo to hi
        return ((len(table) - i) - (abar - lo) / (hi - lo)).clamp(0, len(table) - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=x0.device))
        return bcast(alpha.to(x0.device), x0) * x0 + bcast(sigma.to(x0.device), x0) * noise
