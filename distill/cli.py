"""`distill` command line: train, generate, eval, export, bench, leaderboard, curves, make-teacher, cache.

User errors print one line (`error: ...`) and exit with code 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from distill.config import MAX_PIXELS, MAX_STEPS
from distill.errors import ConfigError, DistillError


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi], so a bad value fails before any model loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {lo} to {hi if hi else 'any'}")
        return value
    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a finite number >= 1 (1 means no CFG)")
    return value


POSITIVE, STEPS, SEED = _int_in(1), _int_in(1, MAX_STEPS), _int_in(0, 2**63 - 1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other error, instead of the usage block."""
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _train(args) -> None:
    from distill import api, config

    run = api.train(args.config, args.overrides, resume=args.resume, restart=args.restart,
                    stop_after=args.stop_after_steps)
    max_steps = config.read_yaml(run / "config.yaml")["train"]["max_steps"]
    reached = int((run / "checkpoints" / "latest").read_text().removeprefix("step-"))
    if reached < max_steps:
        print(f"stopped at step {reached} of {max_steps}; checkpoint saved in {run}; continue with --resume latest")
    else:
        print(f"run saved in {run}")


def _generate(args) -> None:
    import torch
    from tqdm.auto import tqdm

    from distill import data, fastpath, paths
    from distill.runs import load_run, stitching
    from distill.sampling import conditioning, ddim_sample, parse_stitch, to_pil

    if not Path(args.run).is_dir():
        raise DistillError(f"{args.run} is neither a run folder nor a checkpoint folder")
    out = paths.check_writable(Path(args.out), "--out")
    prompts = list(args.prompt or []) + (data.read_prompts(Path(args.prompts)) if args.prompts else [])
    if not prompts:
        raise DistillError("give at least one --prompt or a --prompts file")
    if args.stitch:
        parse_stitch(args.stitch, args.teacher)
    jobs = [p for p in prompts for _ in range(args.num_per_prompt)]
    names = [f"{i:04d}-{re.sub(r'[^a-z0-9]+', '-', p.lower()).strip('-')[:40]}.png" for i, p in enumerate(jobs)]
    taken = next((n for n in names if (out / n).exists() or (out / n).is_symlink()), None)
    if taken:
        raise DistillError(f"--out {out} already holds {taken}; distill does not replace images: give a new folder")
    _, cfg, method, _ = load_run(Path(args.run), args.overrides)
    _check_images(method.teacher, "generate")
    steps = args.steps or cfg.sample.steps
    method.sample_times(steps)  # a step count the student's grid cannot give is refused before any sampling
    if args.fuse_qkv and args.teacher and method.student.kind == "lora":
        raise DistillError("--fuse-qkv folds the LoRA into the backbone, so the teacher is gone; drop --teacher or --fuse-qkv")
    done = fastpath.fast_path(method, args.compile, args.channels_last, args.fuse_qkv)
    if done:
        print(f"fast path: {', '.join(done)}" + (" (the first batch compiles)" if args.compile else ""))
    teacher = method.teacher
    size = data.sample_size(cfg, teacher)
    shape = teacher.latent_shape(*size)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    guidance = args.guidance_scale if args.guidance_scale is not None else cfg.sample.guidance_scale
    written = 0
    with torch.no_grad(), fastpath.autocast(teacher.device, args.amp), stitching(method, args.stitch, steps) as k:
        if k is not None:
            print(f"T-Stitch: the first {k} of {steps} steps by {args.stitch.rpartition(':')[0]}'s student")
        for lo in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch"):
            batch = jobs[lo:lo + args.batch_size]
            cond = conditioning(teacher, batch, size, cfg.data.buckets is not None)
            if args.teacher:
                latents = ddim_sample(teacher, cond, steps, generator, shape, guidance)
            else:
                latents = method.sample(cond, steps, generator, shape, guidance=guidance)
            for img in to_pil(teacher.decode(latents)):
                with paths.new_file(out / names[written], "image") as tmp:
                    img.save(tmp, format="PNG")
                written += 1
    print(f"wrote {written} images to {out} ({'teacher' if args.teacher else 'student'}, {steps} steps)")


def _check_images(teacher, command: str) -> None:
    if not teacher.makes_images:
        raise DistillError(f"the {teacher.family} teacher samples 2-D points, not images: distill {command} has no "
                           "images to make")


