"""What every command needs before it trains, samples, scores, exports or times: a config checked whole, the
device, a method built on its teacher, and a saved run loaded back. The trainer builds its method here too; this module imports no command."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_seed

import students
import teachers
from distill import checkpoint, config, methods
from distill.config import Config
from distill.errors import DistillError
from distill.methods import METHODS, Method
from distill.sampling import check_stitch, parse_stitch, stitched


def load_config(path, overrides: list[str] = (), for_training: bool = True, source: bool = True) -> Config:
    """A config file checked whole, in this order: its values (distill.config), its teacher source (teachers; not
    with source=False, where a command stands in for the teacher), its method (distill.methods) and, for
    training, that its data exists."""
    return checked(config.load(path, overrides, for_training=False), for_training, source)


def parse_config(raw: dict, overrides: list[str] = (), for_training: bool = True) -> Config:
    return checked(config.parse(raw, overrides, for_training=False), for_training)


def checked(cfg: Config, for_training: bool, source: bool = True) -> Config:
    if source:
        teachers.check_source(cfg.teacher)
    methods.check_config(cfg)
    if for_training:
        methods.check_training(cfg)
        config.check_data(cfg)
    return cfg


def default_device() -> str:
    """Where a single-process command runs: the GPU if there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_method(cfg: Config, device, teacher=None) -> Method:
    """cfg's method on its teacher (loaded here unless given: a bare, already loaded teacher of cfg.teacher)."""
    set_seed(cfg.train.seed)  # adapters and heads start identical on every rank and every run
    teacher = teachers.load(cfg.teacher, device) if teacher is None else teacher
    method_cls = METHODS[cfg.method.name]
    student = students.build(teacher, cfg.student, ema=method_cls.reads_ema).to(device)
    if cfg.student.init_from:
        source = Path(cfg.student.init_from)
        weights, _, state = checkpoint.load(checkpoint.find(source, str(source)))
        if (state["teacher"], state["student"]) != (cfg.teacher.source, cfg.student.kind):
            raise DistillError(f"student.init_from {source} holds a {state['student']} student of {state['teacher']}, "
                               f"not a {cfg.student.kind} student of {cfg.teacher.source}")
        try:
            student.load_saved(checkpoint.section(weights, "student."))
        except RuntimeError as e:
            raise DistillError(f"student.init_from {source} does not fit this student (is student.guidance_embedding "
                               f"the same?): {str(e).splitlines()[0]}") from e
    return method_cls(teacher, student, method_cls.parse_params(cfg.method.params))


def load_run(run: Path, overrides: list[str] = ()) -> tuple[Path, Config, Method, int]:
    """A run folder or checkpoint, loaded for sampling: (checkpoint, config, method, training step). `overrides`
    (key=value) change the saved config, e.g. sample.steps."""
    ckpt = checkpoint.find(Path(run), str(run))
    cfg = load_config(ckpt / "config.yaml", overrides, for_training=False)
    method = build_method(cfg, default_device())
    weights, _, state = checkpoint.load(ckpt)
    method.load_saved(weights)
    method.resume_at(state["step"])
    method.eval()
    return ckpt, cfg, method, state["step"]


@contextmanager
def stitching(method, stitch: str | None, steps: int):
    """`--stitch RUN:FRACTION` (None: nothing): load RUN, check it stitches with `method`, and sample stitched;
    yields the number of steps RUN's student takes (None without --stitch)."""
    if not stitch:
        yield None
        return
    run, fraction = parse_stitch(stitch)
    other = load_run(Path(run))[2]
    check_stitch(method, other, run)
    with stitched(method, other, fraction, steps) as k:
        yield k
