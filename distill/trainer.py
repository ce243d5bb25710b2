"""The one training loop: a method's turns under Accelerate, with checkpoints, resume, trackers and a bar.

Per global step, `gradient_accumulation_steps` batches are read once; each turn of the method runs
over them (forward, backward) and then steps its own optimiser and LR schedule.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

import students
from distill import checkpoint, config, data, fastpath, paths, sharding, validation
from distill.config import Config, TrainConfig
from distill.errors import DistillError
from distill.methods import METHODS, Method
from distill.runs import build_method
from distill.sampling import student_folder_sampling
from teachers.base import Cond


def step_generator(seed: int, step: int, shard: int, turn: int) -> torch.Generator:
    """The generator for one forward: a pure function of where it is in the run. `shard` numbers the global
    batch's slices (micro * world + rank), so N processes draw what one process accumulating N micro-batches
    draws."""
    state = np.random.SeedSequence([seed, step, shard, turn]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def check_same_buckets(accelerator, bucket_of: list[int] | None) -> None:
    """Every process sorted the images into the same buckets (each reads the headers itself; one that read a file
    differently would draw other batches than the rest, silently)."""
    if bucket_of is None or accelerator.num_processes == 1:
        return
    digest = int.from_bytes(hashlib.sha256(np.asarray(bucket_of, np.int64).tobytes()).digest()[:7], "big")
    seen = accelerator.gather(torch.tensor([digest], device=accelerator.device))
    if not bool((seen == seen[0]).all()):
        raise DistillError("the processes sorted the images into different buckets (a file read differently by one "
                           "of them?); check the data set's files, or cache it once with distill cache")


def select_turn(turn_params: dict[str, list], turn: str | None) -> None:
    """Let gradients reach only `turn`'s parameters (all trainable ones for None)."""
    for other, params in turn_params.items():
        for p in params:
            p.requires_grad_(turn is None or other == turn)


@torch.no_grad()
def encode_batch(raw: dict, teacher, generator: torch.Generator) -> dict:
    """Text to conditioning and images to latents with the frozen teacher, unless the cache has them."""
    flat = checkpoint.section(raw, "cond.")
    cond = Cond.from_flat(flat).to(teacher.device) if flat else teacher.encode_prompts(raw["prompt"])
    batch = {"prompt": raw["prompt"], "cond": cond, "generator": generator}
    if "latents" in raw:
        batch["latents"] = raw["latents"].to(teacher.device).float()
    elif "image" in raw:
        batch["image"] = raw["image"].to(teacher.device)
        batch["latents"] = teacher.encode(batch["image"], generator).float()
    if "original_size" in raw:  # a bucketed batch: each image's own size conditioning
        batch["cond"] = teacher.with_sizes(cond, raw["original_size"], raw["crop"], tuple(raw["image"].shape[-2:]))
    return batch


# What a checkpoint's weights are shaped by (a resume whose config changes one of these cannot load them), and the
# turn ratios its optimisers' schedules were made for.
SHAPED_BY = ("method.name", "teacher.source", "student.kind", "student.lora_rank", "student.lora_alpha",
             "student.lora_targets", "student.guidance_embedding", "student.compression", "train.turn_every")


def _check_resumable(cfg: Config, ckpt: Path, step: int, out: Path) -> None:
    """Refuse a resume that would mix two runs, train backwards, or load weights of another shape."""
    if not paths.contains(out / "checkpoints", ckpt) and checkpoint.run_marker(out):
        raise DistillError(f"--resume {ckpt} is a checkpoint of another run, and train.output_dir {out} holds a run "
                           "of its own: resuming would mix the two; give a new train.output_dir")
    if step > cfg.train.max_steps:
        raise DistillError(f"train.max_steps {cfg.train.max_steps} is below the checkpoint's step {step}: a resume "
                           "trains on from its step (raise train.max_steps, or export that checkpoint as it is)")
    saved = config.read_yaml(ckpt / "config.yaml")
    now = cfg.to_dict()
    for field in SHAPED_BY:
        section, name = field.split(".")
        was, new = saved.get(section, {}).get(name), now[section][name]
        if was != new:
            raise DistillError(f"cannot resume: {field} is {new!r} in this config and {was!r} in the checkpoint "
                               f"{ckpt}; resume with the original value or start a new train.output_dir")


