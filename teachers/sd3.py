"""SD3 teachers: rectified flow with shifted sigmas, an MMDiT, and three text encoders (Esser et al. 2024)."""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, StableDiffusion3Pipeline

from distill.schedules import flow_alpha_sigma, flow_timesteps, flow_unshift
from teachers.base import Cond, Teacher


class SD3Teacher(Teacher):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    prediction_type = "flow"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    backbone_name = "transformer"  # its folder in the pipeline and its LoRA key prefix
    end_time = 0.0

    def __init__(self, pipe: StableDiffusion3Pipeline, resolution: int, max_text_length: int = 77):
        super().__init__()
        self.pipe = pipe
        self.backbone, self.vae = pipe.transformer, pipe.vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = (
            pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        sc = pipe.scheduler.config
        self.shift = sc.get("shift", 3.0)
        self.num_train_timesteps = sc.get("num_train_timesteps", 1000)
        self.resolution, self.max_text_length = resolution, max_text_length
        self.freeze()

    def feature_layers(self):
        # Every joint block's image tokens (element 1 of its (context, image) output), as LADD reads SD3.
        return tuple((f"transformer_blocks.{i}", 1) for i in range(len(self.backbone.transformer_blocks)))

    def alpha_sigma(self, t):
        return flow_alpha_sigma(t, self.num_train_timesteps)

    def timesteps(self, n: int) -> torch.Tensor:
        return flow_timesteps(n, self.shift, self.num_train_timesteps)

    def scheduler_for(self, renoises: bool, times: list[float]):
        """The diffusers scheduler, and the pipeline-call arguments, that sample at `times` as distill does:
        FlowMatchLCMScheduler for re-noising samplers, FlowMatchEuler otherwise. Both shift the sigmas they
        are given, so the call gets the unshifted ones."""
        cls = FlowMatchLCMScheduler if renoises else FlowMatchEulerDiscreteScheduler
        s = [t / self.num_train_timesteps for t in times]
        return cls.from_config(self.pipe.scheduler.config), {
            "sigmas": [round(flow_unshift(v, self.shift), 7) for v in s],
            "max_sequence_length": self.max_text_length}  # T5 padding length changes the joint attention

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
