"""Real-size teachers with random weights: SDXL base's, SD3 medium's and FLUX.1-dev's true architectures, built
offline.

The architectures are the JSON files in teachers/architectures/ (shipped; no weights); the tokenizers are tiny.py's,
so no hub file is needed. They are for speed benchmarks and profiling at real cost (`distill make-teacher
sdxl-base-arch OUT`, then `distill bench-speed --train` on a config naming OUT); the default tests never load
them: SDXL's is 3.5B parameters, 7 GB in bfloat16 on disk and in memory, SD3 medium's 7.7B with T5-XXL, FLUX.1-dev's
16.9B (an 11.9B transformer).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import diffusers
import torch
import transformers

from teachers import tiny

ARCHITECTURES = {"sdxl-base-arch": "sdxl-base", "sd3-medium-arch": "sd3-medium", "sd35-medium-arch": "sd35-medium",
                 "sd35-large-arch": "sd35-large", "flux-dev-arch": "flux-dev"}


def architecture(name: str) -> dict:
    """The shipped architecture config of `name` (a key of ARCHITECTURES)."""
    return json.loads(resources.files("teachers").joinpath(f"architectures/{ARCHITECTURES[name]}.json").read_text())


def _text_encoder(spec: dict, tokenizer):
    spec = dict(spec)
    cls = getattr(transformers, spec.pop("class"))
    if cls is transformers.T5EncoderModel:
        return cls(transformers.T5Config(**spec, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    # the special tokens are the tiny tokenizer's, inside CLIP's real vocabulary (the pooled output finds its EOS)
    return cls(transformers.CLIPTextConfig(**spec, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))


def pipeline(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> diffusers.DiffusionPipeline:
    """The architecture `name` with random weights, made directly in `dtype` (SDXL in float32 would be 14 GB)."""
    arch = architecture(name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        parts = {}
        backbone = "unet" if "unet" in arch else "transformer"
        cls = arch.get("transformer_class", "SD3Transformer2DModel") if backbone == "transformer" else \
            "UNet2DConditionModel"
        parts[backbone] = getattr(diffusers, cls)(**arch[backbone])
        parts["vae"] = diffusers.AutoencoderKL(**arch["vae"])
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if key in arch:
                t5 = arch[key]["class"] == "T5EncoderModel"
                tokenizer = tiny.t5_tokenizer() if t5 else tiny.clip_tokenizer()
                parts[key.replace("text_encoder", "tokenizer")] = tokenizer
                parts[key] = _text_encoder(arch[key], tokenizer)
    finally:
        torch.set_default_dtype(default)
    scheduler = dict(arch["scheduler"])
    with torch.device("cpu"):  # float32 and real even where the modules were made on the meta device
        parts["scheduler"] = getattr(diffusers, scheduler.pop("class"))(**scheduler)
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    return getattr(diffusers, arch["pipeline"])(**parts)


def meta_pipeline(folder: Path, dtype: torch.dtype) -> diffusers.DiffusionPipeline:
    """The pipeline saved in `folder` with its models made from their configs on the meta device (no weights read);
    tokenizers and scheduler are loaded as saved (small files)."""
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            cls = getattr(diffusers if spec[0] == "diffusers" else transformers, spec[1])
            if not issubclass(cls, torch.nn.Module):
                parts[name] = cls.from_pretrained(folder, subfolder=name)
                continue
            config = (cls.load_config(folder / name) if spec[0] == "diffusers"
                      else transformers.AutoConfig.from_pretrained(folder / name))
            with torch.device("meta"):
                parts[name] = (cls.from_config(config) if spec[0] == "diffusers" else cls(config)).eval()
    finally:
        torch.set_default_dtype(default)
    return getattr(diffusers, index["_class_name"])(**parts)


def build(name: str, out: Path) -> Path:
    """Write `name` as a diffusers folder (safetensors, bfloat16) and return the folder."""
    with torch.random.fork_rng():
        pipeline(name).save_pretrained(out, safe_serialization=True)
    return Path(out)
