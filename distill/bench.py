"""`distill bench MATRIX.yaml`: teacher baselines and teacher x method x steps, trained where needed, evaluated
with one shared set of prompts and seeds, each row added to the leaderboard, then the pages written.

A matrix is resumable: a run whose student is already trained with the same recipe (config hash) is not
trained again, an interrupted run of the same recipe resumes from its latest checkpoint (a run folder last
trained with another recipe is moved aside and trained afresh), and an evaluation already done
(recorded in OUT/bench_done.json) is skipped; the teacher's reference samples are kept in OUT/references.
Everything it writes lives under `out`.

`seeds` (for the whole matrix or one run) trains each run once per training seed: its own folder
OUT/<name>-seed<k>, train.seed=k, hence its own recipe hash; every row of it records `seed`.

Cost columns (ms/image, images/s, speed-up) come from a timed pass of their own (`timing`), not from the
evaluation's sampling: per evaluated model, its step counts and the teacher at `timing.reference_steps` are
timed interleaved on one batch (speed.interleaved), so a row's speed-up was measured against its teacher in the
same rounds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from distill import checkpoint, config, data, leaderboard, paths, runs, speed
from distill.config import coerce_params
from distill.errors import ConfigError, check_choice
from distill.evaluate import WORLDS, Scoring, evaluate, sample_images, world_prompts, write_grid
from distill.runs import build_method, default_device, load_run
from distill.trainer import train

BASELINE_STEPS = [50, 25, 8, 4, 2, 1]


@dataclass
class BenchTeacher:
    source: str
    resolution: int = 16
    width: int | None = None  # pixels across, where not square
    guidance_scale: float = 5.0  # the CFG of its baselines and of the teacher-reference samples
    steps: list[int] = field(default_factory=lambda: list(BASELINE_STEPS))


@dataclass
class BenchRun:
    config: str  # a training config; its train.output_dir is replaced by OUT/<name>
    name: str | None = None  # default: the config's file name
    overrides: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [4, 2, 1])
    guidance_scale: float | None = None  # default: the config's sample.guidance_scale
    seeds: list[int] | None = None  # training seeds; default: the matrix's seeds, else the config's train.seed


@dataclass
class BenchTiming:
    repeats: int = speed.MIN_REPEATS  # timed rounds per model (median and IQR), after `warmup` untimed calls
    warmup: int = 1
    batch_size: int = 10  # images per timed call, the same batch for teacher and student
    reference_steps: int = 50  # speed-ups are against the teacher's DDIM at this many steps, with its CFG
    threads: int | None = None  # torch threads while timing; default: as the process runs


@dataclass
class Matrix:
    out: str = "runs/bench"
    leaderboard: str | None = None  # default OUT/leaderboard.sqlite
    reference: str = "digits"  # real images FID/KID compare with: digits | digit_pairs
    prompts: str | None = None  # default: the reference's prompts (ten digits, or 100 ordered pairs)
    num_per_prompt: int = 20
    seed: int = 0  # the sampling seed of every evaluation (not a training seed)
    seeds: list[int] | None = None  # training seeds of every run, e.g. [0, 1, 2]
    teacher_reference_steps: int = 50  # fid_teacher: against the teacher's own samples at this many steps
    timing: BenchTiming = field(default_factory=BenchTiming)
    teachers: list[BenchTeacher] = field(default_factory=list)
    runs: list[BenchRun] = field(default_factory=list)


# --- the matrix file -------------------------------------------------------------------------------------

def _count(where: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(where, value, f"must be an integer >= {minimum}")


def _counts(where: str, values: list, minimum: int, what: str = "steps") -> None:
    if not values:
        raise ConfigError(where, values, f"must be a non-empty list of {what}")
    for i, v in enumerate(values):
        _count(f"{where}[{i}]", v, minimum)
    if len(set(values)) != len(values):
        raise ConfigError(where, values, f"must not repeat a value (each of the {what} is one row or run)")


def _scale(where: str, value) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(where, value, "must be a finite number >= 0 (1 = no guidance)")


def check_matrix(m: Matrix, path: Path) -> None:
    """Range checks of every field, so a bad value fails here in one line, not mid-way through a long job."""
    if not m.teachers and not m.runs:
        raise ConfigError("matrix", str(path), "has neither teachers nor runs")
    if not m.out:
        raise ConfigError("out", m.out, "must name a folder")
    check_choice("reference", m.reference, tuple(WORLDS))
    if m.prompts is not None and not Path(m.prompts).is_file():
        raise ConfigError("prompts", m.prompts, "no such prompts file")
    _count("num_per_prompt", m.num_per_prompt, 1)
    _count("seed", m.seed, 0)
    _count("teacher_reference_steps", m.teacher_reference_steps, 0)
    if m.seeds is not None:
        _counts("seeds", m.seeds, 0, "training seeds")
    for name in ("repeats", "warmup", "batch_size", "reference_steps"):
        _count(f"timing.{name}", getattr(m.timing, name), speed.MIN_REPEATS if name == "repeats" else 1)
    if m.timing.threads is not None:
        _count("timing.threads", m.timing.threads, 1)
    for i, t in enumerate(m.teachers):
        _count(f"teachers[{i}].resolution", t.resolution, 8)
        _scale(f"teachers[{i}].guidance_scale", t.guidance_scale)
        _counts(f"teachers[{i}].steps", t.steps, 1)
    for i, r in enumerate(m.runs):
        _counts(f"runs[{i}].steps", r.steps, 1)
        _scale(f"runs[{i}].guidance_scale", r.guidance_scale)
        if r.seeds is not None:
            _counts(f"runs[{i}].seeds", r.seeds, 0, "training seeds")


def _per_seed(runs: list[BenchRun], seeds: list[int] | None) -> list[BenchRun]:
    """One run per training seed, named <name>-seed<k>; a run with no seeds anywhere stays as it is."""
    out = []
    for run in runs:
        name = run.name or Path(run.config).stem
        chosen = run.seeds if run.seeds is not None else seeds
        if chosen is None:
            out.append(dataclasses.replace(run, name=name))
        for k in chosen or []:
            out.append(dataclasses.replace(run, name=f"{name}-seed{k}", seeds=[k],
                                           overrides=[*run.overrides, f"train.seed={k}"]))
    return out


def load_matrix(path: Path) -> tuple[Matrix, dict[str, config.Config]]:
    """The matrix (runs expanded per training seed) and every run's resolved config, all checked before anything
    trains."""
    matrix = coerce_params(Matrix, config.read_yaml(path, "matrix"), "")
    check_matrix(matrix, path)
    matrix.runs = _per_seed(matrix.runs, matrix.seeds)
    configs = {}
    for i, run in enumerate(matrix.runs):
        if run.name in configs:
            raise ConfigError(f"runs[{i}].name", run.name, "is used twice")
        out = Path(matrix.out) / run.name
        configs[run.name] = runs.load_config(run.config, [*run.overrides, f"train.output_dir={out}"])
    for t in matrix.teachers:
        teacher_config(t)
    return matrix, configs


def teacher_config(t: BenchTeacher) -> config.Config:
    """The config of a teacher's baseline rows."""
    size = {"resolution": t.resolution} | ({"width": t.width} if t.width else {})
    return runs.parse_config({"teacher": {"source": t.source, **size}, "sample": {"guidance_scale": t.guidance_scale}},
                             for_training=False)


