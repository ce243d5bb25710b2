"""The fast path for sampling and training (each optional, each measured by `distill bench-speed`):

- `torch.compile` of the backbone in place (nn.Module.compile: same parameters, same state-dict names). The
  first call compiles (over a minute for a tiny UNet on CPU, minutes for SDXL on GPU); compiled kernels are
  cached in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER), so later processes start warm.
- channels-last memory format (UNets: convolutions).
- fused QKV projections (diffusers' `fuse_qkv_projections`); a LoRA is folded into the backbone first.
- bf16/fp16 autocast on GPU.
- scaled-dot-product attention is diffusers' default processor; `sdpa_ops` shows which kernel ran.
"""
from __future__ import annotations

import contextlib

import torch

import students

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_path(method, compile: bool = False, channels_last: bool = False, fuse_qkv: bool = False) -> list[str]:
    """Apply the chosen optimisations to the student's (and teacher's) backbone; returns what was done."""
    done = []
    backbones = [method.student.backbone]
    if method.teacher.backbone is not method.student.backbone:
        backbones.append(method.teacher.backbone)
    if fuse_qkv:
        if method.student.kind == "lora":
            students.fuse_lora(method.student.backbone)  # the LoRA is now the backbone: the teacher is gone
            done.append("LoRA fused")
        fused = [b for b in backbones if hasattr(b, "fuse_qkv_projections")]
        for b in fused:
            b.fuse_qkv_projections()
        done.append(f"fused QKV in {len(fused)} backbone(s)")
    if channels_last:
        for b in backbones:
            b.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if compile:
        for b in backbones:
            b.compile()
        done.append("torch.compile")
    return done


def autocast(device: torch.device, dtype: str | None):
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AUTOCAST[dtype])


def attention_processors(backbone) -> list[str]:
    procs = getattr(backbone, "attn_processors", {})
    return sorted({type(p).__name__ for p in procs.values()})


def sdpa_ops(fn) -> list[str]:
    """The scaled-dot-product-attention kernels (aten ops) that one call of `fn` ran, from the profiler:
    e.g. _scaled_dot_product_flash_attention (GPU), _efficient_attention, _flash_attention_for_cpu."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key.startswith("aten::_")})
