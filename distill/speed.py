"""Fast sampling and training, and `distill bench-speed`, which measures it side by side in one process.

Fast path (each optional, each measured by bench-speed):
- `torch.compile` of the backbone in place (nn.Module.compile: same parameters, same state-dict names). The
  first call compiles (over a minute for a tiny UNet on CPU, minutes for SDXL on GPU); compiled kernels are
  cached in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER), so later processes start warm.
- channels-last memory format (UNets: convolutions).
- fused QKV projections (diffusers' `fuse_qkv_projections`); a LoRA is folded into the backbone first.
- bf16/fp16 autocast on GPU.
- scaled-dot-product attention is diffusers' default processor; `sdpa_ops` shows which kernel ran.

Timing (`interleaved`): every configuration gets warm-up calls first, then the configurations are timed
round-robin (a, b, c, b, c, a, ...) for `repeats` rounds and each reports its median and interquartile range.
Ratios (speed-ups, cost against a fine-tune step) are medians of per-round ratios, so both sides of a ratio
were measured seconds apart under the same load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time

import torch

import students
from distill.errors import DistillError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_REPEATS = 10  # fewer timed rounds give a median and IQR too noisy to compare on a shared machine
TRAIN_METHODS = ["denoise", "consistency", "progressive", "add", "ladd"]  # denoise first: the unit of cost


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


# --- measuring ---------------------------------------------------------------------------------------------

def check_count(flag: str, value, minimum: int) -> None:
    """A count given on the command line (or by a caller), refused in one line before any model loads."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DistillError(f"{flag} must be an integer >= {minimum}, got {value!r}")


@contextlib.contextmanager
def pinned_threads(threads: int | None):
    """Run with exactly `threads` intra-op threads (None: leave torch's setting), restored afterwards: a
    measurement that names its thread count must not depend on what the process happened to set before."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def provenance(device, threads: int, repeats: int, batch_size: int) -> dict:
    """What a timed figure was measured on, stored beside it in a leaderboard row."""
    return {"device": device_name(device), "threads": threads, "timing_repeats": repeats, "timing_batch": batch_size}


def _once_ms(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU call returns before its kernels finish
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def interleaved(calls: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of each call in each of `repeats` rounds, after `warmup` untimed calls of each (compilation,
    allocator and optimiser state happen there).

    One round calls every configuration once. On a shared CPU the load from other processes drifts over
    seconds; timing one block of repeats after another charges that drift to whichever block ran at the time,
    while round-robin spreads it over all of them. The order rotates each round so no configuration always
    follows the same neighbour (caches, clock boost). The garbage collector is off while timing, as in timeit,
    so a collection lands in no one's measurement."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    keys, times = list(calls), {k: [] for k in calls}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[k].append(_once_ms(calls[k]))
    finally:
        if enabled:
            gc.enable()
    return times


def median_iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1


def ratio(top: list[float], bottom: list[float]) -> tuple[float, float]:
    """Median and IQR of per-round ratios: each pair was measured in the same round, under the same load."""
    return median_iqr([a / b for a, b in zip(top, bottom, strict=True)])


# --- sampling ----------------------------------------------------------------------------------------------

def sampler(method, prompts: list[str], steps: int, guidance: float, teacher: bool, seed: int = 0,
            amp: str | None = None):
    """One call = the teacher (DDIM) or the student at `steps` on the whole batch, prompts to pixels."""
    from distill.evaluate import sample_images

    def call():
        with autocast(method.teacher.device, amp):
            sample_images(method, prompts, steps, seed, guidance, teacher, batch_size=len(prompts))
    return call


def sampling_summary(times: dict, reference, batch_size: int) -> dict[str, dict]:
    """Per timed sampler: ms/image (median, IQR), images/s and the speed-up over the `reference` sampler."""
    out = {}
    for key, ms in times.items():
        median, iqr = median_iqr([t / batch_size for t in ms])
        speedup, speedup_iqr = ratio(times[reference], ms)
        out[key] = {"ms_per_image": median, "ms_iqr": iqr, "images_per_s": 1000.0 / median, "speedup": speedup,
                    "speedup_iqr": speedup_iqr}
    return out


def timed_costs(method, prompts: list[str], steps: list[int], guidance: float, teacher: bool, reference_steps: int,
                reference_guidance: float, repeats: int, warmup: int = 1, threads: int | None = None,
                seed: int = 0) -> dict[int, dict]:
    """The cost fields of a leaderboard row for each of `steps`: the student (or, with `teacher`, the teacher's
    DDIM) timed on `prompts` as one batch, interleaved with the teacher at `reference_steps`, its speed-up
    against that, and what it was measured on."""
    jobs = {s: sampler(method, prompts, s, guidance, teacher, seed) for s in steps}
    ref = reference_steps  # a teacher's own reference row is not timed twice
    if not (teacher and guidance == reference_guidance and ref in jobs):
        ref = ("reference", reference_steps)
        jobs[ref] = sampler(method, prompts, reference_steps, reference_guidance, True, seed)
    with pinned_threads(threads) as n:
        summary = sampling_summary(interleaved(jobs, repeats, warmup), ref, len(prompts))
    where = provenance(method.teacher.device, n, repeats, len(prompts))
    return {s: {**summary[s], **where} for s in steps}


# --- training ----------------------------------------------------------------------------------------------

def train_stepper(cfg, compile: bool = False):
    """A call that runs one full training step (every turn: loss, backward, optimiser step) of cfg's method on
    a fixed batch; the noise differs per call, as in training."""
    from distill import data
    from distill.trainer import build_method, encode_batch, select_turn, step_generator

    method = build_method(cfg, "cuda" if torch.cuda.is_available() else "cpu").train()
    fast_path(method, compile=compile)
    dataset = data.build(cfg.data, cfg.teacher.resolution, method.teacher, cfg.train.seed)
    raw = data.collate([dataset[i] for i in range(cfg.data.batch_size)])
    params = {turn: method.parameters_for(turn) for turn in method.turns}
    optimizers = {turn: torch.optim.AdamW(p, lr=1e-6) for turn, p in params.items()}
    amp = None if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision
    calls = iter(range(10**9))

    def step():
        k = next(calls)
        for i, turn in enumerate(method.turns):
            select_turn(params, turn)
            with autocast(method.teacher.device, amp):
                loss = method(encode_batch(raw, method.teacher, step_generator(cfg.train.seed, k, 0, i)), turn).loss
            loss.backward()
            optimizers[turn].step()
            optimizers[turn].zero_grad(set_to_none=True)
        select_turn(params, None)
    return step


def _method_config(cfg, name: str, batch_size: int):
    """cfg with another method on the same teacher and student kind, trained on digits at `batch_size`."""
    from distill import config

    params = {"add": {"feature_net": "vit_tiny_patch16_224", "feature_size": 32}}.get(name, {})
    return dataclasses.replace(cfg, method=config.MethodConfig(name, params),
                               student=dataclasses.replace(cfg.student, guidance_embedding=False),
                               data=dataclasses.replace(cfg.data, kind="digits", batch_size=batch_size))


def training_rows(cfg, batch_size: int, repeats: int, compile: bool, warmup: int = 2) -> list[dict]:
    """Every method's training step, eager (and compiled), all built first and timed interleaved."""
    steps = {}
    for name in TRAIN_METHODS:
        steps[name, "eager"] = train_stepper(_method_config(cfg, name, batch_size))
        if compile:
            steps[name, "compiled"] = train_stepper(_method_config(cfg, name, batch_size), compile=True)
    times = interleaved(steps, repeats, warmup)
    unit = times[TRAIN_METHODS[0], "eager"]
    rows = []
    for name in TRAIN_METHODS:
        eager = times[name, "eager"]
        row = dict(zip(["method", "eager_ms", "eager_iqr"], [name, *median_iqr(eager)]))
        row["vs_fine_tune"], row["vs_fine_tune_iqr"] = ratio(eager, unit)
        if compile:
            compiled = times[name, "compiled"]
            row["compiled_ms"], row["compiled_iqr"] = median_iqr(compiled)
            row["compile_speedup"], _ = ratio(eager, compiled)
        rows.append(row)
    return rows


