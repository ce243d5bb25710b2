"""FLUX.1 teachers: rectified flow on packed latents with a resolution-dependent shift, an MMDiT of double- and
single-stream blocks, CLIP-L pooled and T5 text (Black Forest Labs 2024; diffusers' FluxPipeline).

Methods see the family's latents as they see SD3's, `x_t = (1 - t) x0 + t eps` on [B, C, H/f, W/f]; the
backbone call packs them 2x2 into tokens and unpacks its output. Two kinds of teacher:

- guidance-embedded (FLUX.1-dev, `guidance_embeds: true`): the guidance scale is an input of the backbone. A guided
  prediction is one pass with that input, and every student of such a teacher reads the same input: LoRA students
  and plain full students at 1 (as the pipeline is called with guidance_scale=1), w-students at their w.
- plain (FLUX.1-schnell, or a CFG teacher trained with prompt dropout): guidance > 1 is two-pass CFG against the
  negative prompts, as for SD3.
"""
from __future__ import annotations

import copy

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from safetensors.torch import load_file

from distill.errors import DistillError
from teachers.base import Cond, kohya_module
from teachers.sd3 import SD3Teacher, check_scheduler


# Black Forest Labs' module names (the original layout ComfyUI and kohya's FLUX LoRAs use) for diffusers' modules of
# a double-stream block (transformer_blocks.i -> double_blocks.i) and a single-stream one (-> single_blocks.i). The
# fused ones stack their diffusers parts' outputs in this order.
BFL = {"transformer_blocks": ("double_blocks", {
           "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
           "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}, {
           "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
       "single_transformer_blocks": ("single_blocks", {"proj_out": "linear2", "norm.linear": "modulation.lin"}, {
           "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")})}


def bfl_lora(pairs: dict, alpha: float, out_features) -> dict[str, torch.Tensor]:
    """A LoRA of a FLUX transformer, {diffusers module: (A [r, in], B [out, r])} scaled by alpha / r, in kohya's keys
    with BFL's module names. Where BFL fuses modules (q, k, v into qkv; a single block's q, k, v and MLP input into
    linear1) their LoRAs become one of rank n r: the A's stacked, the B's block-diagonal, alpha times n, so the fused
    update is exactly the parts' updates stacked; a part without a LoRA gets zeros (its `out_features(module)`).
    diffusers' kohya-FLUX converter splits such a block-diagonal LoRA back into the parts."""
    state, done = {}, set()
    for module, (down, up) in pairs.items():
        kind, index, rest = (module.split(".", 2) + ["", ""])[:3]
        if kind not in BFL or not index.isdigit():
            raise DistillError(f"the kohya FLUX layout has no name for the LoRA on {module}; train LoRAs inside the "
                               "double- and single-stream blocks (the default student.lora_targets)")
        block, plain, fused = BFL[kind]
        if rest in plain:
            state |= kohya_module(f"{block}.{index}.{plain[rest]}", down, up, alpha)
            continue
        target = next((name for name, parts in fused.items() if rest in parts), None)
        if target is None:
            raise DistillError(f"the kohya FLUX layout has no name for the LoRA on {module}")
        if (index, target, kind) in done:
            continue
        done.add((index, target, kind))
        rank, width = down.shape
        parts = [pairs.get(f"{kind}.{index}.{part}") or
                 (down.new_zeros(rank, width), up.new_zeros(out_features(f"{kind}.{index}.{part}"), rank))
                 for part in fused[target]]
        state |= kohya_module(f"{block}.{index}.{target}", torch.cat([a for a, _ in parts]),
                              torch.block_diag(*[b for _, b in parts]), alpha * len(parts))
    return state


# The modules outside the blocks, and the per-head norms inside them (diffusers -> BFL). The norm scales are plain
# weights.
BFL_FIXED = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1",
             **{f"time_text_embed.{d}.linear_{i + 1}": f"{b}.{layer}" for d, b in (
                 ("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in"))
                for i, layer in enumerate(("in_layer", "out_layer"))}}
BFL_NORMS = {"transformer_blocks": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                                    "attn.norm_added_q": "txt_attn.norm.query_norm",
                                    "attn.norm_added_k": "txt_attn.norm.key_norm"},
             "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}


def bfl_key(name: str) -> tuple[str, tuple[str, ...]]:
    """Black Forest Labs' key of a diffusers FLUX transformer tensor, and where BFL fuses modules (q, k, v; a single
    block's q, k, v and MLP input), the diffusers tensors stacked in that key in BFL's order (else ())."""
    module, kind = name.rsplit(".", 1)
    block, index, rest = (module.split(".", 2) + ["", ""])[:3]
    if block not in BFL or not index.isdigit():
        return f"{BFL_FIXED[module]}.{kind}", ()
    target, plain, stacks = BFL[block]
    if rest in BFL_NORMS[block]:
        return f"{target}.{index}.{BFL_NORMS[block][rest]}.scale", ()
    if rest in plain:
        return f"{target}.{index}.{plain[rest]}.{kind}", ()
    stack = next(f for f, parts in stacks.items() if rest in parts)
    return f"{target}.{index}.{stack}.{kind}", tuple(f"{block}.{index}.{p}.{kind}" for p in stacks[stack])