def check_output_dir(out: Path, resume: str | None, restart: bool) -> Path | None:
    """Refuse a start that would overwrite or mix with what `out` holds; with `restart`, the path the old run
    is moved aside to (None when there is nothing to move)."""
    if restart and out.expanduser().is_symlink():
        raise DistillError(f"train.output_dir {out} is a symbolic link; --restart moves a run folder, not a link to "
                           f"one: give the folder itself ({out.expanduser().resolve()})")
    out = out.expanduser().resolve()
    own = out / "config.yaml"
    if own.exists() and not config.written_by_distill(own) and not (out / "checkpoints").is_dir():
        raise DistillError(f"train.output_dir {out} holds a config.yaml that distill did not write (your own "
                           "config?); it would be overwritten, so choose another train.output_dir")
    marker = checkpoint.run_marker(out)
    if resume or marker is None:
        paths.check_writable(out, "train.output_dir")
        return None
    if not restart:
        raise DistillError(f"train.output_dir {out} already holds a run (it has {marker}); continue it with "
                           "--resume latest, or pass --restart to move it aside and start over")
    if paths.contains(out, Path.cwd()):
        raise DistillError(f"--restart would move {out}, the current folder or one of its parents; run from "
                           "elsewhere or choose another train.output_dir")
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists() or aside.is_symlink():  # restarted twice within a second
        n += 1
        aside = aside.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    return aside


@dataclass
class Run:
    """What a training run holds from its setup to its end."""
    cfg: Config
    out: Path
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module  # the method as Accelerate wraps it (DDP), or the method itself under train.fsdp
    turn_params: dict[str, list]
    optimizers: dict
    schedulers: dict
    every: dict[str, int]  # each turn runs every k steps
    batches: object  # the data loader's iterator, positioned at the first step to run
    start: int
    clock: float  # time.time() when the run would have started had it never stopped (resumes add their time)
    timed_from: int  # the step that time counts from: 0, or the resumed step of a checkpoint that kept no time
    validator: validation.Plan | None  # samples and scores while training (train.validate_every), or None


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None, restart: bool = False) -> Method:
    """Train to cfg.train.max_steps (or `stop_after` more steps), checkpointing into cfg.train.output_dir;
    returns the trained method (teacher and student). A folder that already holds a run is continued only with
    `resume`, or moved aside first with `restart`. One process at a time trains into a folder: the first process of
    a launch holds its lock (paths.lock) from the checks to the end."""
    out = Path(cfg.train.output_dir).expanduser()
    check_output_dir(out, resume, restart)  # a refusal leaves no lock file behind
    first = os.environ.get("RANK", "0") == "0"  # set by accelerate launch; the lock is the first process's
    with paths.lock(out, "train.output_dir") if first else contextlib.nullcontext():
        return _train(cfg, resume, stop_after, restart)


def _train(cfg: Config, resume: str | None, stop_after: int | None, restart: bool) -> Method:
    run = setup(cfg, resume, restart)
    tc, accelerator, method = cfg.train, run.accelerator, run.method
    end = tc.max_steps if stop_after is None else min(tc.max_steps, run.start + stop_after)
    bar = tqdm(total=tc.max_steps, initial=run.start, desc=f"{cfg.method.name}",
               disable=not accelerator.is_main_process, dynamic_ncols=True, mininterval=1.0)
    bad_in_row, skipped_samples, updated = 0, 0, 0
    for step in range(run.start, end):
        tick = time.perf_counter()
        raws = [next(run.batches) for _ in range(tc.gradient_accumulation_steps)]
        fetched = time.perf_counter()
        skipped_samples += sum(raw["skipped"] for raw in raws)
        turn_logs, bad_step = train_step(run, step, raws)
        # wall seconds of the step, and of its wait for data (the loss and norm reads sync a GPU before this)
        logs = {"data/skipped_samples": skipped_samples, "time/step_s": time.perf_counter() - tick,
                "time/data_s": fetched - tick, **turn_logs}
        done = step + 1
        method.step_done(done)  # step-count state (progressive rounds) moves on even when the updates were skipped
        if done < tc.max_steps and done in method.phase_starts(tc.max_steps):
            start_phase(run, done)  # before the step's checkpoint, so a resume there starts the phase as this run did
        bad_in_row = bad_in_row + 1 if bad_step else 0
        updated += not bad_step
        logs["nonfinite_in_row"] = bad_in_row
        if bad_step:
            print(f"warning: step {done} skipped: non-finite loss or gradient ({bad_in_row} in a row)", file=sys.stderr)
        if bad_in_row >= tc.max_nonfinite_steps:
            raise DistillError(f"stopped at step {done}: {bad_in_row} steps in a row had a non-finite loss or gradient "
                               f"(train.max_nonfinite_steps); the last good checkpoint in {run.out / 'checkpoints'} is "
                               "kept; lower train.learning_rate or check the data, then --resume latest")
        bar.update(1)
        bar.set_postfix({k.split("/")[0]: f"{v:.4f}" for k, v in logs.items() if k.endswith("/loss")}, refresh=False)
        if done % tc.log_every == 0 or done == end:
            log(run, done, logs)
        milestone = method.milestone(done)
        if done % tc.checkpoint_every == 0 or done == end or milestone:
            save_checkpoint(run, done, milestone)
        if run.validator is not None and run.validator.due(done):
            validation.validate(run.validator, method, accelerator, done)
    bar.close()
    if end > run.start and not updated:
        raise DistillError(f"every step from {run.start + 1} to {end} was skipped (non-finite loss or gradient): the "
                           "student never changed, so no student is saved; lower train.learning_rate or check the data")
    select_turn(run.turn_params, None)
    accelerator.wait_for_everyone()
    if end == tc.max_steps:  # a finished run resumed trains nothing: its train_time.txt stands
        timed = end > run.start or not (run.out / "train_time.txt").exists()
        save_student(run, f"{time.time() - run.clock:.1f} s for steps {run.timed_from}..{end}\n" if timed else None)
    accelerator.end_training()
    return method