# --- the command -------------------------------------------------------------------------------------------

def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(fmt(r.get(c, "-")) for c in columns) + " |" for r in rows)]) + "\n"


def check_args(steps: list[int], teacher_steps: int, batch_size: int, repeats: int, threads: int | None,
               min_repeats: int = MIN_REPEATS) -> None:
    for s in steps:
        check_count("--steps", s, 1)
    check_count("--teacher-steps", teacher_steps, 1)
    check_count("--batch-size", batch_size, 1)
    check_count("--repeats", repeats, min_repeats)
    if threads is not None:
        check_count("--threads", threads, 1)


def bench(run, steps: list[int], teacher_steps: int, teacher_guidance: float, batch_size: int, repeats: int,
          flags: dict, amp: str | None, train: bool, db, threads: int | None = None, warmup: int = 2,
          min_repeats: int = MIN_REPEATS) -> str:
    """`distill bench-speed`: Markdown with the measurements; sampling rows also go to the leaderboard.
    `min_repeats` exists for tests, which need no statistics, only the plumbing."""
    from distill.evaluate import load_run

    check_args(steps, teacher_steps, batch_size, repeats, threads, min_repeats)
    check_count("warmup", warmup, 1)
    with pinned_threads(threads) as n:
        ckpt, cfg, method, step = load_run(run)
        shown = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v] + (["--train"] if train else [])
        lines = [f"# distill bench-speed {run} {' '.join(shown)}".rstrip(), "",
                 f"device: {device_name(method.teacher.device)} ({n} threads), torch {torch.__version__}; batch "
                 f"{batch_size}, {cfg.teacher.resolution} px; median and IQR of {repeats} rounds after {warmup} "
                 "warm-up calls, configurations interleaved round-robin in this one process", ""]
        if train:
            return "\n".join(lines + _training_report(cfg, batch_size, repeats, flags.get("compile"), warmup))
        return "\n".join(lines + _sampling_report(run, cfg, method, step, steps, teacher_steps, teacher_guidance,
                                                  batch_size, repeats, flags, amp, db, warmup, n))


