"""Samples and quality curves while training, and `distill curves`, which plots them.

Every `train.validate_every` steps and at the last, the main process samples a fixed prompt grid with fixed seeds
at each of `train.validate_steps`, writes it to `RUN/validation/step-NNNNNNNN-<steps>steps.png` and logs it to the
trackers. With digits, digit_pairs or digit_stacks data it also scores `train.validate_samples` samples against that world's
real images (FID and KID with their intervals, adherence with its Wilson interval; distill.evaluation) and appends
them to metrics.jsonl as one `validate/*` record per step count.

Validation never changes training: it runs without gradients, on forked generators (the global torch, CUDA, numpy
and Python ones are as they were afterwards), and puts every module's train/eval flag back, so a run with and without
it ends with bit-identical weights.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill import data, digits, paths
from distill.config import Config
from distill.errors import ConfigError, DistillError
from distill.evaluation import WORLDS, Scoring, evaluate, sample_images, world_prompts, write_grid

FOLDER = "validation"  # in the run folder: the grids
STEPS_KEY = "validate/steps"  # marks a validation record in metrics.jsonl
# digit_pairs' grid: the ten pairs whose digits sum to 9, four of them held out of training (1-8, 3-6, 6-3, 8-1)
PAIR_GRID = [digits.pair_prompt(a, 9 - a) for a in range(10)]
STACK_GRID = [digits.stack_prompt(a, 9 - a) for a in range(10)]
MAX_DATA_PROMPTS = 8  # prompts taken from other data (the first distinct ones)
CURVES_MARK = "distill curves"  # the PNG's Software field: a file `distill curves` may replace


@dataclass
class Plan:
    """What a run's validations share."""
    cfg: Config
    out: Path  # the run folder
    prompts: list[str]  # the grid's
    steps: list[int]  # the student's step counts
    scoring: Scoring | None  # FID and adherence on the digit worlds, else None
    recorded: set[int] = field(default_factory=set)  # training steps metrics.jsonl already has records of

    def due(self, step: int) -> bool:
        return step % self.cfg.train.validate_every == 0 or step == self.cfg.train.max_steps


def plan(cfg: Config, method, dataset, out: Path) -> Plan | None:
    """The run's validation plan (None when train.validate_every is 0), checked before any training step: each step
    count one the student can sample at, and prompts to draw."""
    tc = cfg.train
    if not tc.validate_every:
        return None
    steps = list(tc.validate_steps or [cfg.sample.steps])
    for n in steps:
        try:
            method.sample_times(n)
        except DistillError as e:
            raise ConfigError("train.validate_steps", n, f"the {cfg.method.name} student cannot sample at it "
                              f"({' '.join(str(e).split())})") from e
    prompts = list(tc.validate_prompts or default_prompts(cfg.data.kind, dataset))
    scoring = None
    if cfg.data.kind in WORLDS:
        world = world_prompts(cfg.data.kind)
        scoring = Scoring([world[i % len(world)] for i in range(tc.validate_samples)], tc.seed, cfg.data.kind)
    return Plan(cfg, Path(out), prompts, steps, scoring, recorded_steps(Path(out)))


def default_prompts(kind: str, dataset) -> list[str]:
    """The ten digit prompts, ten digit pairs, or the first distinct prompts of other data."""
    if kind in ("digits", "digit_shapes"):  # digit_shapes: the teacher's own (square) size is the singles'
        return list(digits.DIGIT_PROMPTS)
    if kind in ("digit_pairs", "digit_stacks"):
        return list(PAIR_GRID if kind == "digit_pairs" else STACK_GRID)
    found: list[str] = []
    with torch.random.fork_rng(devices=[]):  # reading samples must not move the generators training draws from
        for i in range(min(len(dataset), 8 * MAX_DATA_PROMPTS)):
            prompt = dataset[i].get("prompt", "")
            if prompt and prompt not in found:
                found.append(prompt)
            if len(found) == MAX_DATA_PROMPTS:
                break
    if not found:
        raise ConfigError("train.validate_prompts", None, f"data.kind={kind} holds no prompts to sample (a latent "
                          "cache keeps only their embeddings); give the prompts to validate with")
    return found


