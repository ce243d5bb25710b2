"""`distill bench MATRIX.yaml`: teacher baselines and teacher x method x steps, trained where needed, evaluated
with one shared set of prompts and seeds, each row added to the leaderboard, then the pages written.

A matrix is resumable: a run whose student is already trained with the same recipe (config hash) is not
trained again, an interrupted run of the same recipe resumes from its latest checkpoint (a run folder last
trained with another recipe is moved aside and trained afresh), and an evaluation already done is skipped; the
teacher's reference samples are kept in OUT/references.

An evaluation is done when a row with its done key is in the leaderboard (or the key is in OUT/bench_done.json,
which records them too). The key covers everything that makes the row: the teacher or run (its recipe hash), the
steps, and every setting of its protocol and timed pass (prompts, samples per prompt, evaluation seed, reference
set, extractor, bootstrap, guidance, teacher-reference steps and guidance, timing), so an edited matrix
re-evaluates what it changed (as a new table where the protocol differs) and nothing else. The row is stored under
its key in one transaction, so a bench killed at any point and resumed never adds a row twice.

Everything it writes lives under `out`: run names, grid names and the fixed files are checked, links resolved, to
stay there before anything is trained (`check_paths`); every numeric field is range-checked first (`check_matrix`).

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
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from distill import checkpoint, config, data, leaderboard, paths, runs, speed
from distill.config import coerce_params
from distill.errors import ConfigError, DistillError, check_choice
from distill.evaluation import WORLDS, Scoring, evaluate, protocol, sample_images, world_prompts, write_grid
from distill.runs import build_method, default_device, load_run
from distill.trainer import train

BASELINE_STEPS = [50, 25, 8, 4, 2, 1]
# Sensible ranges of a matrix's numbers: beyond them a job runs for days, exhausts memory or means nothing.
MAX_GUIDANCE = 100.0
MAX_PER_PROMPT = 10_000
MAX_SAMPLES = 1_000_000  # prompts x samples per prompt, held in memory while scoring
MAX_SEED = 2**63 - 1
MAX_REPEATS = 10_000
MAX_BATCH = 1024
MAX_THREADS = 1024
MAX_NAME_BYTES = 150  # leaves room in a file name (255 bytes) for "-seed<k>", "-<steps>steps.png" and ".old-<time>"


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
class BenchSize:
    """One image size every row is measured at, with that size's own reference and samples per prompt."""
    size: list[int]  # [height, width] in pixels
    reference: str | None = None  # default: the matrix's
    num_per_prompt: int | None = None  # default: the matrix's


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
    reference: str = "digits"  # real images FID/KID compare with: digits | digit_pairs | digit_stacks
    prompts: str | None = None  # default: the reference's prompts (ten digits, or 100 ordered pairs)
    num_per_prompt: int = 20
    seed: int = 0  # the sampling seed of every evaluation (not a training seed)
    seeds: list[int] | None = None  # training seeds of every run, e.g. [0, 1, 2]
    teacher_reference_steps: int = 50  # fid_teacher: against the teacher's own samples at this many steps
    bootstrap: int = 200  # resamples for FID's and diversity's 95% intervals
    # Measure at each of these sizes, each its own table: a teacher at every one, a run at those it was trained at
    # (its data.buckets, else its teacher's size). Default: every row at its teacher's size, with the above.
    sizes: list[BenchSize] = field(default_factory=list)
    timing: BenchTiming = field(default_factory=BenchTiming)
    teachers: list[BenchTeacher] = field(default_factory=list)
    runs: list[BenchRun] = field(default_factory=list)


# --- the matrix file -------------------------------------------------------------------------------------

def _count(where: str, value, minimum: int, maximum: int | None = None, multiple: int | None = None,
           note: str = "") -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum) or (multiple and value % multiple)):
        raise ConfigError(where, value, f"must be an integer >= {minimum}"
                          + (f" and <= {maximum}" if maximum is not None else "")
                          + (f", a multiple of {multiple}" if multiple else "") + note)


