"""distill from Python: the calls `distill train`, `eval` and `export` make, for notebooks and scripts.

    import distill

    run = distill.train("experiments/lcm_digits_sdxl.yaml", {"train.max_steps": 200, "train.output_dir": "runs/lcm"})
    pipe = distill.load(run)                                   # a diffusers pipeline that samples as distill does
    image = pipe("a handwritten digit 3").images[0]
    result = distill.evaluate(run, steps=4, num_per_prompt=10)  # result.row["fid"], result.grid
    distill.export(run, "exports/lcm")

Errors a user can fix raise distill.errors.DistillError (ConfigError for a config field) with a one-line message.
Heavy modules load on first call, so `import distill` stays quick.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill.errors import DistillError


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """`key=value` strings from a dict of dotted keys (values written as JSON, which YAML reads as they were) or
    from a list of such strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise DistillError(f"overrides must be a dict or a list of key=value strings, not the string {overrides!r}")
    return [str(o) for o in overrides]


def _config(source, overrides: Mapping[str, Any] | Sequence[str] | None = None, for_training: bool = True):
    """A checked Config from a YAML path, a nested dict or a Config, with `overrides` applied."""
    from distill import runs
    from distill.config import Config

    items = _override_list(overrides)
    if isinstance(source, Config):
        source = source.to_dict()
    if isinstance(source, Mapping):
        return runs.parse_config(dict(source), items, for_training)
    return runs.load_config(source, items, for_training)


def train(config, overrides: Mapping[str, Any] | Sequence[str] | None = None, *, resume: str | None = None,
          restart: bool = False, stop_after: int | None = None) -> Path:
    """Train the student a config describes and return its run folder (train.output_dir), which load, evaluate
    and export take. `resume`: "latest" or a checkpoint folder; `restart`: move a run already in the folder
    aside and start over; `stop_after`: at most this many steps now, then checkpoint (resume later).

        run = distill.train("experiments/lcm_digits_sdxl.yaml", {"train.max_steps": 200})
    """
    from distill.trainer import train as run_trainer

    cfg = _config(config, overrides)
    if resume and restart:
        raise DistillError("--resume continues the run in train.output_dir and --restart moves it aside; give one")
    run_trainer(cfg, resume=resume, stop_after=stop_after, restart=restart)
    return Path(cfg.train.output_dir).expanduser()


def load(run, steps: int | None = None, guidance_scale: float | None = None,
         overrides: Mapping[str, Any] | Sequence[str] | None = None):
    """The run's student (its latest checkpoint, or the checkpoint folder given) in its teacher's diffusers
    pipeline, with the scheduler and the call that sample as `distill generate` does: the same seed gives the same
    images. A LoRA student is fused into the backbone. `steps` and `guidance_scale` default to the run's sample
    settings; the pipeline samples at that step count (load again for another). Keywords given to the call win.

        pipe = distill.load("runs/lcm", steps=4)
        images = pipe(["a handwritten digit 3"], generator=torch.Generator().manual_seed(0)).images
    """
    import students
    from distill.runs import load_run
    from distill.sampling import diffusers_sampling

    _, cfg, method, _ = load_run(Path(run), _override_list(overrides))
    teacher = method.teacher
    if not teacher.is_pipeline:
        raise DistillError(f"the {teacher.family} teacher has no diffusers pipeline; sample it with "
                           "distill.evaluate or `distill generate`")
    sched, sampling = diffusers_sampling(method, cfg, steps)
    call = dict(sampling["pipeline_call"])
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    student = method.student
    backbone = students.fuse_lora(student.backbone) if student.kind == "lora" else student.backbone
    pipe = type(teacher.pipe)(**{**teacher.pipe.components, teacher.backbone_name: backbone, "scheduler": sched})
    return _calling(pipe, call)


def _calling(pipe, call: dict):
    """`pipe`, whose call takes `call`'s keywords unless given others. Its step count is fixed by the times in
    `call`, so another num_inference_steps is refused rather than ignored. The call's generator also reaches the
    scheduler's step, which draws a re-noising sampler's fresh noise: some pipelines leave it out, and the noise
    would then come from torch's global RNG instead of the seed."""
    import inspect

    base = type(pipe)

    def __call__(self, *args, **kwargs):
        steps = kwargs.get("num_inference_steps", self.distill_call["num_inference_steps"])
        if steps != self.distill_call["num_inference_steps"] and not {"timesteps", "sigmas"} & kwargs.keys():
            raise DistillError(f"this pipeline samples at the {self.distill_call['num_inference_steps']} steps it was "
                               f"loaded for; load it with distill.load(run, steps={steps})")
        generator, step = kwargs.get("generator"), self.scheduler.step
        if generator is not None and "generator" in inspect.signature(step).parameters:
            self.scheduler.step = lambda *a, **k: step(*a, **{"generator": generator, **k})
        try:
            return base.__call__(self, *args, **{**self.distill_call, **kwargs})
        finally:
            self.scheduler.__dict__.pop("step", None)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                   "__doc__": base.__doc__})
    pipe.distill_call = call
    return pipe


@dataclass
class Evaluation:
    """What distill.evaluate measured: `row` (the leaderboard row: FID/KID with intervals, adherence, NFE,
    ms/image, memory and the protocol), `images` (N x C x H x W in [-1, 1]), the sample grid's path and, when a
    leaderboard was given, the row's id in it."""

    row: dict
    images: Any
    grid: Path
    row_id: int | None = None