def _sizes(text: str) -> list[tuple[int, int]]:
    """'16x16,32x16' -> [(16, 16), (32, 16)] (height x width)."""
    out = []
    for part in text.split(","):
        h, x, w = part.strip().lower().partition("x")
        if not (x and h.isdigit() and w.isdigit() and 8 <= int(h) <= MAX_PIXELS and 8 <= int(w) <= MAX_PIXELS):
            raise argparse.ArgumentTypeError(f"{part!r} is not HxW with both sides in [8, {MAX_PIXELS}], "
                                             "e.g. 16x16,32x16")
        out.append((int(h), int(w)))
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("each size once")
    return out


def _eval(args) -> None:
    from distill import api

    # each size is measured as its own row, under its own protocol (a table of its own in the leaderboard); a size
    # the family cannot make is refused before that size's sampling
    for size in args.sizes or [None]:
        result = api.evaluate(args.run, args.steps, teacher=args.teacher, prompts=args.prompts,
                              num_per_prompt=args.num_per_prompt, seed=args.seed, guidance_scale=args.guidance_scale,
                              reference=args.reference, reference_size=args.reference_size, bootstrap=args.bootstrap,
                              extractor=args.extractor, extractor_weights=args.extractor_weights,
                              teacher_reference_steps=args.teacher_reference_steps, db=args.db,
                              new_table=args.new_table, out=args.out,
                              num_prompts=args.num_prompts, prompt_seed=args.prompt_seed, center_crop=args.center_crop,
                              clip=args.clip, recipe=args.recipe, stitch=args.stitch, size=size)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.row.items()}
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
        print(f"added row {result.row_id} to {args.db}; sample grid {result.grid}")


def _export(args) -> None:
    from distill import api

    out = api.export(args.run, args.to, args.format, args.dtype, args.steps, args.prompt, args.overwrite, args.db)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


STITCH_HELP = ("RUN:FRACTION: T-Stitch, the other run's (smaller) student takes the first FRACTION of the steps, "
               "this run's the rest (same teacher)")

MARK = "<!-- written by distill {}: it replaces this file when asked to write it again -->\n"


def _check_markdown_out(out: str | None, command: str) -> None:
    """--out, when given, names a Markdown file to write: not a folder, in a folder that can be written, and new or
    one this command wrote before (it starts with MARK): never a user's file, a config among them."""
    from distill import paths

    if out:
        paths.check_own_out(Path(out), command, lambda f: f.read_bytes().startswith(MARK.format(command).encode()),
                            "Markdown")


def _write_markdown(out: str, command: str, text: str) -> None:
    from distill import paths

    paths.write_atomic(Path(out), MARK.format(command) + text)


def _bench_speed(args) -> None:
    from distill import speed

    if not args.train and (args.methods or args.profile):
        raise DistillError(f"--{'methods' if args.methods else 'profile'} times training steps: it needs --train")
    _check_markdown_out(args.out, "bench-speed")
    text = speed.bench(Path(args.run), args.steps, args.teacher_steps, args.teacher_guidance, args.batch_size,
                       args.repeats, dict(compile=args.compile, channels_last=args.channels_last,
                                          fuse_qkv=args.fuse_qkv), args.amp, args.train, Path(args.db),
                       threads=args.threads, methods=args.methods, profile=args.profile)
    print(text)
    if args.out:
        _write_markdown(args.out, "bench-speed", text)
        print(f"wrote {args.out}")


def _bench(args) -> None:
    from distill import bench

    shard = bench.parse_shard(args.shard)
    if args.train_only:
        bench.run(Path(args.matrix), train_only=True, shard=shard)
        print("trained; `distill bench` of the same matrix evaluates the runs")
        return
    if shard != (0, 1):
        raise ConfigError("--shard", args.shard, "only with --train-only (the evaluations share one leaderboard)")
    page = bench.run(Path(args.matrix), eval_only=args.eval_only)
    print(f"open {page.resolve()} in a browser for the table, the quality-versus-NFE plot and the samples")


def _make_teacher(args) -> None:
    import teachers
    from distill import paths

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise DistillError(f"{out} exists and is not empty; choose a new folder")
    paths.check_writable(out, "make-teacher OUT")
    print(f"wrote {teachers.make(args.name, out)} to {out}")


def _plan(args) -> None:
    from distill import plan
    from distill.runs import load_config

    _check_markdown_out(args.out, "plan")
    cfg = load_config(args.config, args.overrides, for_training=False, source=args.architecture is None)
    if args.processes is not None and not (cfg.train.fsdp and args.processes >= 1):
        raise ConfigError("--processes", args.processes, "is the per-process peak of train.fsdp: set train.fsdp=true "
                          "(a full or compressed student) and give at least 1 process")
    text = plan.report(cfg, args.architecture, args.processes)
    print(text)
    if args.out:
        _write_markdown(args.out, "plan", text + "\n")


