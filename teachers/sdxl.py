"""SDXL teachers: a VP UNet with two CLIP text encoders and micro-conditioning (Podell et al. 2023)."""
from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from distill.schedules import vp_alpha_sigma, vp_alphas_cumprod, vp_timesteps
from distill.solvers import guidance_embedding
from teachers import ldm
from teachers.base import Cond, Teacher


def _lcm_scaling(boundary: tuple[float, float] | None) -> float:
    """LCMScheduler's timestep_scaling for a student's (sigma_data, timestep_scaling). It fixes sigma_data = 0.5,
    but c_skip and c_out depend only on timestep_scaling / sigma_data, so scaling by 0.5 / sigma_data carries
    any sigma_data exactly. A student without boundary scalings (ADD, LADD: x0 as it is) gets one so large
    that c_skip < 1e-12 and c_out = 1 in float32 at every t >= 1."""
    if boundary is None:
        return 1e6
    sigma_data, timestep_scaling = boundary
    return timestep_scaling * 0.5 / sigma_data


class SDXLTeacher(Teacher):
    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
    shard_blocks = (BasicTransformerBlock, ResnetBlock2D)
    single_file = True
    is_pipeline = True
    lora_formats = ("lora", "kohya")  # kohya: A1111 and ComfyUI, with the original (LDM) module names
    kohya_base_model = "sdxl_base_v1-0"
    backbone_name = "unet"  # its folder in the pipeline and its LoRA key prefix
    end_time = -1.0  # VP: one step past t = 0 reaches alpha = 1 (diffusers' final_alpha_cumprod = 1)

    def __init__(self, pipe: StableDiffusionXLPipeline, resolution: int, prediction_type: str | None = None):
        super().__init__()
        self.pipe = pipe
        self.backbone, self.vae = pipe.unet, pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        sc = pipe.scheduler.config
        self.prediction_type = prediction_type or sc.get("prediction_type", "epsilon")
        self.num_train_timesteps = sc.get("num_train_timesteps", 1000)
        self.register_buffer("alphas_cumprod", vp_alphas_cumprod(
            self.num_train_timesteps, sc.get("beta_start", 0.00085), sc.get("beta_end", 0.012),
            sc.get("beta_schedule", "scaled_linear")), persistent=False)
        self.resolution = resolution
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (as diffusers' pipelines upcast it)
        self.freeze()

    def feature_layers(self):
        return (("down_blocks.1", 0), ("mid_block", None), ("up_blocks.1", None))

    def alpha_sigma(self, t):
        return vp_alpha_sigma(self.alphas_cumprod, t)

    def timesteps(self, n: int, shape=None) -> torch.Tensor:
        return vp_timesteps(n, self.num_train_timesteps)

    def scheduler_for(self, renoises: bool, times: list[float], prediction_type: str | None = None,
                      boundary: tuple[float, float] | None = None):
        """The diffusers scheduler, and the pipeline-call arguments, that sample at `times` as distill does.

        Re-noising samplers: LCMScheduler at those timesteps, with the student's boundary scalings
        (sigma_data, timestep_scaling), or none. Deterministic ones: DDIM on its trailing grid where that is
        exact, else Euler at those timesteps."""
        config = {**self.pipe.scheduler.config, "prediction_type": prediction_type or self.prediction_type}
        steps = [round(t) for t in times]
        if renoises:
            return LCMScheduler.from_config(config, timestep_scaling=_lcm_scaling(boundary)), {"timesteps": steps}
        n, T = len(steps), self.num_train_timesteps
        if T % n == 0 and steps == self.timesteps(n).tolist():
            return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False,
                                             set_alpha_to_one=True, steps_offset=0), {}
        # DDIMScheduler steps from t to t - T // n, which misses the next time when n does not divide T (at 64
        # steps, 40 of 64 steps). Euler on sigma/alpha at the given timesteps is the same DDIM step (solvers.
        # ddim_step), landing exactly. "leading" only makes its initial noise sqrt(sigma^2 + 1), as x_T = eps.
        return EulerDiscreteScheduler.from_config(
            config, timestep_spacing="leading", final_sigmas_type="zero", interpolation_type="linear",
            timestep_type="discrete", use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False), {"timesteps": steps}

    def call_size(self, height: int, width: int, sized: bool = False) -> dict:
        size = super().call_size(height, width)
        trained = list(self.size)
        if not sized and [height, width] != trained:  # the pipeline's micro-conditioning defaults to the image size
            size |= {"original_size": trained, "crops_coords_top_left": [0, 0], "target_size": trained}
        return size

    @torch.no_grad()
    def encode_prompts(self, prompts, negative=None) -> Cond:
        device = self.device
        pe, ne, pp, npool = self.pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=True,
                                                    negative_prompt=list(negative) if negative else None)
        h, w = self.size
        # Micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop top-left, target size.
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=pe.dtype).repeat(len(pe), 1)
        return Cond({"embeds": pe, "pooled": pp, "time_ids": time_ids},
                    {"embeds": ne, "pooled": npool, "time_ids": time_ids})

    def with_sizes(self, cond, original, crop, target):
        # Micro-conditioning per image (Podell et al. 2023, sec. 2.2, 2.3): its original size, its crop, the bucket.
        ids = torch.cat([original, crop, torch.tensor([target]).expand(len(original), 2)], 1)
        ids = ids.to(cond.pos["time_ids"])
        return Cond({**cond.pos, "time_ids": ids}, {**cond.neg, "time_ids": ids})

    def _forward(self, backbone, x, t, cond, guidance_cond):
        dtype = backbone.dtype
        timestep_cond = None
        if guidance_cond is not None:
            w = torch.as_tensor(guidance_cond, device=x.device).expand(x.shape[0])
            # diffusers' pipelines embed w - 1 (LCM's omega), so plain pipelines drive this student.
            timestep_cond = guidance_embedding(w - 1, backbone.config.time_cond_proj_dim).to(x.device, dtype)
        return backbone(x.to(dtype), t, encoder_hidden_states=cond["embeds"].to(dtype), timestep_cond=timestep_cond,
                        added_cond_kwargs={"text_embeds": cond["pooled"].to(dtype),
                                           "time_ids": cond["time_ids"].to(dtype)}, return_dict=False)[0]

    def encode(self, images, generator=None):
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents):
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]

    def add_guidance_input(self, backbone):
        # LCM's w-conditioning (Luo et al. 2023, sec. 4.2) is diffusers' time_cond_proj_dim: a zero-initialised
        # projection of the w embedding added to the time embedding, so the student starts as the teacher.
        # without diffusers' private keys: `_use_default_values` would reset time_cond_proj_dim to its default
        config = {k: v for k, v in backbone.config.items() if not k.startswith("_")} | {"time_cond_proj_dim": 256}
        with torch.device(backbone.device):  # made where it will live: a real-size UNet's init on CPU takes long
            student = UNet2DConditionModel.from_config(config).to(backbone.dtype)
        missing, unexpected = student.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student

    def single_file_state(self, backbone):
        return ldm.sdxl_single_file(self.pipe, backbone)

    def ldm_names(self):
        return ldm.unet_names(self.backbone.config)
