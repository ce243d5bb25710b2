"""SD3 teachers: rectified flow with shifted sigmas, an MMDiT, and three text encoders (Esser et al. 2024)."""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, StableDiffusion3Pipeline
from diffusers.models.attention import JointTransformerBlock

from distill.errors import ConfigError, DistillError
from distill.schedules import dynamic_shift, flow_alpha_sigma, flow_student_timesteps, flow_timesteps, flow_unshift
from distill.solvers import consistency_scalings
from teachers import ldm
from teachers.base import Cond, Teacher

# FlowMatchLCMScheduler applies no boundary scalings (it takes x0 as it is). Leaving out c_skip and c_out moves
# the latent by about 2 * c_skip: on the digits-sd3 teacher c_skip = 8e-4 moved a pixel by 0.04/255, and 7.5e-3 by
# 0.37/255 (docs/export.md); at the default scalings c_skip <= 7.5e-7.
BOUNDARY_TOLERANCE = 1e-3


def _check_boundary(times: list[float], sigma_data: float, timestep_scaling: float) -> None:
    c_skip, c_out = consistency_scalings(torch.tensor(times), sigma_data, timestep_scaling)
    gap = torch.maximum(c_skip, 1 - c_out)
    if float(gap.max()) > BOUNDARY_TOLERANCE:
        t = times[int(gap.argmax())]
        raise DistillError(
            f"FlowMatchLCMScheduler applies no boundary scalings, and this consistency student's (sigma_data="
            f"{sigma_data}, timestep_scaling={timestep_scaling}) give c_skip = {float(c_skip.max()):.2g} at t = "
            f"{t:g}, above {BOUNDARY_TOLERANCE:g}: diffusers would not sample it as distill does; sample with "
            "distill generate, or train with a larger method.params.timestep_scaling")


def check_scheduler(config, family: str) -> None:
    """Refuse a scheduler whose times distill's flow grids would not follow: they shift exponentially (SD3's shift,
    FLUX.1's exp(mu)), never linearly, and do not stretch to a terminal sigma."""
    if config.get("time_shift_type", "exponential") != "exponential" or config.get("shift_terminal"):
        raise DistillError(f"this {family} pipeline's scheduler shifts its times linearly or stretches them to "
                           "shift_terminal; distill's flow grid follows SD3's shift and FLUX.1's exponential dynamic "
                           "shift only")


class SD3Teacher(Teacher):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    prediction_type = "flow"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    shard_blocks = (JointTransformerBlock,)
    single_file = True
    is_pipeline = True
    flow = True
    lora_formats = ("lora",)
    backbone_name = "transformer"  # its folder in the pipeline and its LoRA key prefix
    end_time = 0.0

    def __init__(self, pipe: StableDiffusion3Pipeline, resolution: int, max_text_length: int = 77):
        super().__init__()
        self.pipe = pipe
        self.backbone, self.vae = pipe.transformer, pipe.vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = (
            pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        self.num_train_timesteps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        check_scheduler(pipe.scheduler.config, self.family)
        self.resolution, self.max_text_length = resolution, max_text_length
        self.freeze()

    def feature_layers(self):
        # Every joint block's image tokens (element 1 of its (context, image) output), as LADD reads SD3.
        return tuple((f"transformer_blocks.{i}", 1) for i in range(len(self.backbone.transformer_blocks)))

    def alpha_sigma(self, t):
        return flow_alpha_sigma(t, self.num_train_timesteps)

    def shift_at(self, shape=None) -> float:
        """The sigmas' shift for latents of `shape` (..., h, w; None: its own size's): the scheduler's `shift`, or,
        where it shifts dynamically (FLUX.1), exp(mu) of the image's token count (schedules.dynamic_shift), as the
        pipeline shifts each call by its own size."""
        h, w = shape[-2:] if shape is not None else self.latent_shape(*self.size)[1:]
        p = self.size_multiple // self.pipe.vae_scale_factor  # latent pixels per token side
        return dynamic_shift((h // p) * (w // p), self.pipe.scheduler.config)

    @property
    def shift(self) -> float:
        return self.shift_at()

    def timesteps(self, n: int, shape=None) -> torch.Tensor:
        dynamic = self.pipe.scheduler.config.get("use_dynamic_shifting", False)
        return flow_timesteps(n, self.shift_at(shape), self.num_train_timesteps, dynamic)

    def student_timesteps(self, n: int, shape=None) -> torch.Tensor:
        return flow_student_timesteps(n, self.shift_at(shape), self.num_train_timesteps)

    def scheduler_for(self, renoises: bool, times: list[float], prediction_type: str | None = None,
                      boundary: tuple[float, float] | None = None):
        """The diffusers scheduler, and the pipeline-call arguments, that sample at `times` as distill does:
        FlowMatchLCMScheduler for re-noising samplers, FlowMatchEuler otherwise. Both shift the sigmas they
        are given, so the call gets the unshifted ones."""
        if prediction_type not in (None, self.prediction_type):
            raise DistillError(f"diffusers' flow-matching schedulers read the backbone as a velocity, and this "
                               f"student outputs '{prediction_type}' (method.params.student_output): it has no "
                               "diffusers export; train it with student_output: teacher")
        if renoises and boundary is not None:
            _check_boundary(times, *boundary)
        cls = FlowMatchLCMScheduler if renoises else FlowMatchEulerDiscreteScheduler
        s = [t / self.num_train_timesteps for t in times]
        return cls.from_config(self.pipe.scheduler.config), {
            "sigmas": [round(flow_unshift(v, self.shift), 7) for v in s],
            "max_sequence_length": self.max_text_length}  # T5 padding length changes the joint attention

    def check_sizes(self, sizes: list[tuple[int, int]], field: str) -> None:
        super().check_sizes(sizes, field)
        most = self.backbone.config.get("pos_embed_max_size")  # in tokens a side; none: the table is made per size
        for h, w in sizes if most else ():
            if max(h, w) > most * self.size_multiple:
                raise ConfigError(field, [h, w], f"the {self.family} teacher's position table reaches "
                                  f"{most * self.size_multiple} px a side ({most} tokens of {self.size_multiple} px)")

    def size_config(self) -> dict:
        # Without pos_embed_max_size the position table is built for sample_size, so it must stay as trained.
        return super().size_config() if self.backbone.config.get("pos_embed_max_size") else {}

    @torch.no_grad()
    def encode_prompts(self, prompts, negative=None) -> Cond:
        prompts = list(prompts)
        pe, ne, pp, npool = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=list(negative) if negative else None, max_sequence_length=self.max_text_length)
        return Cond({"embeds": pe, "pooled": pp}, {"embeds": ne, "pooled": npool})

    def _forward(self, backbone, x, t, cond, guidance_cond):
        dtype = backbone.dtype
        return backbone(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond["embeds"].to(dtype),
                        pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]

    def encode(self, images, generator=None):
        cfg = self.vae.config
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.sample(generator) - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, latents):
        cfg = self.vae.config
        return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]

    def single_file_state(self, backbone):
        return ldm.sd3_single_file(self.pipe, backbone)