def _training_report(cfg, batch_size, repeats, compile, warmup) -> list[str]:
    rows = training_rows(cfg, batch_size, repeats, bool(compile), warmup)
    cols = ["method", "eager_ms", "eager_iqr", "vs_fine_tune", "vs_fine_tune_iqr"]
    cols += ["compiled_ms", "compiled_iqr", "compile_speedup"] if compile else []
    return [f"Training step (all turns) in ms, {cfg.student.kind} student; `vs_fine_tune`: the eager step over a "
            "plain denoising fine-tune step (`denoise`) of the same backbone, the median of per-round ratios; "
            "`*_iqr`: interquartile ranges.", "", markdown(rows, cols)]


def _sampling_report(run, cfg, method, step, steps, teacher_steps, teacher_guidance, batch_size, repeats, flags,
                     amp, db, warmup, threads) -> list[str]:
    from distill import data

    prompts = [data.DIGIT_PROMPTS[i % 10] for i in range(batch_size)]
    kernels = sdpa_ops(sampler(method, prompts[:1], 1, 1.0, True, amp=amp))
    lines = [f"attention processors: {', '.join(attention_processors(method.teacher.backbone))}; "
             f"SDPA kernels that ran: {', '.join(kernels) or 'none'}"]
    guidance = cfg.sample.guidance_scale
    jobs = {("teacher", teacher_steps): sampler(method, prompts, teacher_steps, teacher_guidance, True, amp=amp)}
    jobs.update({("student", s): sampler(method, prompts, s, guidance, False, amp=amp) for s in steps})
    if any(flags.values()):  # a second copy of the student with the fast path, timed in the same rounds
        from distill.evaluate import load_run

        fast = load_run(run)[2]
        lines.append(f"fast path: {', '.join(fast_path(fast, **flags))}")
        jobs.update({("fast", s): sampler(fast, prompts, s, guidance, False, amp=amp) for s in steps})
    rows = _sampling_rows(method, interleaved(jobs, repeats, warmup), teacher_guidance, guidance, batch_size)
    cols = ["who", "steps", "nfe", "guidance", "ms_per_image", "ms_iqr", "images_per_s", "speedup", "speedup_iqr",
            "nfe_limit"] + (["fast_ms_per_image", "fast_ms_iqr", "fast_speedup"] if any(flags.values()) else [])
    _add_cost_rows(rows, cfg, method, step, db, threads, repeats, batch_size)
    return lines + ["", markdown(rows, cols), "`speedup`: the teacher's ms over the row's ms (median of per-round "
                    "ratios); `nfe_limit`: the teacher's NFE over the row's NFE, the speed-up if only network "
                    "evaluations cost time; `*_iqr`: interquartile ranges.", "",
                    f"{len(rows)} rows added to {db} (cost columns only)."]


def _sampling_rows(method, times: dict, teacher_guidance: float, guidance: float, batch_size: int) -> list[dict]:
    """The teacher's row first, then the student's; a fast-path twin's figures join its plain student's row."""
    from distill.evaluate import nfe

    teacher_key = next(iter(times))
    timed = sampling_summary(times, teacher_key, batch_size)
    rows = []
    for (who, s), t in timed.items():
        if who == "fast":
            continue
        g = teacher_guidance if who == "teacher" else guidance
        rows.append({"who": who, "steps": s, "nfe": nfe(method, s, g, who == "teacher"), "guidance": g, **t})
        if who == "student" and ("fast", s) in timed:
            rows[-1].update(fast_ms_per_image=timed["fast", s]["ms_per_image"], fast_ms_iqr=timed["fast", s]["ms_iqr"],
                            fast_speedup=ratio(times["student", s], times["fast", s])[0])
    for r in rows:
        r["nfe_limit"] = rows[0]["nfe"] / r["nfe"]
    return rows


def _add_cost_rows(rows, cfg, method, step, db, threads, repeats, batch_size) -> None:
    from distill import leaderboard
    from distill.evaluate import git_commit, peak_memory_mb

    board = leaderboard.Leaderboard(db)
    device = method.teacher.device
    for r in rows:
        student = r["who"] == "student"
        board.add({"teacher": cfg.teacher.source, "method": cfg.method.name if student else "teacher",
                   "student": cfg.student.kind if student else "-", "steps": r["steps"], "nfe": r["nfe"],
                   "ms_per_image": r["ms_per_image"], "ms_iqr": r["ms_iqr"], "images_per_s": r["images_per_s"],
                   "peak_memory_mb": peak_memory_mb(device), "train_steps": step if student else 0,
                   "config_hash": cfg.hash(), "git_commit": git_commit(), "guidance": r["guidance"],
                   "source": "bench-speed", "speedup": r["speedup"], "speedup_iqr": r["speedup_iqr"],
                   "nfe_limit": r["nfe_limit"], **provenance(device, threads, repeats, batch_size)})