def _counts(where: str, values: list, minimum: int, what: str = "steps", maximum: int | None = None) -> None:
    if not values:
        raise ConfigError(where, values, f"must be a non-empty list of {what}")
    for i, v in enumerate(values):
        _count(f"{where}[{i}]", v, minimum, maximum)
    if len(set(values)) != len(values):
        raise ConfigError(where, values, f"must not repeat a value (each of the {what} is one row or run)")


def _scale(where: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not (math.isfinite(value) and 1 <= value <= MAX_GUIDANCE)):
        raise ConfigError(where, value, f"must be a finite number >= 1 and <= {MAX_GUIDANCE:g} (1 = no guidance)")


def _text(where: str, value) -> None:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(where, value, "must be non-empty text")


def check_name(where: str, name) -> None:
    """A run's name becomes the folder OUT/<name> and its grids' names: one plain path component."""
    if (not isinstance(name, str) or not name or not name.isprintable() or "/" in name or "\\" in name
            or name.startswith(".") or len(name.encode()) > MAX_NAME_BYTES):
        raise ConfigError(where, name, "must be a plain folder name inside out: printable, no '/' or '\\', not "
                          f"starting with '.', at most {MAX_NAME_BYTES} bytes")


def check_matrix(m: Matrix, path: Path) -> None:
    """Range checks of every field, so a bad value fails here in one line, not mid-way through a long job."""
    if not m.teachers and not m.runs:
        raise ConfigError("matrix", str(path), "has neither teachers nor runs")
    _text("out", m.out)
    if m.leaderboard is not None:
        _text("leaderboard", m.leaderboard)
    check_choice("reference", m.reference, tuple(WORLDS))
    if m.prompts is not None and not Path(m.prompts).is_file():
        raise ConfigError("prompts", m.prompts, "no such prompts file")
    _count("num_per_prompt", m.num_per_prompt, 1, MAX_PER_PROMPT)
    _count("seed", m.seed, 0, MAX_SEED)
    _count("teacher_reference_steps", m.teacher_reference_steps, 0, config.MAX_STEPS, note=" (0: none)")
    _count("bootstrap", m.bootstrap, 2, MAX_REPEATS)
    for i, s in enumerate(m.sizes):
        if not isinstance(s.size, list) or len(s.size) != 2:
            raise ConfigError(f"sizes[{i}].size", s.size, "must be [height, width] in pixels")
        for side in s.size:
            _count(f"sizes[{i}].size", side, 8, config.MAX_PIXELS, 8)
        if s.reference is not None:
            check_choice(f"sizes[{i}].reference", s.reference, tuple(WORLDS))
        if s.num_per_prompt is not None:
            _count(f"sizes[{i}].num_per_prompt", s.num_per_prompt, 1, MAX_PER_PROMPT)
    if len({tuple(s.size) for s in m.sizes}) != len(m.sizes):
        raise ConfigError("sizes", [s.size for s in m.sizes], "must not repeat a size")
    if m.seeds is not None:
        _counts("seeds", m.seeds, 0, "training seeds", MAX_SEED)
    _count("timing.repeats", m.timing.repeats, speed.MIN_REPEATS, MAX_REPEATS)
    _count("timing.warmup", m.timing.warmup, 1, 100)
    _count("timing.batch_size", m.timing.batch_size, 1, MAX_BATCH)
    _count("timing.reference_steps", m.timing.reference_steps, 1, config.MAX_STEPS)
    if m.timing.threads is not None:
        _count("timing.threads", m.timing.threads, 1, MAX_THREADS)
    for i, t in enumerate(m.teachers):
        _text(f"teachers[{i}].source", t.source)
        _count(f"teachers[{i}].resolution", t.resolution, 8, config.MAX_PIXELS, 8)
        if t.width is not None:
            _count(f"teachers[{i}].width", t.width, 8, config.MAX_PIXELS, 8)
        _scale(f"teachers[{i}].guidance_scale", t.guidance_scale)
        _counts(f"teachers[{i}].steps", t.steps, 1, maximum=config.MAX_STEPS)
    for i, r in enumerate(m.runs):
        _text(f"runs[{i}].config", r.config)
        if r.name is not None:
            check_name(f"runs[{i}].name", r.name)
        _counts(f"runs[{i}].steps", r.steps, 1, maximum=config.MAX_STEPS)
        _scale(f"runs[{i}].guidance_scale", r.guidance_scale)
        if r.seeds is not None:
            _counts(f"runs[{i}].seeds", r.seeds, 0, "training seeds", MAX_SEED)