def read_records(run: Path) -> list[dict]:
    """The validation records of RUN/metrics.jsonl, in file order (a line cut short by a kill is passed over)."""
    path, out = Path(run) / "metrics.jsonl", []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and STEPS_KEY in row:
            out.append(row)
    return out


def recorded_steps(run: Path) -> set[int]:
    return {row["step"] for row in read_records(run)}


@contextlib.contextmanager
def set_apart(method):
    """The block runs in eval mode, without gradients and on forked generators; afterwards every module's mode and
    the global torch, CUDA, numpy and Python generators are exactly as before."""
    modes = [(m, m.training) for m in method.modules()]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        method.eval()
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def validate(p: Plan, method, accelerator, step: int) -> list[dict]:
    """Validate the student after training step `step` (the main process; others return at once): grids, records
    in metrics.jsonl, trackers. A step metrics.jsonl has records of (a run resumed from before it) is not repeated.
    Returns the records written."""
    if not accelerator.is_main_process or step in p.recorded:
        return []
    records = []
    with set_apart(method):
        for n in p.steps:
            record, grid = measure(p, method, step, n)
            records.append(record)
            log_to_trackers(p, accelerator, record, grid)
    with open(p.out / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    p.recorded.add(step)
    return records


def measure(p: Plan, method, step: int, steps: int) -> tuple[dict, Path]:
    """One step count's grid and, on a digit world, its quality: (metrics.jsonl record, grid file)."""
    cfg = p.cfg
    size = data.sample_size(cfg, method.teacher, measured=True)
    images, _ = sample_images(method, p.prompts, steps, cfg.train.seed, cfg.sample.guidance_scale, teacher=False,
                              size=size, sized=cfg.data.buckets is not None)
    grid = write_grid(images, 1, p.out / FOLDER / f"step-{step:08d}-{steps}steps.png")
    record = {"step": step, STEPS_KEY: steps, "validate/grid": str(grid.relative_to(p.out))}
    if p.scoring is not None:
        row, _ = evaluate(method, cfg, steps, p.scoring, train_step=step)
        record["validate/samples"] = len(p.scoring.prompts)
        record.update({f"validate/{k}": v for k, v in row.items() if k.startswith(("fid", "kid", "adherence"))})
    return record, grid


def log_to_trackers(p: Plan, accelerator, record: dict, grid: Path) -> None:
    """Scores as `validate/<steps>steps/<name>` and the grid as `validate/<steps>steps/grid`, at the training step."""
    trackers = p.cfg.train.trackers
    if not trackers:
        return
    prefix = f"validate/{record[STEPS_KEY]}steps/"
    scores = {prefix + k.removeprefix("validate/"): v for k, v in record.items()
              if k not in (STEPS_KEY, "validate/grid") and k != "step"}
    if scores:
        accelerator.log(scores, step=record["step"])
    from PIL import Image

    with Image.open(grid) as img:
        pixels = np.asarray(img.convert("RGB"))
    for name in trackers:
        tracker = accelerator.get_tracker(name, unwrap=True)
        if name == "wandb":
            import wandb

            tracker.log({prefix + "grid": wandb.Image(pixels, caption=grid.name)}, step=record["step"])
        else:  # tensorboard's SummaryWriter
            tracker.add_image(prefix + "grid", pixels, global_step=record["step"], dataformats="HWC")


# ---- distill curves -------------------------------------------------------------------------------------------

def curves(run: Path, out: Path | None = None) -> tuple[Path, str]:
    """Plot a run's validation scores against the training step (FID with its 95% bootstrap band, adherence with its
    95% Wilson band, one line per sampler step count) into `out` (default RUN/curves.png); returns it and a table."""
    run = Path(run).expanduser()
    if paths.kind(run) != "a folder":
        raise DistillError(f"distill curves: {run} is not a run folder ({paths.kind(run)})")
    if not (run / "metrics.jsonl").is_file():
        raise DistillError(f"distill curves: {run} has no metrics.jsonl; give the folder a training run wrote "
                           "(its train.output_dir)")
    records = read_records(run)
    if not records:
        raise DistillError(f"distill curves: {run / 'metrics.jsonl'} holds no validation records; train with "
                           "train.validate_every=N to record them")
    latest = {(r["step"], r[STEPS_KEY]): r for r in records}  # one record per step and step count, the last
    scored = [latest[k] for k in sorted(latest) if "validate/fid" in latest[k] or "validate/adherence" in latest[k]]
    if not scored:
        raise DistillError(f"distill curves: the validation records of {run} hold no scores (FID and adherence are "
                           f"measured with digits, digit_pairs and digit_stacks data); its grids are in {run / FOLDER}")
    out = _curves_out(run, out)
    paths.write_atomic(out, plot(scored, run.name))
    return out, table(scored)


def _curves_out(run: Path, out: Path | None) -> Path:
    """--out: a .png that is new or one `distill curves` wrote (never a user's own image), in a writable folder."""
    out = Path(out).expanduser() if out else run / "curves.png"
    if out.suffix.lower() != ".png":
        raise DistillError(f"--out {out} must name a .png file")
    return paths.check_own_out(out, "curves", _written_by_curves, ".png")


def _written_by_curves(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.info.get("Software") == CURVES_MARK
    except (OSError, ValueError):
        return False


def table(records: list[dict]) -> str:
    """One line per record: training step, sampler steps, FID [95% interval], adherence [95% interval]."""
    def cell(r: dict, key: str, scale: float = 1.0, unit: str = "") -> str:
        if f"validate/{key}" not in r:
            return "-"
        v, lo, hi = (r.get(f"validate/{key}{s}", float("nan")) * scale for s in ("", "_lo", "_hi"))
        return f"{v:.3f}{unit} [{lo:.3f}, {hi:.3f}]" if scale == 1 else f"{v:.1f}{unit} [{lo:.1f}, {hi:.1f}]"

    lines = [f"{'step':>8}  {'steps':>5}  {'FID [95% bootstrap]':<26}  adherence [95% Wilson]"]
    lines += [f"{r['step']:>8}  {r[STEPS_KEY]:>5}  {cell(r, 'fid'):<26}  {cell(r, 'adherence', 100, '%')}"
              for r in records]
    return "\n".join(lines)


def plot(records: list[dict], title: str) -> bytes:
    """PNG bytes: FID (top) and adherence (bottom) against the training step, one line per sampler step count, each
    with its 95% interval as a band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    panels = ((top, "fid", 1.0, "FID ↓ (95% bootstrap interval)"),
              (bottom, "adherence", 100.0, "adherence ↑ (%, 95% Wilson interval)"))
    for i, n in enumerate(sorted({r[STEPS_KEY] for r in records})):
        for ax, key, scale, _ in panels:
            pts = [r for r in records if r[STEPS_KEY] == n and f"validate/{key}" in r]
            if not pts:
                continue
            x = [r["step"] for r in pts]
            ax.plot(x, [r[f"validate/{key}"] * scale for r in pts], "-o", ms=3, color=f"C{i % 10}",
                    label=f"{n} step{'s' if n > 1 else ''}")
            if f"validate/{key}_lo" in pts[0]:
                ax.fill_between(x, [r[f"validate/{key}_lo"] * scale for r in pts],
                                [r[f"validate/{key}_hi"] * scale for r in pts], color=f"C{i % 10}", alpha=0.2)
    for ax, _, _, label in panels:
        ax.set(ylabel=label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    top.set_title(title.replace("$", r"\$"))  # a $ would start mathematics
    bottom.set(xlabel="training step")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": CURVES_MARK})
    plt.close(fig)
    return buf.getvalue()