def _swapped(name: str, v: torch.Tensor) -> torch.Tensor:
    """The final modulation orders (shift, scale) the other way round in BFL's layout (its own inverse)."""
    return torch.cat(v.chunk(2)[::-1]) if name.startswith("norm_out.linear.") else v


def bfl_single_file(transformer) -> dict[str, torch.Tensor]:
    """A FLUX transformer's weights as one file in Black Forest Labs' layout (flux1-dev.safetensors' keys, the
    transformer alone): what ComfyUI's diffusion-model loader and `FluxTransformer2DModel.from_single_file` read."""
    state, out = transformer.state_dict(), {}
    for name, v in state.items():
        key, parts = bfl_key(name)
        if key not in out:
            out[key] = torch.cat([state[p] for p in parts]) if parts else _swapped(name, v)
    return out


def from_bfl(file: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of bfl_single_file: a diffusers state dict from a BFL-layout one, `reference` (the model's own
    state dict; meta tensors will do) giving the names and the fused parts' sizes. A key the model lacks, or
    lacking one it has, is refused (a dev file's guidance_in read with a schnell config, another depth)."""
    prefix = "model.diffusion_model."  # ComfyUI's checkpoints: the transformer there, the VAE and text encoders beside
    if any(k.startswith(prefix) for k in file):
        file = {k.removeprefix(prefix): v for k, v in file.items() if k.startswith(prefix)}
    try:
        keys = {name: bfl_key(name) for name in reference}
    except KeyError as e:
        raise DistillError(f"teacher.config's FLUX transformer has a module BFL's layout does not name: {e}") from e
    wanted = {key for key, _ in keys.values()}
    if wanted != file.keys():
        odd = sorted(file.keys() - wanted) or sorted(wanted - file.keys())
        raise DistillError(f"the FLUX single file does not match teacher.config's transformer: {odd[0]} (of "
                           f"{len(odd)}) is {'not in the config' if odd[0] in file else 'missing from the file'}; "
                           "give the config the file was made with (dev or schnell, depth)")
    out = {}
    for name, (key, parts) in keys.items():
        v = file[key]
        out[name] = v.split([reference[p].shape[0] for p in parts])[parts.index(name)] if parts else _swapped(name, v)
    return out


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens, as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h x w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """[h/2 * w/2, 3] RoPE positions of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxTeacher(SD3Teacher):
    family = "flux"
    pipeline_class = FluxPipeline
    # SD3's attention and feed-forward names, which FLUX's double blocks share (its single blocks' attention too),
    # and the single blocks' MLP input; diffusers' FLUX LoRA loader reads them all.
    lora_targets = (*SD3Teacher.lora_targets, "proj_mlp")
    shard_blocks = (FluxTransformerBlock, FluxSingleTransformerBlock)
    single_file = True  # BFL's layout, the transformer alone (bfl_single_file)
    single_file_marker = "double_blocks."  # flux1-dev.safetensors' keys, bare or under model.diffusion_model.
    lora_formats = ("lora", "kohya")  # kohya: ComfyUI and kohya's FLUX LoRAs, in BFL's module names
    kohya_base_model = "flux1"

    def __init__(self, pipe: FluxPipeline, resolution: int, max_text_length: int = 77):
        if max_text_length > 512:
            raise DistillError(f"teacher.max_text_length {max_text_length}: FluxPipeline reads at most 512 T5 tokens "
                               "(FLUX.1-dev was trained with 512, schnell with 256)")
        super(SD3Teacher, self).__init__()
        self.pipe = pipe
        self.backbone, self.vae = pipe.transformer, pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.num_train_timesteps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        self.resolution, self.max_text_length = resolution, max_text_length
        self.guidance_embedded = bool(self.backbone.config.guidance_embeds)
        # a w student's file has guidance_in, which from_single_file reads only with a dev-like teacher's config
        self.single_file_w = self.guidance_embedded
        check_scheduler(pipe.scheduler.config, self.family)
        self.freeze()

    def timesteps(self, n: int, shape=None) -> torch.Tensor:
        # FluxPipeline samples at the shifted sigmas 1, (n-1)/n, ..., 1/n: the grid SD3 students use.
        return self.student_timesteps(n, shape)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.size_multiple
        if height % f or width % f:
            raise DistillError(f"the {self.family} teacher makes images whose sides are multiples of {f} px (the "
                               f"VAE's factor times the 2 x 2 packing), not {height} x {width}")
        return (self.vae.config.latent_channels, height // self.pipe.vae_scale_factor,
                width // self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return 2 * self.pipe.vae_scale_factor  # the VAE's factor, times the 2 x 2 packing

    def step_noise(self, shape, draw):
        b, c, h, w = shape  # FluxPipeline's scheduler draws it over the packed tokens: [B, H/2 * W/2, 4C]
        return unpack(draw((b, (h // 2) * (w // 2), 4 * c)), h, w)

    def size_config(self) -> dict:
        return {}  # FluxPipeline sizes its default image by a constant, not by the backbone's config

    def feature_layers(self):
        # The image tokens (element 1 of (text, image)) of every double-stream and single-stream block.
        double = [(f"transformer_blocks.{i}", 1) for i in range(len(self.backbone.transformer_blocks))]
        single = [(f"single_transformer_blocks.{i}", 1) for i in range(len(self.backbone.single_transformer_blocks))]
        return tuple(double + single)

    def call_guidance(self, guidance, reads_w):
        # FluxPipeline feeds guidance_scale only to a backbone with the guidance input (a dev teacher's students, a
        # w-student); a plain backbone is guided only by true CFG against the negative prompt, as distill does.
        if self.guidance_embedded or reads_w or guidance == 1.0:
            return {"guidance_scale": guidance}
        return {"true_cfg_scale": guidance, "negative_prompt": ""}

    @torch.no_grad()
    def encode_prompts(self, prompts, negative=None) -> Cond:
        prompts = list(prompts)
        negative = list(negative) if negative else [""] * len(prompts)
        pe, pp, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                            max_sequence_length=self.max_text_length)
        ne, npool, _ = self.pipe.encode_prompt(negative, negative, device=self.device,
                                               max_sequence_length=self.max_text_length)
        return Cond({"embeds": pe, "pooled": pp}, {"embeds": ne, "pooled": npool})

    def _forward(self, backbone, x, t, cond, guidance_cond):
        dtype, (b, _, h, w) = backbone.dtype, x.shape
        guidance = None
        if backbone.config.guidance_embeds:
            guidance = torch.as_tensor(1.0 if guidance_cond is None else guidance_cond, device=x.device,
                                       dtype=torch.float32).expand(b)
        text = cond["embeds"]
        # the time in the backbone's dtype before the division, as FluxPipeline rounds it (bf16 moves it by 4/1000)
        out = backbone(hidden_states=pack(x.to(dtype)), timestep=t.to(dtype) / self.num_train_timesteps,
                       guidance=guidance,
                       pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=text.to(dtype),
                       txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
                       img_ids=image_ids(h, w, x.device).to(dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def add_guidance_input(self, backbone):
        if backbone.config.guidance_embeds:  # FLUX.1-dev's own guidance input is the w input
            return copy.deepcopy(backbone)
        # A schnell-like backbone gains FLUX.1-dev's guidance embedder, its output layer zeroed, so the student
        # starts as the teacher and a pipeline loads it as a dev-like model.
        with torch.device("meta"):  # no random full-size copy: the weights come from the backbone
            student = FluxTransformer2DModel.from_config(  # without `_use_default_values`, which would reset it
                {k: v for k, v in backbone.config.items() if not k.startswith("_")} | {"guidance_embeds": True})
        state = {k: v.clone() for k, v in backbone.state_dict().items()}  # the student's own, not the teacher's
        missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
        assert not unexpected and all("guidance_embedder" in k for k in missing), (missing, unexpected)
        embedder = student.time_text_embed.guidance_embedder.to_empty(device=backbone.device).to(backbone.dtype)
        embedder.linear_1.reset_parameters()
        torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.weight)
        torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.bias)
        return student

    def single_file_state(self, backbone):
        return bfl_single_file(backbone)

    @classmethod
    def from_single_file(cls, path, config, dtype):
        # BFL's file holds the transformer alone; read here (diffusers' converter assumes FLUX.1's width, 3072)
        if config is None:
            raise DistillError("a FLUX single file holds the transformer alone: give teacher.config")
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(config, subfolder="transformer"))
        state = from_bfl(load_file(path), transformer.state_dict())
        transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        return FluxPipeline.from_pretrained(config, transformer=transformer.eval(), dtype=dtype, use_safetensors=True)

    def single_file_usage(self, path, config):  # BFL's file holds the transformer alone
        return (f'transformer = FluxTransformer2DModel.from_single_file("{path}", config="{config}", '
                f'subfolder="transformer")\npipe = FluxPipeline.from_pretrained("{config}", transformer=transformer)')

    def kohya_lora(self, pairs, alpha):
        return bfl_lora(pairs, alpha, lambda name: self.backbone.get_submodule(name).out_features)
