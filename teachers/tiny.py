"""Tiny, randomly initialised SDXL, SD3 and FLUX pipelines built offline from configs, tokenizers included.

They exercise the real diffusers code paths (save_pretrained / from_pretrained, encode_prompt, the
UNet and MMDiT forwards, the VAE) in seconds on a CPU. Their weights are random: useful for tests
and for the first demo, not for images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE with no merges: every byte is a token, so any text tokenizes without a hub file."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram vocabulary of printable ASCII characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(i), -2.0) for i in range(33, 127)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip(projection: bool, seed: int, width: int = 32):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=515, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int, **extra) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1, sample_size=64, **extra).eval()


def tiny_sdxl(prediction_type: str = "epsilon", seed: int = 0, text_width_2: int = 32, **unet
              ) -> StableDiffusionXLPipeline:
    """`unet` overrides the UNet's config (e.g. SDXL's own channels, for memory benchmarks). `text_width_2`: the
    second text encoder's width; as in SDXL, set it apart from the first's (32) where a reader tells the two
    encoders apart by width (diffusers' from_single_file)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{
        "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (2, 4),
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 1), "projection_class_embeddings_input_dim": 80,
        "cross_attention_dim": 32 + text_width_2, "norm_num_groups": 8, **unet}).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(False, seed + 1),
                                     text_encoder_2=_clip(True, seed + 2, text_width_2), tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler)


def tiny_sd3(seed: int = 0, layers: int = 2, head_dim: int = 8, text_width_2: int = 32,
             identity_projection: bool = False, **transformer) -> StableDiffusion3Pipeline:
    """`layers` and `head_dim` (4 heads) size the MMDiT; the digits teacher uses a larger one than the tests.
    `text_width_2` (at most 32) and `identity_projection` make the text encoders as SD3's original single file
    has them: CLIP-G narrower or wider than CLIP-L, and CLIP-L's projection the identity. `transformer` adds to
    the MMDiT's config (SD3.5's qk_norm and dual_attention_layers)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4,
                                        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=4 * head_dim,
                                        pooled_projection_dim=64, **transformer).eval()
    t5 = _t5(seed + 3)
    clip_l = _clip(True, seed + 1)
    if identity_projection:
        torch.nn.init.eye_(clip_l.text_projection.weight)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_l, tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(True, seed + 2, text_width_2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer())


def _t5(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=98, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def tiny_flux(guidance_embeds: bool = False, seed: int = 0, layers: int = 1, single_layers: int = 1,
              head_dim: int = 16, heads: int = 2) -> FluxPipeline:
    """FLUX.1-schnell's shape (no guidance input), or with `guidance_embeds` FLUX.1-dev's, at diffusers' own test
    sizes: `layers` double- and `single_layers` single-stream blocks of `heads` heads, RoPE axes (4, 4,
    head_dim - 8); the digits teacher is larger. The VAE's 4 latent channels pack 2 x 2 into 16-channel tokens, and
    the scheduler shifts by the token count as FLUX's does."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers,
                                         num_single_layers=single_layers, attention_head_dim=head_dim,
                                         num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=32,
                                         axes_dims_rope=(4, 4, head_dim - 8), guidance_embeds=guidance_embeds).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=_vae(4, shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=_clip(False, seed + 1), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5(seed + 3), tokenizer_2=t5_tokenizer())


BUILDERS = {"tiny-sdxl": tiny_sdxl, "tiny-sd3": tiny_sd3,
            # SD3.5's shapes: medium's MMDiT-X (a second, image-only attention in its first blocks), large's plain
            # MMDiT, both with RMS-normed q and k
            "tiny-sd35-medium": lambda **kw: tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm", **kw),
            "tiny-sd35-large": lambda **kw: tiny_sd3(qk_norm="rms_norm", **kw), "tiny-flux": tiny_flux,
            "tiny-flux-dev": lambda **kw: tiny_flux(guidance_embeds=True, **kw)}


def build(name: str, out: Path, **overrides) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors), returning the folder."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    out = Path(out)
    with torch.random.fork_rng():  # seeded builds leave the caller's RNG alone
        BUILDERS[name](**overrides).save_pretrained(out, safe_serialization=True)
    return out
