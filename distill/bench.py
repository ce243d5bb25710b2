"""`distill bench MATRIX.yaml`: teacher baselines and teacher x method x steps, trained where needed, evaluated
with one shared set of prompts and seeds, each row added to the leaderboard, then the pages written.

A matrix is resumable: a run whose student is already trained with the same recipe (config hash) is not
trained again, an interrupted run resumes from its latest checkpoint, and an evaluation already done
(recorded in OUT/bench_done.json) is skipped. Everything it writes lives under `out`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill import config, data, leaderboard
from distill.config import ConfigError, coerce_params
from distill.evaluate import Scoring, evaluate, load_run, sample_images, write_grid
from distill.trainer import build_method, train

BASELINE_STEPS = [50, 25, 8, 4, 2, 1]


@dataclass
class BenchTeacher:
    source: str
    resolution: int = 16
    guidance_scale: float = 5.0  # the CFG of its baselines and of the teacher-reference samples
    steps: list[int] = field(default_factory=lambda: list(BASELINE_STEPS))


@dataclass
class BenchRun:
    config: str  # a training config; its train.output_dir is replaced by OUT/<name>
    name: str | None = None  # default: the config's file name
    overrides: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [4, 2, 1])
    guidance_scale: float | None = None  # default: the config's sample.guidance_scale


@dataclass
class Matrix:
    out: str = "runs/bench"
    leaderboard: str | None = None  # default OUT/leaderboard.sqlite
    prompts: str | None = None  # default: the ten digit prompts
    num_per_prompt: int = 20
    seed: int = 0
    teacher_reference_steps: int = 50  # fid_teacher: against the teacher's own samples at this many steps
    teachers: list[BenchTeacher] = field(default_factory=list)
    runs: list[BenchRun] = field(default_factory=list)


def load_matrix(path: Path) -> tuple[Matrix, dict[str, config.Config]]:
    """The matrix and every run's resolved config, all checked before anything trains."""
    matrix = coerce_params(Matrix, config.read_yaml(path, "matrix"), "")
    if not matrix.teachers and not matrix.runs:
        raise ConfigError("matrix", str(path), "has neither teachers nor runs")
    configs = {}
    for i, run in enumerate(matrix.runs):
        run.name = run.name or Path(run.config).stem
        if run.name in configs:
            raise ConfigError(f"runs[{i}].name", run.name, "is used twice")
        out = Path(matrix.out) / run.name
        configs[run.name] = config.load(run.config, [*run.overrides, f"train.output_dir={out}"])
    for i, t in enumerate(matrix.teachers):
        config.parse({"teacher": {"source": t.source, "resolution": t.resolution}}, for_training=False)
        if not t.steps or min(t.steps) < 1:
            raise ConfigError(f"teachers[{i}].steps", t.steps, "must be a list of positive integers")
    return matrix, configs


class _Done:
    """The evaluations already added to the leaderboard, kept in OUT/bench_done.json."""

    def __init__(self, path: Path):
        self.path = path
        self.keys = set(json.loads(path.read_text())) if path.is_file() else set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str) -> None:
        self.keys.add(key)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(sorted(self.keys)))
        os.replace(tmp, self.path)


def _trained(cfg: config.Config) -> bool:
    out = Path(cfg.train.output_dir)
    if not (out / "student").exists() or not (out / "config.yaml").is_file():
        return False
    return config.load(out / "config.yaml", for_training=False).hash() == cfg.hash()


def run(path: Path, log=print) -> Path:
    """Run the whole matrix; returns the HTML page."""
    matrix, configs = load_matrix(Path(path))
    out = Path(matrix.out)
    out.mkdir(parents=True, exist_ok=True)
    board = leaderboard.Leaderboard(matrix.leaderboard or out / "leaderboard.sqlite")
    done = _Done(out / "bench_done.json")
    base = data.read_prompts(Path(matrix.prompts)) if matrix.prompts else data.DIGIT_PROMPTS
    scoring = Scoring([p for p in base for _ in range(matrix.num_per_prompt)], matrix.seed,
                      teacher_reference_steps=matrix.teacher_reference_steps)
    references: dict[str, torch.Tensor] = {}  # teacher source -> its own many-step samples

    def reference(method, source: str):
        if source not in references and matrix.teacher_reference_steps:
            guidance = by_source.get(source, BenchTeacher(source)).guidance_scale
            references[source], _ = sample_images(method, scoring.prompts, matrix.teacher_reference_steps,
                                                  scoring.seed, guidance, teacher=True)
        return references.get(source)

    def add(key, method, cfg, steps, guidance, teacher, train_step, where, label):
        row, images = evaluate(method, cfg, steps, scoring, guidance, teacher, train_step, where,
                               reference(method, cfg.teacher.source))
        row["grid"] = str(write_grid(images, matrix.num_per_prompt, out / "grids" / f"{label}-{steps}steps.png"))
        board.add(row)
        done.add(key)
        log(f"  {label} at {steps} steps: FID {row['fid']:.3g}, adherence {row.get('adherence', float('nan')):.3f}, "
            f"NFE {row['nfe']}, {row['ms_per_image']:.1f} ms/image")

    by_source = {t.source: t for t in matrix.teachers}
    for t in matrix.teachers:
        cfg = config.parse({"teacher": {"source": t.source, "resolution": t.resolution},
                            "sample": {"guidance_scale": t.guidance_scale}}, for_training=False)
        todo = [s for s in t.steps if f"teacher|{cfg.hash()}|{s}" not in done]
        if not todo:
            continue
        log(f"teacher {t.source}: baselines at {todo} steps, CFG {t.guidance_scale}")
        method = build_method(cfg, "cuda" if torch.cuda.is_available() else "cpu").eval()
        label = "teacher-" + t.source.replace("builtin:", "").replace("/", "_")
        for s in todo:
            add(f"teacher|{cfg.hash()}|{s}", method, cfg, s, t.guidance_scale, True, 0, t.source, label)

    for i, r in enumerate(matrix.runs):
        cfg = configs[r.name]
        todo = [s for s in r.steps if f"{r.name}|{cfg.hash()}|{s}" not in done]
        if not todo:
            continue
        run_dir = Path(cfg.train.output_dir)
        if _trained(cfg):
            log(f"[{i + 1}/{len(matrix.runs)}] {r.name}: already trained in {run_dir}")
        else:
            resume = "latest" if (run_dir / "checkpoints" / "latest").exists() else None
            log(f"[{i + 1}/{len(matrix.runs)}] {r.name}: training {cfg.method.name} ({cfg.student.kind}) of "
                f"{cfg.teacher.source}{', resuming' if resume else ''}")
            train(cfg, resume=resume)
        ckpt, cfg, method, step = load_run(run_dir)
        for s in todo:
            at = method.checkpoint_for(s)  # progressive: the round that ends sampling in s steps
            if at is not None and at != step:
                ckpt, cfg, method, step = load_run(run_dir / "checkpoints" / f"step-{at:08d}")
            add(f"{r.name}|{configs[r.name].hash()}|{s}", method, cfg, s, r.guidance_scale, False, step, str(ckpt),
                r.name)

    rows = board.rows("fid")
    log(leaderboard.table(rows))
    md, html = leaderboard.write_reports(rows, out)
    log(f"{len(rows)} rows in {board.path}; wrote {md} and {html}")
    return html
