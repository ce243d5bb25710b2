"""`distill bench-speed`: the fast path (distill.fastpath) and every method's training step, measured side by side
in one process.

Timing (`interleaved`): every configuration gets warm-up calls first, then the configurations are timed
round-robin (a, b, c, b, c, a, ...) for `repeats` rounds and each reports its median and interquartile range.
Ratios (speed-ups, cost against a fine-tune step) are medians of per-round ratios, so both sides of a ratio
were measured seconds apart under the same load. Training steps are timed one method after another (see
training_rows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import re
import statistics
import time
from pathlib import Path

import torch

import students
from distill.errors import DistillError
from distill.fastpath import AUTOCAST, attention_processors, autocast, fast_path, sdpa_ops

MIN_REPEATS = 10  # fewer timed rounds give a median and IQR too noisy to compare on a shared machine
MIN_TRAIN_REPEATS = 5  # training steps last long enough (seconds at real size) for five to give a median


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


def once_ms(fn) -> float:
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
                times[k].append(once_ms(calls[k]))
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
            amp: str | None = None, **sized):
    """One call = the teacher (DDIM) or the student at `steps` on the whole batch, prompts to pixels; `sized`:
    evaluation.sample_images' size and sized."""
    from distill.evaluation import sample_images

    def call():
        with autocast(method.teacher.device, amp):
            sample_images(method, prompts, steps, seed, guidance, teacher, batch_size=len(prompts), **sized)
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
                seed: int = 0, **sized) -> dict[int, dict]:
    """The cost fields of a leaderboard row for each of `steps`: the student (or, with `teacher`, the teacher's
    DDIM) timed on `prompts` as one batch, interleaved with the teacher at `reference_steps`, its speed-up
    against that, and what it was measured on; `sized`: the size both sample at (sampler)."""
    jobs = {s: sampler(method, prompts, s, guidance, teacher, seed, **sized) for s in steps}
    ref = reference_steps  # a teacher's own reference row is not timed twice
    if not (teacher and guidance == reference_guidance and ref in jobs):
        ref = ("reference", reference_steps)
        jobs[ref] = sampler(method, prompts, reference_steps, reference_guidance, True, seed, **sized)
    with pinned_threads(threads) as n:
        summary = sampling_summary(interleaved(jobs, repeats, warmup), ref, len(prompts))
    where = provenance(method.teacher.device, n, repeats, len(prompts))
    return {s: {**summary[s], **where} for s in steps}


# --- training ----------------------------------------------------------------------------------------------

def train_stepper(method, cfg, raw: dict | None = None, compile: bool = False):
    """A call that runs one full training step (every turn: loss, backward, clipping, optimiser step) of a built
    method on a fixed batch (`raw`, or the first of cfg's data), as the trainer does; the noise differs per call, as
    in training. Its optimisers are the call's `optimizers` attribute."""
    from distill import data
    from distill.trainer import encode_batch, select_turn, step_generator

    method.to(method.teacher.device).train()  # its buffers and heads where the teacher is, as the trainer's prepare does
    fast_path(method, compile=compile)
    if raw is None:
        dataset = data.build(cfg.data, method.teacher.size, method.teacher, cfg.train.seed)
        first = (range(cfg.data.batch_size) if dataset.bucket_of is None  # one bucket's, when bucketed
                 else next(iter(data.batch_sampler(dataset, cfg.data.batch_size, 1, 0, cfg.train.seed))))
        raw = data.collate([dataset[i] for i in first])
    params = {turn: method.parameters_for(turn) for turn in method.turns}
    optimizers = {turn: torch.optim.AdamW(p, lr=1e-6) for turn, p in params.items()}
    device = method.teacher.device
    amp = None if cfg.train.mixed_precision == "no" else AUTOCAST[cfg.train.mixed_precision]
    calls = iter(range(10**9))

    def step():
        k = next(calls)
        for i, turn in enumerate(method.turns):
            select_turn(params, turn)
            # the trainer's mixed precision
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = method(encode_batch(raw, method.teacher, step_generator(cfg.train.seed, k, 0, i)), turn).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params[turn], cfg.train.max_grad_norm or math.inf)
            optimizers[turn].step()
            optimizers[turn].zero_grad(set_to_none=True)
        select_turn(params, None)
    step.optimizers = optimizers
    return step