def _expanded(runs: list[BenchRun], seeds: list[int] | None) -> list[tuple[int, BenchRun]]:
    """(index in the matrix, run) per training seed, named <name>-seed<k>; a run with no seeds anywhere stays as
    it is."""
    out = []
    for i, run in enumerate(runs):
        name = run.name or Path(run.config).stem
        chosen = run.seeds if run.seeds is not None else seeds
        if chosen is None:
            out.append((i, dataclasses.replace(run, name=name)))
        for k in chosen or []:
            out.append((i, dataclasses.replace(run, name=f"{name}-seed{k}", seeds=[k],
                                               overrides=[*run.overrides, f"train.seed={k}"])))
    return out


def teacher_label(source: str) -> str:
    """The file-name stem of a teacher's sample grids: its source as a plain name (a path's '/' and anything
    unusual become '_'; a long one is cut and keeps a hash of the whole)."""
    name = re.sub(r"[^\w.+=-]", "_", source.removeprefix("builtin:"), flags=re.ASCII)
    if len(name) > 80:
        name = name[:60] + "-" + hashlib.sha256(source.encode()).hexdigest()[:12]
    return "teacher-" + name


def grid_name(label: str, steps: int, size: tuple[int, int] | None = None) -> str:
    return f"{label}-{steps}steps" + (f"-{size[0]}x{size[1]}" if size else "") + ".png"


FIXED = ("bench_done.json", "leaderboard.md", "leaderboard.html", "quality_vs_nfe.png", "grids", "references")


def _stays(root: Path, rel: str, where: str, value) -> None:
    """Refuse `rel` unless ROOT/rel, links resolved, is that very path: no '..', no link to elsewhere."""
    path = root / rel
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a link loop, a name too long
        raise ConfigError(where, value, f"{path} cannot be resolved ({e}); bench writes only inside out") from e
    if real != path or root not in path.parents:
        raise ConfigError(where, value, f"{root / rel} leads to {real}; bench writes only inside out ({root}): "
                          "remove the link or choose another name")