def _cache(args) -> None:
    import teachers
    from distill import data, paths
    from distill.runs import load_config

    out = Path(args.out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise DistillError(f"--out {out} must name the .safetensors file to write")
    if paths.kind(out) != "missing" or out.is_symlink():
        raise DistillError(f"--out {out} exists; distill cache writes a new file and never replaces one (an export "
                           "or a checkpoint's weights, say): give a new name")
    paths.check_writable(out.parent, "--out")
    cfg = load_config(args.config, args.overrides)
    teacher = teachers.load(cfg.teacher)
    dataset = data.build(cfg.data, teacher.size, teacher, cfg.train.seed)
    path = data.write_cache(teacher, dataset, out, cfg.data.batch_size, cfg.train.seed)
    print(f"cached {len(dataset)} samples to {path}; train with data.kind=latents data.path={path}")


def _leaderboard(args) -> None:
    from distill import leaderboard, paths

    if not Path(args.db).is_file():
        raise DistillError(f"no leaderboard at {args.db}; evaluations add rows to it (set --db to another file)")
    paths.check_writable(Path(args.out), "--out")
    board = leaderboard.Leaderboard(args.db, readonly=True)  # viewing never writes to the file
    rows = board.rows(args.sort)
    print(leaderboard.table(rows))
    md, page = leaderboard.write_reports(rows, Path(args.out), grid_roots=[Path(args.db).parent])
    print(f"{len(rows)} rows; wrote {md} and {page}")


def _curves(args) -> None:
    from distill import validation

    out, text = validation.curves(Path(args.run), Path(args.out) if args.out else None)
    print(text)
    print(f"wrote {out}")


def parser() -> argparse.ArgumentParser:
    import teachers  # the teachers make-teacher can build

    db = os.environ.get("DISTILL_LEADERBOARD", "runs/leaderboard.sqlite")
    db_help = "the leaderboard's SQLite file (default $DISTILL_LEADERBOARD or runs/leaderboard.sqlite)"
    p = _Parser(prog="distill", description="Distil SDXL / SD3 teachers into few-step students.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student from a YAML config")
    t.add_argument("config", help="experiments/<run>.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200")
    t.add_argument("--resume", help="'latest' (in train.output_dir) or a checkpoint folder")
    t.add_argument("--restart", action="store_true", help="train.output_dir holds a run: move it aside to "
                   "<output_dir>.old-<time> and start over")
    t.add_argument("--stop-after-steps", type=POSITIVE, help="run at most this many steps now, checkpoint, exit "
                   "(for time-limited jobs; resume later with --resume latest)")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="sample PNGs from a trained run or checkpoint")
    g.add_argument("run", help="a run folder (uses its latest checkpoint) or a checkpoint folder")
    g.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sample.height=128")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a .txt (one per line) or .jsonl ({\"prompt\": ...}) file")
    g.add_argument("--steps", type=STEPS, help="sampling steps (default: sample.steps of the run)")
    g.add_argument("--guidance-scale", type=_guidance, help="CFG scale at sampling (1 = none)")
    g.add_argument("--num-per-prompt", type=POSITIVE, default=1)
    g.add_argument("--batch-size", type=POSITIVE, default=8)
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--teacher", action="store_true", help="sample the teacher (DDIM) instead of the student")
    g.add_argument("--stitch", help=STITCH_HELP)
    g.add_argument("--out", required=True, help="folder for the PNGs")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone (slow first batch; "
                   "cached in TORCHINDUCTOR_CACHE_DIR for later runs)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--fuse-qkv", action="store_true", help="fused QKV projections (folds a LoRA in first)")
    g.add_argument("--amp", choices=["bf16", "fp16"], help="autocast on GPU (ignored on CPU)")
    g.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="sample with fixed seeds, measure FID/KID, adherence and cost, add a row")
    e.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    e.add_argument("--db", default=db, help=db_help)
    e.add_argument("--out", help="folder for the sample grid (default: <checkpoint>/eval)")
    e.add_argument("--steps", type=STEPS, required=True, help="sampling steps")
    e.add_argument("--teacher", action="store_true", help="evaluate the run's teacher (DDIM) instead of the student")
    e.add_argument("--stitch", help=STITCH_HELP)
    e.add_argument("--sizes", type=_sizes, help="HxW[,HxW...]: sample and measure at each (height x width) size, one "
                   "row and one protocol each, with the same prompts and seeds (default: the teacher's size)")
    e.add_argument("--prompts", help="prompts file: .txt, or .jsonl ({\"prompt\": ..., \"image\": ...}) (default: "
                   "'a handwritten digit 0' .. '9')")
    e.add_argument("--num-per-prompt", type=POSITIVE,
                   help="samples per prompt (default 100: 1,000 for the ten digit prompts)")
    e.add_argument("--num-prompts", type=POSITIVE, help="evaluate a seeded draw of this many of the prompts")
    e.add_argument("--prompt-seed", type=SEED, help="seed of that draw (default 0)")
    e.add_argument("--recipe", help="a YAML of evaluation settings (experiments/eval/); flags given win")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--guidance-scale", type=_guidance, help="CFG scale, or w for a student that reads w")
    e.add_argument("--reference", help="reference images for FID/KID: digits (default), digit_pairs or digit_stacks "
                   "(whose prompts are the default ones), a folder or .txt/.jsonl list of images, or 'prompts' (the images the "
                   ".jsonl prompts pair with)")
    e.add_argument("--center-crop", action=argparse.BooleanOptionalAction,
                   help="crop every image to its central square before the bicubic resize")
    e.add_argument("--clip", help="a local CLIP model folder (safetensors): CLIP score, and diversity on CLIP "
                   "image features")
    e.add_argument("--reference-size", type=POSITIVE, help="real images FID/KID compare with (default: all; "
                   "the 1,797 digits)")
    e.add_argument("--bootstrap", type=POSITIVE, default=200, help="resamples for FID's 95%% interval")
    e.add_argument("--new-table", action="store_true", help="start a new table when the leaderboard holds rows "
                   "measured under another protocol (samples, reference, extractor, resolution, seeds)")
    e.add_argument("--extractor", help="torch-fidelity feature extractor (default: the reference's: distill-digits, "
                   "distill-digit-pairs)")
    e.add_argument("--extractor-weights", help="local weights file for the feature extractor")
    e.add_argument("--teacher-reference-steps", type=_int_in(0, MAX_STEPS), default=0,
                   help="also score against the teacher's own samples at this many steps (e.g. 50)")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="write a student as a diffusers LoRA, a kohya LoRA, a merged pipeline "
                       "and/or one single-file checkpoint, with a model card")
    x.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    x.add_argument("--to", required=True, help="the export folder (must be empty, or pass --overwrite)")
    x.add_argument("--format", action="append", help="lora | kohya | merged | single-file (repeatable; default: "
                   "lora, and kohya for SDXL, for a LoRA student; merged for a full one)")
    x.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 weights")
    x.add_argument("--steps", type=STEPS, help="the sampling steps the card and scheduler recommend "
                   "(default: sample.steps of the run)")
    x.add_argument("--prompt", action="append", help="prompt for the card's sample grid (repeatable)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    x.add_argument("--db", default=db,
                   help="leaderboard whose rows for this recipe go into the model card")
    x.set_defaults(func=_export)

    b = sub.add_parser("bench", help="run a teacher x method x steps matrix: train where needed, evaluate, "
                       "add rows, write the leaderboard pages")
    b.add_argument("matrix", help="experiments/bench_*.yaml")
    only = b.add_mutually_exclusive_group()
    only.add_argument("--train-only", action="store_true", help="train the matrix's runs (skipping trained ones) "
                      "and evaluate nothing; a later plain run evaluates them")
    only.add_argument("--eval-only", action="store_true", help="evaluate the runs already trained and train none "
                      "(beside --train-only trainers still at work)")
    b.add_argument("--shard", default="0/1", metavar="K/N", help="with --train-only: train runs K, K+N, K+2N, ... "
                   "(N processes train the matrix together)")
    b.set_defaults(func=_bench)

    sp = sub.add_parser("bench-speed", help="time a student and its teacher side by side (or, with --train, a "
                        "training step of every method)")
    sp.add_argument("run", help="a run folder or checkpoint; with --train also a config YAML")
    sp.add_argument("--db", default=db, help=db_help)
    sp.add_argument("--out", help="also write the result as Markdown here")
    sp.add_argument("--steps", type=STEPS, nargs="+", default=[1, 2, 4], help="student steps")
    sp.add_argument("--teacher-steps", type=STEPS, default=50)
    sp.add_argument("--teacher-guidance", type=_guidance, default=5.0, help="the teacher's CFG scale")
    sp.add_argument("--batch-size", type=POSITIVE, default=10,
                    help="images per call (prompts cycle through the digits)")
    sp.add_argument("--repeats", type=POSITIVE, default=10, help="timed rounds, at least 10 (5 with "
                    "--train): median and IQR; sampling configurations interleaved round-robin")
    sp.add_argument("--threads", type=POSITIVE, help="torch threads while measuring (default: torch's current "
                    "setting); recorded with the figures")
    sp.add_argument("--compile", action="store_true", help="also time with torch.compile")
    sp.add_argument("--channels-last", action="store_true")
    sp.add_argument("--fuse-qkv", action="store_true", help="fused QKV projections (a LoRA is fused first)")
    sp.add_argument("--amp", choices=["bf16", "fp16"], help="autocast on GPU")
    sp.add_argument("--train", action="store_true", help="time a training step of each method instead")
    sp.add_argument("--methods", nargs="+", help="with --train: time only these methods (and denoise, the unit)")
    sp.add_argument("--profile", type=POSITIVE, default=0, metavar="N",
                    help="with --train: also list each method's N operators with the most self time in one step")
    sp.set_defaults(func=_bench_speed)

    m = sub.add_parser("make-teacher", help="build a random teacher pipeline offline: tiny (tests, demos) or a real "
                       "architecture (speed benchmarks; sdxl-base-arch is 7 GB)")
    m.add_argument("name", choices=teachers.MAKEABLE)
    m.add_argument("out")
    m.set_defaults(func=_make_teacher)

    pl = sub.add_parser("plan", help="memory (parameters, gradients, optimiser state, activations) and FLOPs of one "
                        "training step of a config at its real size, on the meta device: no weights, no GPU")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--architecture", choices=teachers.ARCHITECTURES, help="the teacher's architecture, when "
                    "teacher.source is not a local pipeline folder (a hub id, a single file, a folder elsewhere)")
    pl.add_argument("--processes", type=int, help="with train.fsdp: also the peak per process when the student is "
                    "sharded over this many (one per GPU)")
    pl.add_argument("--out", help="also write the table as Markdown here")
    pl.set_defaults(func=_plan)

    c = sub.add_parser("cache", help="precompute latents and text embeddings of a config's data")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--out", required=True, help="the .safetensors cache to write")
    c.set_defaults(func=_cache)
    lb = sub.add_parser("leaderboard", help="print the leaderboard and write its Markdown and HTML pages")
    lb.add_argument("--db", default=db, help=db_help)
    lb.add_argument("--out", default="runs/leaderboard", help="folder for leaderboard.md and leaderboard.html")
    lb.add_argument("--sort", default="fid", help="column to sort by, ascending (default fid)")
    lb.set_defaults(func=_leaderboard)

    cv = sub.add_parser("curves", help="plot a run's validation scores (FID, adherence) against the training step")
    cv.add_argument("run", help="a run folder trained with train.validate_every")
    cv.add_argument("--out", help="the PNG to write (default RUN/curves.png)")
    cv.set_defaults(func=_curves)
    return p