def setup(cfg: Config, resume: str | None, restart: bool) -> Run:
    """Everything before the first step: the output folder's checks, Accelerate, the method, the data, a resumed
    checkpoint, sharding, optimisers and LR schedules."""
    tc, out = cfg.train, Path(cfg.train.output_dir).expanduser()
    aside = check_output_dir(out, resume, restart)
    ckpt = checkpoint.find(out, resume) if resume else None
    if ckpt is not None:  # before any model loads
        _check_resumable(cfg, ckpt, checkpoint.trainer_state(ckpt)["step"], out.resolve())
    accelerator = start_accelerator(cfg, out, aside)
    method = build_method(cfg, accelerator.device)
    if accelerator.is_main_process and accelerator.device.type == "cuda" and method.teacher.is_pipeline:
        x, cond = method.teacher.probe()  # which attention kernel the backbone runs, seen by the profiler
        kernels = fastpath.sdpa_ops(lambda: method.teacher.predict(x, method.teacher.timesteps(1)[0], cond))
        print(f"attention: {', '.join(fastpath.attention_processors(method.teacher.backbone))}; SDPA kernels: "
              f"{', '.join(kernels) or 'none'}")
    if tc.compile:
        fastpath.fast_path(method, compile=True)
    with accelerator.main_process_first():  # the first process reads bucketed images' headers, the rest its index
        dataset = data.build(cfg.data, method.teacher.size, method.teacher, tc.seed)
    if method.needs_latents and not ({"image", "latents"} & dataset.provides):
        raise DistillError(f"method {cfg.method.name} needs images or latents to noise, and data.kind="
                           f"{cfg.data.kind} has none; use images, shards, latents or digits")
    validator = validation.plan(cfg, method, dataset, out)  # its step counts and prompts refused before any step
    data.sample_size(cfg, method.teacher)  # and a sample size the student is not trained at
    check_same_buckets(accelerator, dataset.bucket_of)

    start, saved_optims, trainer_state = 0, None, None
    if ckpt is not None:
        weights, saved_optims, trainer_state = checkpoint.load(ckpt)
        method.load_saved(weights)  # whole weights, before any sharding
        start = trainer_state["step"]
        method.resume_at(start)
    if tc.fsdp:
        sharding.shard(method, method.teacher.shard_blocks)
    turn_params = {turn: method.parameters_for(turn) for turn in method.turns}
    optimizers = {turn: torch.optim.AdamW(params, lr=tc.turn_learning_rates.get(turn, tc.learning_rate),
                                          betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay)
                  for turn, params in turn_params.items()}
    every = {turn: tc.turn_every.get(turn, 1) for turn in method.turns}
    schedulers = make_schedulers(tc, optimizers, every, phase_at(method, tc.max_steps, start))
    if ckpt is not None:
        for turn, opt in optimizers.items():
            sharding.load_optimizer(opt, saved_optims[turn])
            schedulers[turn].load_state_dict(trainer_state["schedulers"][turn])
    if tc.fsdp:  # sharded modules sync their own gradients: Accelerate must not wrap the method in DDP
        model, optimizers = method, {t: accelerator.prepare_optimizer(o) for t, o in optimizers.items()}
    else:
        model, *prepared = accelerator.prepare(method, *optimizers.values())
        optimizers = dict(zip(optimizers, prepared))
    model.train()

    sampler = data.batch_sampler(dataset, cfg.data.batch_size, accelerator.num_processes, accelerator.process_index,
                                 tc.seed, start * tc.gradient_accumulation_steps, tc.gradient_accumulation_steps)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                               num_workers=cfg.data.num_workers))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(out)
        cfg.dump(out / "config.yaml")
    if tc.trackers:
        accelerator.init_trackers(tc.project, config=_flat(cfg.to_dict()))
    # the training time before a resume, and the step it counts from (a checkpoint that kept none: the resumed one)
    seconds, timed_from = 0.0, 0
    if trainer_state is not None:
        seconds, timed_from = trainer_state.get("seconds", 0.0), trainer_state.get("timed_from", start)
    clock = time.time() - seconds
    return Run(cfg, out, accelerator, method, model, turn_params, optimizers, schedulers, every, batches, start, clock,
               timed_from, validator)