# --- running it ------------------------------------------------------------------------------------------

class _Done:
    """The evaluations already added to the leaderboard, kept in OUT/bench_done.json."""

    def __init__(self, path: Path):
        self.path = path
        self.keys = set(json.loads(path.read_text())) if path.is_file() else set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str) -> None:
        self.keys.add(key)
        paths.write_atomic(self.path, json.dumps(sorted(self.keys)))


def _same_recipe(cfg: config.Config) -> bool:
    """Whether cfg's run folder was last trained with this very recipe (its config.yaml has cfg's hash)."""
    own = Path(cfg.train.output_dir) / "config.yaml"
    return own.is_file() and config.load(own, for_training=False).hash() == cfg.hash()


def seedless_hash(cfg: config.Config) -> str:
    """The recipe without its training seed: the rows of one recipe's seeds share it (the config hash does not)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=0)).hash()


class _Bench:
    """One matrix run: what every row shares (scoring, references, the leaderboard, the done-list)."""

    def __init__(self, matrix: Matrix, log):
        self.m, self.log, self.out = matrix, log, Path(matrix.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.board = leaderboard.Leaderboard(matrix.leaderboard or self.out / "leaderboard.sqlite")
        self.done = _Done(self.out / "bench_done.json")
        base = data.read_prompts(Path(matrix.prompts)) if matrix.prompts else world_prompts(matrix.reference)
        self.scoring = Scoring([p for p in base for _ in range(matrix.num_per_prompt)], matrix.seed, matrix.reference,
                               teacher_reference_steps=matrix.teacher_reference_steps)
        self.timing_prompts = [base[i % len(base)] for i in range(matrix.timing.batch_size)]
        self.by_source = {t.source: t for t in matrix.teachers}
        self.references: dict[str, torch.Tensor] = {}  # teacher source -> its own many-step samples

    def teacher_guidance(self, source: str) -> float:
        return self.by_source.get(source, BenchTeacher(source)).guidance_scale

    def reference(self, method, source: str):
        """The teacher's own many-step samples for fid_teacher, made once per matrix folder (OUT/references), so a
        resumed matrix does not sample them again."""
        if source not in self.references and self.m.teacher_reference_steps:
            what = [source, list(method.teacher.size), self.m.teacher_reference_steps, self.scoring.seed,
                    self.teacher_guidance(source), self.scoring.prompts]
            name = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
            path = self.out / "references" / f"{name}.safetensors"
            if not path.is_file():
                images, _ = sample_images(method, self.scoring.prompts, self.m.teacher_reference_steps,
                                          self.scoring.seed, self.teacher_guidance(source), teacher=True)
                paths.write_atomic(path, safetensors.torch.save({"images": images.contiguous()}))
            self.references[source] = safetensors.torch.load_file(path)["images"]
        return self.references.get(source)

    def time(self, method, source: str, steps: list[int], guidance: float, teacher: bool) -> dict[int, dict]:
        t = self.m.timing
        self.log(f"  timing {'teacher' if teacher else 'student'} at {steps} steps against the teacher at "
                 f"{t.reference_steps}: {t.repeats} interleaved rounds of batch {t.batch_size}")
        return speed.timed_costs(method, self.timing_prompts, steps, guidance, teacher, t.reference_steps,
                                 self.teacher_guidance(source), t.repeats, t.warmup, t.threads, self.m.seed)

    def add(self, key, method, cfg, steps, guidance, teacher, train_step, where, label, cost: dict) -> None:
        # the teacher-reference samples are made at the matrix's CFG of that teacher; the row's protocol says so
        ref_guidance = self.teacher_guidance(cfg.teacher.source)
        scoring = dataclasses.replace(self.scoring, teacher_reference_guidance=ref_guidance)
        row, images = evaluate(method, cfg, steps, scoring, guidance, teacher, train_step, where,
                               self.reference(method, cfg.teacher.source))
        row.update(cost)  # the timed pass replaces the evaluation's own ms/image
        if not teacher:
            row.update(seed=cfg.train.seed, seedless_hash=seedless_hash(cfg))
        grid = self.out / "grids" / f"{label}-{steps}steps.png"
        row["grid"] = str(write_grid(images, self.m.num_per_prompt, grid))
        self.board.add(row)
        self.done.add(key)
        self.log(f"  {label} at {steps} steps: FID {row['fid']:.3g}, adherence "
                 f"{row.get('adherence', float('nan')):.3f}, NFE {row['nfe']}, {row['ms_per_image']:.2f} ms/image "
                 f"(IQR {row['ms_iqr']:.2f}), {row['speedup']:.3g}x the teacher's {self.m.timing.reference_steps} "
                 "steps")

    def teacher(self, t: BenchTeacher) -> None:
        cfg = teacher_config(t)
        todo = [s for s in t.steps if f"teacher|{cfg.hash()}|{s}" not in self.done]
        if not todo:
            return
        self.log(f"teacher {t.source}: baselines at {todo} steps, CFG {t.guidance_scale}")
        method = build_method(cfg, default_device()).eval()
        label = "teacher-" + t.source.replace("builtin:", "").replace("/", "_")
        cost = self.time(method, t.source, todo, t.guidance_scale, True)
        for s in todo:
            self.add(f"teacher|{cfg.hash()}|{s}", method, cfg, s, t.guidance_scale, True, 0, t.source, label, cost[s])

    def run(self, i: int, r: BenchRun, cfg: config.Config) -> None:
        todo = [s for s in r.steps if f"{r.name}|{cfg.hash()}|{s}" not in self.done]
        if not todo:
            return
        run_dir, head = Path(cfg.train.output_dir), f"[{i + 1}/{len(self.m.runs)}] {r.name}"
        same = _same_recipe(cfg)
        if same and (run_dir / "student").exists():
            self.log(f"{head}: already trained in {run_dir}")
        else:
            # Only this recipe's checkpoints are resumed: anything else in the folder is moved aside (train's restart).
            resume = "latest" if same and (run_dir / "checkpoints" / "latest").exists() else None
            aside = "" if resume or not checkpoint.run_marker(run_dir) else (
                ", moving aside the folder's run, which has no checkpoint" if same else
                ", moving aside the folder's run of another recipe")
            self.log(f"{head}: training {cfg.method.name} ({cfg.student.kind}) of {cfg.teacher.source}, seed "
                     f"{cfg.train.seed}{', resuming' if resume else aside}")
            train(cfg, resume=resume, restart=resume is None)  # a bench run folder is its own
        ckpt, run_cfg, method, step = load_run(run_dir)
        guidance = cfg.sample.guidance_scale if r.guidance_scale is None else r.guidance_scale
        # A progressive run's milestones share the final student's architecture, so one timed pass of the
        # final student stands for every step count.
        cost = self.time(method, cfg.teacher.source, todo, guidance, False)
        for s in todo:
            at = method.checkpoint_for(s)  # progressive: the round that ends sampling in s steps
            if at is not None and at != step:
                ckpt, run_cfg, method, step = load_run(run_dir / "checkpoints" / f"step-{at:08d}")
            self.add(f"{r.name}|{cfg.hash()}|{s}", method, run_cfg, s, r.guidance_scale, False, step, str(ckpt),
                     r.name, cost[s])


def run(path: Path, log=print) -> Path:
    """Run the whole matrix; returns the HTML page."""
    matrix, configs = load_matrix(Path(path))
    bench = _Bench(matrix, log)
    for t in matrix.teachers:
        bench.teacher(t)
    for i, r in enumerate(matrix.runs):
        bench.run(i, r, configs[r.name])
    rows = bench.board.rows("fid")
    log(leaderboard.table(rows))
    md, html = leaderboard.write_reports(rows, bench.out)
    log(f"{len(rows)} rows in {bench.board.path}; wrote {md} and {html}")
    return html