def _quiet_libraries() -> None:
    """Library warnings (hub retries, deprecations) would bury our one-line errors; --debug keeps them."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop or preemption) taken as Ctrl-C is: the same cleanup runs (a run folder's
    lock file, temporary files) instead of none, and a run resumes from its last checkpoint as after any kill."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (a launcher forwarding it) cannot cut the cleanup
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if hasattr(signal, "SIGXFSZ") and in_main_thread:  # past a file-size limit a write fails (EFBIG, reported
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # below) instead of killing
    if not args.debug:
        _quiet_libraries()
    before = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(args)
    finally:
        if before is not None:  # None: not installed from Python, so nothing to put back
            signal.signal(signal.SIGTERM, before)


def _run(args) -> int:
    try:
        args.func(args)
    except DistillError as e:
        if args.debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # the shell's codes: 143 and 130
    except Exception as e:  # a bug, not a user error: one line here, the whole story in a file
        if args.debug:
            raise
        from distill.paths import write_failure

        reason = write_failure(e)
        if reason:  # the disk, not a bug; every writer leaves what was there before
            print(f"error: distill {args.command} could not write to disk ({reason}); what was there before is kept",
                  file=sys.stderr)
            return 2
        log = _write_traceback(args.command)
        first = " ".join((str(e).splitlines() or [""])[0].split())[:200]
        print(f"error: distill {args.command} failed unexpectedly ({type(e).__name__}: {first}); the traceback is "
              f"in {log} (or run again with --debug)", file=sys.stderr)
        return 1
    return 0


def _write_traceback(command: str) -> str:
    path = Path(tempfile.gettempdir()) / f"distill-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        path.write_text(traceback.format_exc())
    except OSError:
        return "nowhere (the temp folder is not writable)"
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