def start_accelerator(cfg: Config, out: Path, aside: Path | None) -> Accelerator:
    """Accelerate for this run, after refusing launches distill cannot save from; moves an old run in `out` to
    `aside` (--restart) once every process has checked the folder."""
    tc = cfg.train
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise DistillError("accelerate's own FSDP would wrap the teacher too and save shards: launch with a plain "
                           "multi-process config (experiments/accelerate/ddp_8gpu.yaml) and set train.fsdp=true, "
                           "and distill shards the full student itself")
    AcceleratorState._reset_state()  # Accelerate keeps settings process-wide; each run sets its own
    # With several turns, each forward leaves the other turns' parameters unused.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(METHODS[cfg.method.name].turns) > 1)
    try:
        accelerator = Accelerator(mixed_precision=tc.mixed_precision, log_with=tc.trackers or None,
                                  kwargs_handlers=[ddp], project_config=ProjectConfiguration(
                                      project_dir=str(out), logging_dir=str(out / "logs")))
    except ImportError as e:  # a launch config asking for DeepSpeed (or a tracker) whose package is not installed
        raise DistillError(f"the launch needs a package that is not installed: {' '.join(str(e).split())[:160]}; "
                           "install it or launch with a plain multi-process config") from e
    if aside is not None:
        accelerator.wait_for_everyone()  # every rank has checked the folder before it moves
        if accelerator.is_main_process:
            os.replace(out, aside)
            print(f"moved the old run in {out} aside to {aside}", file=sys.stderr)
        accelerator.wait_for_everyone()
    if (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3):  # untested: DeepSpeed does not run here
        raise DistillError("DeepSpeed ZeRO-3 partitions the student's parameters, and distill saves whole ones: "
                           "use ZeRO-2, or train.fsdp=true with a plain multi-process config")
    if tc.fsdp and accelerator.num_processes < 2:
        raise DistillError("train.fsdp shards the student over several processes; launch with accelerate launch "
                           "--num_processes N (N >= 2), or leave train.fsdp false on one")
    return accelerator


def phase_at(method: Method, max_steps: int, step: int) -> tuple[int, int]:
    """The first and the end step of the method's phase (its optimisers' and LR schedules' life) that holds `step`."""
    starts = method.phase_starts(max_steps)
    return max(s for s in starts if s <= step), min([s for s in starts if s > step] + [max_steps])