def check_paths(m: Matrix, expanded: list[tuple[int, BenchRun]]) -> None:
    """Every path bench will write or read back under `out`, checked before any work: each run's folder and grids,
    each teacher's grids, the references and the fixed files (the default leaderboard among them) stay inside
    `out` once links are resolved, and no two rows share a grid."""
    out = Path(m.out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DistillError(f"out {out} {'is' if probe == out else f'is under {probe}, which is'} a file; give a folder")
    root = out.resolve()
    for name in FIXED + (() if m.leaderboard else ("leaderboard.sqlite",)):
        _stays(root, name, "leaderboard" if name == "leaderboard.sqlite" else "out", m.out)
    for folder in ("grids", "references"):  # what is there now, read back or written through
        if (root / folder).is_dir():
            for entry in sorted((root / folder).iterdir()):
                _stays(root, f"{folder}/{entry.name}", "out", m.out)
    grids: dict[str, str] = {}

    def claim(label: str, steps: list[int], where: str, value) -> None:
        for s, size in [(s, size) for s in steps for size in [tuple(x.size) for x in m.sizes] or [None]]:
            name = grid_name(label, s, size)
            if name in grids and grids[name] != where:
                raise ConfigError(where, value, f"its sample grid {name} is also that of {grids[name]}: rename one")
            grids[name] = where
            _stays(root, f"grids/{name}", where, value)

    for i, t in enumerate(m.teachers):
        claim(teacher_label(t.source), t.steps, f"teachers[{i}].source", t.source)
    for i, run in expanded:
        where = f"runs[{i}].name"
        check_name(where, run.name)  # a name taken from the config's file name is checked here
        _stays(root, run.name, where, run.name)
        claim(run.name, run.steps, where, run.name)


def trained_sizes(cfg: config.Config) -> list[tuple[int, int]] | None:
    """The sizes a run's student is trained at, as far as its config tells before its teacher loads: its buckets,
    else its teacher's size; None for `auto` buckets, whose grid follows the teacher (data.trained_sizes)."""
    if cfg.data.buckets == "auto":
        return None
    size = cfg.teacher.size
    return [size] if cfg.data.buckets is None else data.bucket_sizes(cfg.data, size)


def load_matrix(path: Path) -> tuple[Matrix, dict[str, config.Config]]:
    """The matrix (runs expanded per training seed) and every run's resolved config, all checked before anything
    trains."""
    matrix = coerce_params(Matrix, config.read_yaml(path, "matrix"), "")
    check_matrix(matrix, path)
    expanded = _expanded(matrix.runs, matrix.seeds)
    seen: dict[str, int] = {}
    for i, run in expanded:
        if run.name in seen:
            raise ConfigError(f"runs[{i}].name", run.name, f"is used twice (also by runs[{seen[run.name]}])")
        seen[run.name] = i
    check_paths(matrix, expanded)
    if matrix.prompts:
        counts = [("num_per_prompt", matrix.num_per_prompt)] + [
            (f"sizes[{i}].num_per_prompt", s.num_per_prompt) for i, s in enumerate(matrix.sizes) if s.num_per_prompt]
        prompts = len(data.read_prompts(Path(matrix.prompts)))
        for where, per_prompt in counts:
            count = prompts * per_prompt
            if count > MAX_SAMPLES:
                raise ConfigError(where, per_prompt, f"gives {count:,} samples with the prompts of {matrix.prompts}; "
                                  f"at most {MAX_SAMPLES:,}")
    matrix.runs = [run for _, run in expanded]
    configs = {}
    for run in matrix.runs:
        cfg = runs.load_config(run.config, run.overrides)
        # set, not passed as an override: a folder name is never read as YAML
        out = str(Path(matrix.out) / run.name)
        configs[run.name] = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=out))
        trained = trained_sizes(cfg)
        if matrix.sizes and trained is not None and not {tuple(s.size) for s in matrix.sizes} & set(trained):
            raise ConfigError("sizes", [s.size for s in matrix.sizes], f"has none of the sizes run {run.name} trains "
                              f"at ({', '.join(f'{h}x{w}' for h, w in trained)}): add one")
        # without sizes every row is measured at its teacher's size, which a bucketed run must have trained at
        if not matrix.sizes and (trained is None or cfg.teacher.size not in trained):
            raise ConfigError("sizes", [], f"is needed for run {run.name}: its buckets may not hold its teacher's "
                              "size, at which a matrix without sizes measures every row; name the sizes to measure at")
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
    """The evaluations already added: the keys of the leaderboard's rows (each row is stored under its key first)
    and those recorded in OUT/bench_done.json."""

    def __init__(self, path: Path, stored: set[str]):
        self.path = path
        try:
            kept = json.loads(path.read_text()) if path.is_file() else []
        except (OSError, UnicodeDecodeError, ValueError):  # a damaged record: the leaderboard's keys stand
            kept = []
        self.keys = {k for k in kept if isinstance(k, str)} if isinstance(kept, list) else set()
        self.keys |= stored

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


