"""Fast sampling and training, and `distill bench-speed`, which measures it side by side in one process.

Fast path (each optional, each measured by bench-speed):
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
import statistics
import time

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


def time_ms(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds, after `warmup` calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def sampling_row(method, prompts: list[str], steps: int, teacher: bool, guidance: float, repeats: int = 3,
                 amp: str | None = None, seed: int = 0) -> dict:
    """The teacher (DDIM) or the student at `steps`, timed end to end from prompts to pixels."""
    from distill.evaluate import nfe, sample_images

    def run():
        with autocast(method.teacher.device, amp):
            sample_images(method, prompts, steps, seed, guidance, teacher)

    ms = time_ms(run, repeats) / len(prompts)
    return {"who": "teacher" if teacher else "student", "steps": steps, "nfe": nfe(method, steps, guidance, teacher),
            "guidance": guidance, "ms_per_image": ms, "images_per_s": 1000.0 / ms}


def train_step_ms(cfg, repeats: int = 3, compile: bool = False) -> float:
    """Median time of one full training step (every turn: loss, backward, optimiser step) of cfg's method."""
    from distill import data
    from distill.trainer import build_method, encode_batch, select_turn, step_generator

    method = build_method(cfg, "cuda" if torch.cuda.is_available() else "cpu").train()
    fast_path(method, compile=compile)
    dataset = data.build(cfg.data, cfg.teacher.resolution, method.teacher, cfg.train.seed)
    raw = data.collate([dataset[i] for i in range(cfg.data.batch_size)])
    params = {turn: method.parameters_for(turn) for turn in method.turns}
    optimizers = {turn: torch.optim.AdamW(p, lr=1e-6) for turn, p in params.items()}
    calls = iter(range(10**9))

    def step():
        k = next(calls)
        for i, turn in enumerate(method.turns):
            select_turn(params, turn)
            amp = None if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision
            with autocast(method.teacher.device, amp):
                loss = method(encode_batch(raw, method.teacher, step_generator(cfg.train.seed, k, 0, i)), turn).loss
            loss.backward()
            optimizers[turn].step()
            optimizers[turn].zero_grad(set_to_none=True)
        select_turn(params, None)

    return time_ms(step, repeats, warmup=2)


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(fmt(r.get(c, "-")) for c in columns) + " |" for r in rows)]) + "\n"


def bench(run, steps: list[int], teacher_steps: int, teacher_guidance: float, batch_size: int, repeats: int,
          flags: dict, amp: str | None, train: bool, db) -> str:
    """`distill bench-speed`: Markdown with the measurements; sampling rows also go to the leaderboard."""
    import dataclasses

    from distill import config, data, leaderboard
    from distill.evaluate import git_commit, load_run, peak_memory_mb

    ckpt, cfg, method, step = load_run(run)
    device = method.teacher.device
    shown = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v] + (["--train"] if train else [])
    lines = [f"# distill bench-speed {run} {' '.join(shown)}".rstrip(), "",
             f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}; batch {batch_size}, "
             f"{cfg.teacher.resolution} px, median of {repeats}", ""]
    if train:
        rows = []
        for name in ["denoise", "consistency", "progressive", "add", "ladd"]:
            params = {"add": {"feature_net": "vit_tiny_patch16_224", "feature_size": 32}}.get(name, {})
            run_cfg = dataclasses.replace(cfg, method=config.MethodConfig(name, params),
                                          student=dataclasses.replace(cfg.student, guidance_embedding=False),
                                          data=dataclasses.replace(cfg.data, kind="digits", batch_size=batch_size))
            row = {"method": name, "eager_ms": train_step_ms(run_cfg, repeats)}
            if flags.get("compile"):
                row["compiled_ms"] = train_step_ms(run_cfg, repeats, compile=True)
                row["compile_speedup"] = row["eager_ms"] / row["compiled_ms"]
            rows.append(row)
        for r in rows:
            r["vs_fine_tune"] = r["eager_ms"] / rows[0]["eager_ms"]
        lines += [f"Training step (all turns) in ms, {cfg.student.kind} student; `vs_fine_tune`: the eager step over "
                  "a plain denoising fine-tune step (`denoise`) of the same backbone.", "",
                  markdown(rows, ["method", "eager_ms", "compiled_ms", "compile_speedup", "vs_fine_tune"])]
        return "\n".join(lines)

    prompts = [data.DIGIT_PROMPTS[i % 10] for i in range(batch_size)]
    kernels = sdpa_ops(lambda: sampling_row(method, prompts[:1], 1, True, 1.0, 1, amp))
    lines.append(f"attention processors: {', '.join(attention_processors(method.teacher.backbone))}; "
                 f"SDPA kernels that ran: {', '.join(kernels) or 'none'}")
    guidance = cfg.sample.guidance_scale
    rows = [sampling_row(method, prompts, teacher_steps, True, teacher_guidance, repeats, amp)]
    rows += [sampling_row(method, prompts, s, False, guidance, repeats, amp) for s in steps]
    cols = ["who", "steps", "nfe", "guidance", "ms_per_image", "images_per_s", "speedup", "nfe_limit"]
    if any(flags.values()):  # the same student again, with the fast path, in this process
        lines.append(f"fast path: {', '.join(fast_path(method, **flags))}")
        for r in rows[1:]:
            fast = sampling_row(method, prompts, r["steps"], False, guidance, repeats, amp)
            r.update(fast_ms_per_image=fast["ms_per_image"], fast_speedup=r["ms_per_image"] / fast["ms_per_image"])
        cols += ["fast_ms_per_image", "fast_speedup"]
    for r in rows:
        r.update(speedup=rows[0]["ms_per_image"] / r["ms_per_image"], nfe_limit=rows[0]["nfe"] / r["nfe"])
    board = leaderboard.Leaderboard(db)
    for r in rows:
        student = r["who"] == "student"
        board.add({"teacher": cfg.teacher.source, "method": cfg.method.name if student else "teacher",
                   "student": cfg.student.kind if student else "-", "steps": r["steps"], "nfe": r["nfe"],
                   "ms_per_image": r["ms_per_image"], "peak_memory_mb": peak_memory_mb(device),
                   "train_steps": step if student else 0, "config_hash": cfg.hash(), "git_commit": git_commit(),
                   "guidance": r["guidance"], "source": "bench-speed", "speedup": r["speedup"],
                   "nfe_limit": r["nfe_limit"]})
    lines += ["", markdown(rows, cols), "`speedup`: the teacher's ms over the row's ms; `nfe_limit`: the teacher's "
              "NFE over the row's NFE, the speed-up if only network evaluations cost time.", "",
              f"{len(rows)} rows added to {db} (cost columns only)."]
    return "\n".join(lines)