def evaluate(run, steps: int, *, teacher: bool = False, prompts: Sequence[str] | str | Path | None = None,
             num_per_prompt: int | None = None, seed: int = 0, guidance_scale: float | None = None,
             reference: str | None = None, reference_size: int | None = None, bootstrap: int = 200,
             extractor: str | None = None, extractor_weights: str | None = None, teacher_reference_steps: int = 0,
             db: str | Path | None = None, new_table: bool = False, out: str | Path | None = None,
             num_prompts: int | None = None, prompt_seed: int | None = None, center_crop: bool | None = None,
             clip: str | None = None, recipe: str | Path | None = None, stitch: str | None = None,
             size: tuple[int, int] | None = None) -> Evaluation:
    """Sample the run's student (or, with `teacher`, its teacher) with fixed seeds and measure it, as
    `distill eval` does. `prompts`: a list, or a .txt/.jsonl file (default: the reference's prompts), each
    sampled `num_per_prompt` times (default 100), or a seeded draw of `num_prompts` of them (`prompt_seed`).
    `reference`: digits, digit_pairs, digit_stacks, a folder or list of images, or "prompts" (the images a .jsonl
    pairs with its prompts). `clip`: a local CLIP folder for CLIP score. `recipe`: a YAML of these settings
    (experiments/eval/); what is given here wins. `stitch`: "RUN:FRACTION", T-Stitch sampling (RUN's smaller
    student takes the first FRACTION of the steps); the row names both models and the steps each took. `size`:
    (height, width) to sample and measure at (default: the teacher's; a run trained on buckets, any of them), its
    own protocol: a table of its own wherever the settings at the trained size would be accepted. With `db`, the
    row is also added to that leaderboard (its protocol checked before any sampling). The sample grid goes to `out`
    (default <checkpoint>/eval).

        result = distill.evaluate("runs/lcm", steps=4, num_per_prompt=10)
        print(result.row["fid"], result.row["fid_lo"], result.row["fid_hi"])
    """
    import os

    from distill import data, leaderboard, paths
    from distill.evaluation import build_scoring, evaluate as score, protocol, write_grid
    from distill.runs import load_run, stitching
    from distill.sampling import parse_stitch

    if out is not None:
        paths.check_writable(Path(out), "--out")
    first = parse_stitch(stitch, teacher)[0] if stitch else None  # refused before anything loads
    scoring, num_per_prompt = build_scoring(
        prompts, recipe, num_per_prompt=num_per_prompt, seed=seed, reference=reference, reference_size=reference_size,
        bootstrap=bootstrap, extractor=extractor, extractor_weights=extractor_weights,
        teacher_reference_steps=teacher_reference_steps, num_prompts=num_prompts, prompt_seed=prompt_seed,
        center_crop=center_crop, clip=clip)
    ckpt, cfg, method, step = load_run(Path(run))
    if not method.teacher.makes_images:
        raise DistillError(f"the {method.teacher.family} teacher samples 2-D points, not images: there are no "
                           "images to evaluate")
    board = None
    if db is not None:
        board = leaderboard.Leaderboard(db)  # a locked, corrupt or foreign file fails here, before any sampling
        if not os.access(db, os.W_OK):
            raise DistillError(f"the leaderboard {db} is read-only; evaluate into another --db")
    folder = paths.check_writable(Path(out or ckpt / "eval"), "the sample grid's folder")  # a read-only run
    guidance = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    measured = data.sample_size(cfg, method.teacher, measured=True)
    if size is None and measured != tuple(method.teacher.size):
        size = measured  # a bucketed student not trained at its teacher's size: that size is its own table
    if size is not None:
        method.teacher.check_sizes([tuple(size)], "--sizes")
    # before sampling: a size's own table takes the row, else the settings must pass at the trained size (another
    # size is only another table)
    if board is not None and (size is None or leaderboard.protocol_id(
            protocol(scoring, cfg, guidance, teacher, size)) not in board.protocols()):
        board.check_protocol(protocol(scoring, cfg, guidance, teacher), new_table)
    with stitching(method, stitch, steps) as k:
        row, images = score(method, cfg, steps, scoring, guidance, teacher, step, str(ckpt), size=size)
    if k is not None:  # the steps (and NFE) each model took
        per_step = row["nfe"] // steps
        row["student"] = f"{cfg.student.kind}+stitch"
        row["stitch"] = {"first": first, "first_steps": k, "first_nfe": k * per_step,
                         "rest_steps": steps - k, "rest_nfe": (steps - k) * per_step}
    at = "" if size is None else f"-{size[0]}x{size[1]}"
    grid = write_grid(images, num_per_prompt, folder / f"{row['method']}-{steps}steps{at}.png")
    row["grid"] = str(grid)
    row_id = board.add(row, new_table=new_table or size is not None) if board is not None else None
    return Evaluation(row, images, grid, row_id)


def export(run, to, formats: Sequence[str] | None = None, dtype: str = "fp32", steps: int | None = None,
           prompts: Sequence[str] | None = None, overwrite: bool = False, db: str | Path | None = None) -> Path:
    """Write the run's student where other tools load it, as `distill export` does, and return the folder.
    `formats`: lora, kohya, merged, single-file (default: lora, and kohya where the family has it, for a LoRA
    student; merged for a full one). `db`: a leaderboard whose rows for this recipe go into the model card.

        distill.export("runs/lcm", "exports/lcm", formats=["lora", "merged"], dtype="fp16")
    """
    from distill.exporting import export as write

    return write(Path(run), Path(to), list(formats) if formats else None, dtype, steps,
                 list(prompts) if prompts else None, overwrite, Path(db) if db else None)