@dataclass(eq=False)
class _Shape:
    """What the rows measured at one size share: None is each row's teacher size (a matrix without `sizes`)."""
    size: tuple[int, int] | None
    scoring: Scoring
    per_prompt: int
    timing_prompts: list[str]

    @property
    def at(self) -> str:
        return f" at {self.size[0]}x{self.size[1]}" if self.size else ""


class _Bench:
    """One matrix run: what every row shares (scorings, references, the leaderboard, the done-list)."""

    def __init__(self, matrix: Matrix, log, train_only: bool = False, eval_only: bool = False):
        self.m, self.log, self.out = matrix, log, Path(matrix.out)
        self.train_only, self.eval_only = train_only, eval_only
        self.out.mkdir(parents=True, exist_ok=True)
        # Trainers (often several at once, on machines that share the folder) leave the leaderboard alone.
        db = matrix.leaderboard or self.out / "leaderboard.sqlite"
        self.board = None if train_only else leaderboard.Leaderboard(db)
        self.done = _Done(self.out / "bench_done.json", self.board.keys() if self.board else set())

        def shape(size, reference: str, per_prompt: int) -> _Shape:
            base = data.read_prompts(Path(matrix.prompts)) if matrix.prompts else world_prompts(reference)
            scoring = Scoring([p for p in base for _ in range(per_prompt)], matrix.seed, reference,
                              bootstrap=matrix.bootstrap, teacher_reference_steps=matrix.teacher_reference_steps)
            return _Shape(size, scoring, per_prompt, [base[i % len(base)] for i in range(matrix.timing.batch_size)])

        self.shapes = [shape(tuple(s.size), s.reference or matrix.reference, s.num_per_prompt or matrix.num_per_prompt)
                       for s in matrix.sizes] or [shape(None, matrix.reference, matrix.num_per_prompt)]
        self.by_source = {t.source: t for t in matrix.teachers}
        self.references: dict[tuple, torch.Tensor] = {}  # (teacher source, size) -> its own many-step samples

    def teacher_guidance(self, source: str) -> float:
        return self.by_source.get(source, BenchTeacher(source)).guidance_scale

    def scoring_for(self, shape: _Shape, source: str) -> Scoring:
        """The teacher-reference samples are made at the matrix's CFG of that teacher; the row's protocol says so."""
        return dataclasses.replace(shape.scoring, teacher_reference_guidance=self.teacher_guidance(source))

    def key(self, label: str, cfg: config.Config, steps: int, guidance: float, teacher: bool, shape: _Shape) -> str:
        """The done key of a row: who (label, recipe hash) at which steps, and every setting of its protocol (its
        size among them) and of its timed pass, so an edited matrix re-evaluates exactly the rows it changes."""
        spec = {"label": label, "recipe": cfg.hash(), "steps": steps, "teacher": teacher,
                "protocol": protocol(self.scoring_for(shape, cfg.teacher.source), cfg, guidance, teacher, shape.size),
                "timing": dataclasses.asdict(self.m.timing)}
        return f"{label}|{steps}|" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def reference(self, method, source: str, shape: _Shape):
        """The teacher's own many-step samples for fid_teacher, made once per matrix folder (OUT/references), so a
        resumed matrix does not sample them again."""
        size = shape.size or method.teacher.size
        if (source, size) not in self.references and self.m.teacher_reference_steps:
            prompts = shape.scoring.prompts
            what = [source, list(size), self.m.teacher_reference_steps, shape.scoring.seed,
                    self.teacher_guidance(source), prompts]
            name = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
            path = self.out / "references" / f"{name}.safetensors"
            if not path.is_file():
                images, _ = sample_images(method, prompts, self.m.teacher_reference_steps, shape.scoring.seed,
                                          self.teacher_guidance(source), teacher=True, size=size)
                paths.write_atomic(path, safetensors.torch.save({"images": images.contiguous()}))
            self.references[source, size] = safetensors.torch.load_file(path)["images"]
        return self.references.get((source, size))

    def time(self, method, cfg, steps: list[int], guidance: float, teacher: bool, shape: _Shape) -> dict[int, dict]:
        t, source = self.m.timing, cfg.teacher.source
        self.log(f"  timing {'teacher' if teacher else 'student'} at {steps} steps against the teacher at "
                 f"{t.reference_steps}: {t.repeats} interleaved rounds of batch {t.batch_size}")
        costs = speed.timed_costs(method, shape.timing_prompts, steps, guidance, teacher, t.reference_steps,
                                  self.teacher_guidance(source), t.repeats, t.warmup, t.threads, self.m.seed,
                                  size=shape.size, sized=cfg.data.buckets is not None)
        against = {"speedup_reference_steps": t.reference_steps,
                   "speedup_reference_guidance": self.teacher_guidance(source)}
        return {s: {**c, **against} for s, c in costs.items()}

    def add(self, key, method, cfg, steps, guidance, teacher, train_step, where, label, cost: dict,
            shape: _Shape) -> None:
        row, images = evaluate(method, cfg, steps, self.scoring_for(shape, cfg.teacher.source), guidance, teacher,
                               train_step, where, self.reference(method, cfg.teacher.source, shape), size=shape.size)
        row.update(cost)  # the timed pass replaces the evaluation's own ms/image
        if not teacher:
            row.update(seed=cfg.train.seed, seedless_hash=seedless_hash(cfg))
        grid = self.out / "grids" / grid_name(label, steps, shape.size)
        row["grid"] = str(write_grid(images, shape.per_prompt, grid))
        # Stored under its key, once: a resumed bench finds it there even if it was killed before the next line.
        # The matrix defines its own protocol: rows under an edited one start a table of their own.
        self.board.add(row, new_table=True, key=key)
        self.done.add(key)
        self.log(f"  {label}{shape.at} at {steps} steps: FID {row['fid']:.3g}, adherence "
                 f"{row.get('adherence', float('nan')):.3f}, NFE {row['nfe']}, {row['ms_per_image']:.2f} ms/image "
                 f"(IQR {row['ms_iqr']:.2f}), {row['speedup']:.3g}x the teacher's {self.m.timing.reference_steps} "
                 "steps")

    def teacher(self, t: BenchTeacher) -> None:
        cfg, label = teacher_config(t), teacher_label(t.source)
        keys = {(shape, s): self.key(label, cfg, s, t.guidance_scale, True, shape) for shape in self.shapes
                for s in t.steps}
        if all(key in self.done for key in keys.values()):
            return
        method = build_method(cfg, default_device()).eval()
        if self.m.sizes:  # every size this teacher can make, or one line before any of its rows
            method.teacher.check_sizes([shape.size for shape in self.shapes], "sizes")
        for shape in self.shapes:
            todo = [s for s in t.steps if keys[shape, s] not in self.done]
            if not todo:
                continue
            self.log(f"teacher {t.source}{shape.at}: baselines at {todo} steps, CFG {t.guidance_scale}")
            cost = self.time(method, cfg, todo, t.guidance_scale, True, shape)
            for s in todo:
                self.add(keys[shape, s], method, cfg, s, t.guidance_scale, True, 0, t.source, label, cost[s], shape)

    def todo(self, r: BenchRun, cfg: config.Config, guidance: float, sizes) -> list[tuple[_Shape, int, str]]:
        """(size, steps, done key) of each row of run `r` not yet evaluated, at the matrix's sizes among `sizes`
        (None: all of them)."""
        return [(shape, s, key) for s in r.steps for shape in self.shapes
                if shape.size is None or sizes is None or shape.size in sizes
                for key in [self.key(r.name, cfg, s, guidance, False, shape)] if key not in self.done]

    def run(self, i: int, r: BenchRun, cfg: config.Config) -> None:
        guidance = cfg.sample.guidance_scale if r.guidance_scale is None else r.guidance_scale
        if not self.todo(r, cfg, guidance, trained_sizes(cfg)):
            return
        run_dir, head = Path(cfg.train.output_dir), f"[{i + 1}/{len(self.m.runs)}] {r.name}"
        if paths.in_use(run_dir):  # a trainer beside this bench (--train-only) has it: a later bench evaluates it
            self.log(f"{head}: skipped, another process is training it in {run_dir}")
            return
        same = _same_recipe(cfg)
        if same and (run_dir / "student").exists():
            self.log(f"{head}: already trained in {run_dir}")
        elif self.eval_only:
            self.log(f"{head}: not trained yet, skipped (--eval-only)")
            return
        else:
            # Only this recipe's checkpoints are resumed: anything else in the folder is moved aside (train's restart).
            resume = "latest" if same and (run_dir / "checkpoints" / "latest").exists() else None
            aside = "" if resume or not checkpoint.run_marker(run_dir) else (
                ", moving aside the folder's run, which has no checkpoint" if same else
                ", moving aside the folder's run of another recipe")
            self.log(f"{head}: training {cfg.method.name} ({cfg.student.kind}) of {cfg.teacher.source}, seed "
                     f"{cfg.train.seed}{', resuming' if resume else aside}")
            train(cfg, resume=resume, restart=resume is None)  # a bench run folder is its own
        if self.train_only:
            return
        final = loaded = load_run(run_dir)
        todo = self.todo(r, cfg, guidance, data.trained_sizes(final[1].data, final[2].teacher))
        # A progressive run's milestones share the final student's architecture, so one timed pass of the final
        # student per size stands for every step count.
        costs = {shape.size: self.time(final[2], cfg, [s for sh, s, _ in todo if sh is shape], guidance, False, shape)
                 for shape in dict.fromkeys(sh for sh, _, _ in todo)}
        for shape, s, key in todo:
            at = final[2].checkpoint_for(s)  # progressive: the round that ends sampling in s steps; None: the final
            if at is None or at == final[3]:
                loaded = final
            elif loaded[3] != at:
                loaded = load_run(run_dir / "checkpoints" / f"step-{at:08d}")
            ckpt, run_cfg, method, step = loaded
            self.add(key, method, run_cfg, s, guidance, False, step, str(ckpt), r.name, costs[shape.size][s], shape)