def make_schedulers(tc: TrainConfig, optimizers: dict, every: dict[str, int], phase: tuple[int, int]) -> dict:
    """Each turn's LR schedule over one phase. A turn that runs every k steps steps its schedule k times less often:
    its warm-up and horizon are counted in its own updates, so every turn warms up over the same global steps and
    ends its schedule with the phase."""
    steps = phase[1] - phase[0]
    return {turn: get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=-(-tc.warmup_steps // every[turn]),
                                num_training_steps=-(-steps // every[turn]))
            for turn, opt in optimizers.items()}


def start_phase(run: Run, step: int) -> None:
    """A new phase at `step`: every optimiser forgets its moments and its LR schedule starts again."""
    for opt in run.optimizers.values():
        opt.state.clear()
    run.schedulers = make_schedulers(run.cfg.train, run.optimizers, run.every,
                                     phase_at(run.method, run.cfg.train.max_steps, step))


def train_step(run: Run, step: int, raws: list[dict]) -> tuple[dict, bool]:
    """One global step: every turn due at `step` runs over the accumulated batches, then clips and steps its
    optimiser, unless its loss or gradient is not finite. Returns the step's logs and whether a turn was skipped."""
    tc, accelerator, method = run.cfg.train, run.accelerator, run.method
    accum, logs, bad_step = len(raws), {}, False
    for turn_i, turn in enumerate(method.turns):
        if step % run.every[turn]:
            continue
        select_turn(run.turn_params, turn)
        if tc.fsdp:
            sharding.reshard(method)
        for micro, raw in enumerate(raws):
            gen = step_generator(tc.seed, step, micro * accelerator.num_processes + accelerator.process_index, turn_i)
            batch = encode_batch(raw, method.teacher, gen)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.model)
            with sync, accelerator.autocast():
                result = run.model(batch, turn)
                accelerator.backward(result.loss / accum)
            logs[f"{turn}/loss"] = logs.get(f"{turn}/loss", 0.0) + result.loss.item() / accum
        logs.update({f"{turn}/{k}": v for k, v in result.logs.items()})
        norm = accelerator.clip_grad_norm_(run.turn_params[turn], tc.max_grad_norm or math.inf)
        logs[f"{turn}/grad_norm"] = float(sharding.full(norm, True))
        # Every rank must reach the same verdict: the loss is averaged, the gradient norm is already synced.
        loss_all = float(accelerator.reduce(torch.tensor(logs[f"{turn}/loss"], device=accelerator.device), "mean"))
        # Under fp16 an infinite gradient is the loss scaler's business: it skips the step and rescales.
        if not math.isfinite(loss_all) or (not math.isfinite(float(norm)) and accelerator.scaler is None):
            run.optimizers[turn].zero_grad(set_to_none=True)
            bad_step = True
            continue
        run.optimizers[turn].step()
        run.schedulers[turn].step()
        run.optimizers[turn].zero_grad(set_to_none=True)
        if tc.fsdp:  # a no-grad forward (consistency's EMA target) left a root gathered: after_step reads shards
            sharding.reshard(method)
        method.after_step(turn, step)
        logs[f"{turn}/lr"] = run.schedulers[turn].get_last_lr()[0]
    return logs, bad_step


def log(run: Run, done: int, logs: dict) -> None:
    """The step's logs to the trackers and to metrics.jsonl in the run folder."""
    if run.cfg.train.trackers:
        run.accelerator.log(logs, step=done)
    if run.accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": done, **logs}) + "\n")


def save_checkpoint(run: Run, done: int, milestone: bool) -> None:
    """A checkpoint after step `done`, whole (gathered from shards), written by the main process once every rank
    agrees its weights are finite."""
    method, accelerator, main = run.method, run.accelerator, run.accelerator.is_main_process
    state = method.state_to_save()
    # Every rank must reach the same verdict before any saves; a sharded rank sees only its own part.
    bad = checkpoint.first_nonfinite(sharding.local(state))
    if accelerator.reduce(torch.tensor(float(bad is not None), device=accelerator.device), "sum") > 0:
        raise checkpoint.nonfinite_error(f"stopped at step {done}; the last good checkpoint in "
                                         f"{run.out / 'checkpoints'} is kept (lower train.learning_rate)",
                                         bad or "a weight held by another process")
    optim_states = {t: opt.state_dict() for t, opt in run.optimizers.items()}
    if run.cfg.train.fsdp:  # whole tensors, gathered to the main process: the files an unsharded run writes
        state, optim_states = sharding.full(state, main), sharding.full(optim_states, main)
    accelerator.wait_for_everyone()
    if main:
        checkpoint.save(run.out, done, state, optim_states, run.schedulers, run.cfg, run.cfg.train.keep_checkpoints,
                        milestone, (time.time() - run.clock, run.timed_from))


def save_student(run: Run, train_time: str | None) -> None:
    """The finished student in run.out/student, with the scheduler and call that sample as distill does (a full
    student's folder is a pipeline), and `train_time` in train_time.txt (None: the file is left as it is)."""
    method, accelerator = run.method, run.accelerator
    backbone = method.student.backbone
    if run.cfg.train.fsdp:
        backbone = sharding.whole_copy(backbone, accelerator.is_main_process)
    if accelerator.is_main_process:
        students.save(method.student, method.teacher, run.out / "student", student_folder_sampling(method, run.cfg),
                      backbone)
        if train_time is not None:
            (run.out / "train_time.txt").write_text(train_time)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