@contextlib.contextmanager
def peak_memory(device):
    """{"mb": peak memory of what runs inside}: CUDA's allocator peak, or on CPU the process's resident-set
    high-water mark (Linux VmHWM), both reset on entry, so each measurement is its own."""
    out, device = {}, torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    yield out
    if device.type == "cuda":
        out["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["mb"] = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024


def ratio_interval(top: list[float], bottom: list[float], resamples: int = 2000, seed: int = 0) -> tuple:
    """The ratio of two medians and its 95% percentile-bootstrap interval, each sample resampled on its own
    (the two were timed one after the other, not in pairs)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(top), torch.tensor(bottom)
    boot = (a[torch.randint(len(a), (resamples, len(a)), generator=g)].median(1).values
            / b[torch.randint(len(b), (resamples, len(b)), generator=g)].median(1).values)
    lo, hi = torch.quantile(boot.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
    return a.median().item() / b.median().item(), lo, hi


def _method_config(cfg, name: str, batch_size: int):
    """cfg with another method on the same teacher and student, trained on digits at `batch_size`."""
    from distill import config

    params = {"add": {"feature_net": "vit_tiny_patch16_224", "feature_size": 32}}.get(name, {})
    return dataclasses.replace(cfg, method=config.MethodConfig(name, params),
                               data=dataclasses.replace(cfg.data, kind="digits", batch_size=batch_size))


def train_methods(cfg, batch_size: int, only: list[str] | None = None) -> tuple[dict, list[str]]:
    """{name: config} of every registered method (or those in `only`) that trains cfg's student, denoise (the unit
    of cost) always first, and one line per method that does not train it, with its reason."""
    from distill.errors import ConfigError
    from distill.methods import METHODS

    unknown = sorted(set(only or []) - set(METHODS))
    if unknown:
        raise DistillError(f"--methods {' '.join(unknown)}: no such method; choose from {', '.join(METHODS)}")
    chosen, skipped = {}, []
    for name in ["denoise"] + [m for m in METHODS if m != "denoise" and (not only or m in only)]:
        mcfg = _method_config(cfg, name, batch_size)
        try:
            METHODS[name].check_config(mcfg)
        except ConfigError as e:
            skipped.append(f"{name}: {e}")
            continue
        chosen[name] = mcfg
    return chosen, skipped


def top_ops(fn, rows: int) -> str:
    """The profiler's table of the `rows` operators with the most self time in one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows)


def step_row(name: str, times: list[float], peak_mb: float, fine_tune: dict | None) -> dict:
    """A timed training step's row: median and IQR, and its median and peak memory as ratios to the fine-tune's row
    (`fine_tune`; None for the fine-tune itself), the time's with a 95% bootstrap interval."""
    ratio, lo, hi = (1.0, 1.0, 1.0) if fine_tune is None else ratio_interval(times, fine_tune["times_ms"])
    median, iqr = median_iqr(times)
    return {"method": name, "eager_ms": median, "eager_iqr": iqr, "times_ms": times,
            "vs_fine_tune": ratio, "vs_fine_tune_95ci": f"[{lo:.3g}, {hi:.3g}]", "peak_mb": peak_mb,
            "peak_vs_fine_tune": 1.0 if fine_tune is None else peak_mb / fine_tune["peak_mb"]}


def training_rows(cfg, batch_size: int, repeats: int, compile: bool, warmup: int = 2,
                  methods: list[str] | None = None, profile: int = 0) -> tuple[list[dict], list, dict]:
    """Every method's training step on one loaded teacher, one method at a time: its student is built (a LoRA is
    put on the teacher's backbone), warmed up, timed `repeats` times with its peak memory, and taken off again.
    A real-size teacher leaves room for one student at a time, so the methods are not interleaved. With `profile`,
    also {method: its top `profile` operators by self time in one more, untimed step}."""
    import teachers
    from distill.runs import build_method, default_device

    chosen, skipped = train_methods(cfg, batch_size, methods)
    teacher = teachers.load(cfg.teacher, default_device())
    times, peaks, profiles = {}, {}, {}
    for mode in ["eager", "compiled"][:1 + compile]:  # compiling is in place: the teacher stays compiled after
        for name, mcfg in chosen.items():
            method = build_method(mcfg, teacher.device, teacher)
            step = train_stepper(method, mcfg, compile=mode == "compiled")
            with peak_memory(teacher.device) as peak:
                times[name, mode] = interleaved({name: step}, repeats, warmup)[name]
            peaks[name, mode] = peak["mb"]
            if profile and mode == "eager":
                profiles[name] = top_ops(step, profile)
            del method, step
            students.fuse_lora(teacher.backbone, merge=False)  # the bare teacher for the next method
            gc.collect()
    rows = []
    for name in chosen:
        # denoise, the unit, is chosen first
        row = step_row(name, times[name, "eager"], peaks[name, "eager"], rows[0] if rows else None)
        if compile:
            compiled = times[name, "compiled"]
            row["compiled_ms"], row["compiled_iqr"] = median_iqr(compiled)
            row["compile_speedup"], _, _ = ratio_interval(row["times_ms"], compiled)
        rows.append(row)
    return rows, skipped, profiles


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
          min_repeats: int | None = None, methods: list[str] | None = None, profile: int = 0) -> str:
    """`distill bench-speed`: Markdown with the measurements; sampling rows also go to the leaderboard. `run`: a run
    folder or checkpoint; with `train`, also a config YAML (only its teacher, student and train settings count).
    `min_repeats` exists for tests, which need no statistics, only the plumbing."""
    from distill import checkpoint
    from distill.runs import default_device, load_config, load_run

    if min_repeats is None:
        min_repeats = MIN_TRAIN_REPEATS if train else MIN_REPEATS
    check_args(steps, teacher_steps, batch_size, repeats, threads, min_repeats)
    check_count("warmup", warmup, 1)
    shown = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v] + (["--train"] if train else [])
    with pinned_threads(threads) as n:
        if train:
            path = Path(run)
            cfg = load_config(path if path.suffix in (".yaml", ".yml") and path.is_file() else
                              checkpoint.find(path, str(run)) / "config.yaml", for_training=False)
            device, order = default_device(), "one method after another"
        else:
            ckpt, cfg, method, step = load_run(run)
            device, order = method.teacher.device, "configurations interleaved round-robin"
        lines = [f"# distill bench-speed {run} {' '.join(shown)}".rstrip(), "",
                 f"device: {device_name(device)} ({n} threads), torch {torch.__version__}; batch {batch_size}, "
                 f"{cfg.teacher.pixels} px; median and IQR of {repeats} rounds after "
                 f"{warmup} warm-up calls, {order}, in this one process", ""]
        if train:
            return "\n".join(lines + _training_report(cfg, batch_size, repeats, flags.get("compile"), warmup, methods,
                                                       profile))
        return "\n".join(lines + _sampling_report(run, cfg, method, step, steps, teacher_steps, teacher_guidance,
                                                  batch_size, repeats, flags, amp, db, warmup, n))