def parse_shard(value: str) -> tuple[int, int]:
    """`K/N` (0 <= K < N): this process takes the matrix's runs K, K+N, K+2N, ..."""
    m = re.fullmatch(r"(\d+)/(\d+)", value.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError("--shard", value, "K/N with 0 <= K < N, e.g. 0/4 (this process trains runs 0, 4, 8, ...)")
    return int(m[1]), int(m[2])


def run(path: Path, log=print, train_only: bool = False, shard: tuple[int, int] = (0, 1),
        eval_only: bool = False) -> Path | None:
    """Run the whole matrix; returns the HTML page. `train_only` trains the runs (those of `shard` K/N: every Nth
    from the Kth, so N processes, on N GPUs or sharing one, train a matrix together) and evaluates nothing: a
    later plain `distill bench` of the same matrix finds them trained and evaluates them. `eval_only` evaluates the
    runs that are trained and trains none (the teachers' rows are measured as always)."""
    matrix, configs = load_matrix(Path(path))
    bench = _Bench(matrix, log, train_only, eval_only)
    if train_only:
        for i, r in list(enumerate(matrix.runs))[shard[0]::shard[1]]:
            bench.run(i, r, configs[r.name])
        return None
    for t in matrix.teachers:
        bench.teacher(t)
    for i, r in enumerate(matrix.runs):
        bench.run(i, r, configs[r.name])
    rows = bench.board.rows("fid")
    log(leaderboard.table(rows))
    # the page embeds the grids of this matrix and of the leaderboard's own folder, nothing else
    md, html = leaderboard.write_reports(rows, bench.out, grid_roots=[bench.out, bench.board.path.parent])
    log(f"{len(rows)} rows in {bench.board.path}; wrote {md} and {html}")
    return html