def _training_report(cfg, batch_size, repeats, compile, warmup, methods, profile) -> list[str]:
    rows, skipped, profiles = training_rows(cfg, batch_size, repeats, bool(compile), warmup, methods, profile)
    cols = ["method", "eager_ms", "eager_iqr", "vs_fine_tune", "vs_fine_tune_95ci", "peak_mb", "peak_vs_fine_tune"]
    cols += ["compiled_ms", "compiled_iqr", "compile_speedup"] if compile else []
    s = cfg.student
    student = f"LoRA rank {s.lora_rank}" if s.kind == "lora" else "full"
    return [f"Training step (all turns, as the trainer runs them) in ms: {student} student, teacher "
            f"{cfg.teacher.source} in {cfg.teacher.dtype}, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}, mixed precision {cfg.train.mixed_precision}. "
            "`vs_fine_tune`: the method's median step over the median step of a plain denoising fine-tune "
            "(`denoise`) of the same student, with a 95% bootstrap interval; `eager_iqr`: interquartile range; "
            "`peak_mb`: peak memory while the method's steps ran (GPU: allocated; CPU: the process's resident set, "
            "teacher included), and its ratio to the fine-tune's.", "", markdown(rows, cols)] + (
        ["Not timed (they do not train this student):", "", *[f"- {line}" for line in skipped], ""] if skipped else []
    ) + [line for name, table in profiles.items()
         for line in [f"## Top operators by self time, one `{name}` step (torch.profiler)", "", "```", table, "```", ""]]


def _sampling_report(run, cfg, method, step, steps, teacher_steps, teacher_guidance, batch_size, repeats, flags,
                     amp, db, warmup, threads) -> list[str]:
    from distill import digits

    prompts = [digits.DIGIT_PROMPTS[i % 10] for i in range(batch_size)]
    kernels = sdpa_ops(sampler(method, prompts[:1], 1, 1.0, True, amp=amp))
    lines = [f"attention processors: {', '.join(attention_processors(method.teacher.backbone))}; "
             f"SDPA kernels that ran: {', '.join(kernels) or 'none'}"]
    guidance = cfg.sample.guidance_scale
    jobs = {("teacher", teacher_steps): sampler(method, prompts, teacher_steps, teacher_guidance, True, amp=amp)}
    jobs.update({("student", s): sampler(method, prompts, s, guidance, False, amp=amp) for s in steps})
    if any(flags.values()):  # a second copy of the student with the fast path, timed in the same rounds
        from distill.runs import load_run

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
    from distill.evaluation import nfe

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
    from distill.evaluation import peak_memory_mb, row_identity

    board = leaderboard.Leaderboard(db)
    device = method.teacher.device
    for r in rows:
        student = r["who"] == "student"
        board.add({**row_identity(cfg, r["steps"], r["guidance"], not student, step), "nfe": r["nfe"],
                   "ms_per_image": r["ms_per_image"], "ms_iqr": r["ms_iqr"], "images_per_s": r["images_per_s"],
                   "peak_memory_mb": peak_memory_mb(device), "source": "bench-speed", "speedup": r["speedup"],
                   "speedup_iqr": r["speedup_iqr"], "speedup_reference_steps": rows[0]["steps"],
                   "nfe_limit": r["nfe_limit"], **provenance(device, threads, repeats, batch_size)})
