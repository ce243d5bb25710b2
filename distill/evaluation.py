"""`distill eval`: sample a student (or its teacher) with fixed seeds, measure quality and cost, add a row.

Quality: FID/KID against reference images (and against the teacher's own many-step samples, the
fidelity of the distillation itself) and prompt adherence for digit prompts. Cost: steps, network
evaluations per image (CFG counted), milliseconds per image end to end, peak memory.
"""
from __future__ import annotations

import hashlib
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill import data, metrics
from distill.config import Config
from distill.errors import DistillError
from distill.methods.base import Method
from distill.sampling import ddim_sample, to_pil

DIGIT = re.compile(r"digit (\d)\b")
PAIR_REFERENCE_SIZE = 2000  # real pairs drawn (with a fixed seed) for the digit_pairs reference set
# The reference sets: their prompts (the default of an evaluation) and the feature extractor FID/KID read.
WORLDS = {"digits": (data.DIGIT_PROMPTS, metrics.DIGITS_EXTRACTOR),
          "digit_pairs": (data.PAIR_PROMPTS, metrics.PAIRS_EXTRACTOR)}


def check_reference(kind: str) -> None:
    if kind not in WORLDS:
        raise DistillError(f"unknown reference '{kind}'; allowed: {', '.join(WORLDS)}")


def world_prompts(kind: str) -> list[str]:
    """The prompts an evaluation against reference `kind` uses unless given others."""
    check_reference(kind)
    return WORLDS[kind][0]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak, on Linux in KB


@torch.no_grad()
def sample_images(method, prompts: list[str], steps: int, seed: int, guidance: float, teacher: bool,
                  batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for the prompts (one per entry) and milliseconds per image, generation to pixels."""
    t, generator = method.teacher, torch.Generator().manual_seed(seed)
    shape, out, elapsed = t.latent_shape(*t.size), [], 0.0
    for lo in tqdm(range(0, len(prompts), batch_size), desc=f"sample {'teacher' if teacher else 'student'} "
                   f"{steps} steps", unit="batch", leave=False):
        start = time.perf_counter()
        cond = t.encode_prompts(prompts[lo:lo + batch_size])
        if teacher:
            latents = ddim_sample(t, cond, steps, generator, shape, guidance)
        else:
            latents = method.sample(cond, steps, generator, shape, guidance=guidance)
        images = t.decode(latents).float().clamp(-1, 1).cpu()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        out.append(images)
    return torch.cat(out), 1000 * elapsed / len(prompts)


def nfe(method, steps: int, guidance: float, teacher: bool) -> int:
    """Network evaluations per image: a CFG step costs two, unless the student reads w as input."""
    cfg = guidance != 1.0 and (teacher or not method.student.guidance_input)
    return steps * (2 if cfg else 1)


def _reference_set(kind: str, resolution: int):
    check_reference(kind)
    if kind == "digits":
        return data.Digits(resolution)
    return data.DigitPairs(resolution, size=PAIR_REFERENCE_SIZE, seed=1, held_out=True)  # every pair, as drawn


def reference_images(kind: str, resolution: int, n: int | None = None) -> torch.Tensor:
    """The first n real images of the reference set (all of them when n is None: 1,797 for digits, 2,000 pairs;
    pairs are `resolution` high and twice as wide)."""
    ds = _reference_set(kind, resolution)
    return torch.stack([ds[i]["image"] for i in range(len(ds) if n is None else min(n, len(ds)))])


def reference_count(kind: str, n: int | None = None) -> int:
    """How many real images `reference_images(kind, _, n)` gives, without loading them."""
    total = len(_reference_set(kind, 8))
    return total if n is None else min(n, total)


@dataclass
class Scoring:
    """What every row of one comparison shares: prompts, seeds, references and the feature extractor."""

    prompts: list[str]
    seed: int = 0
    reference: str = "digits"
    extractor: str | None = None  # default: the reference's own (distill-digits, distill-digit-pairs)
    extractor_weights: str | None = None
    teacher_reference_steps: int = 0  # also score against the teacher's own samples at this many steps
    reference_size: int | None = None  # real images FID/KID compare with; None: the whole set (1,797 digits)
    bootstrap: int = 200  # resamples for FID's 95% interval
    teacher_reference_guidance: float | None = None  # CFG of those samples (default: the config's)

    def __post_init__(self):
        check_reference(self.reference)
        self.extractor = self.extractor or WORLDS[self.reference][1]
        metrics.check_extractor(self.extractor, self.extractor_weights)  # refused here, before any sampling


def protocol(scoring: Scoring, cfg: Config, guidance: float, teacher: bool) -> dict:
    """How a row was measured. Rows are ranked together only when the fields in leaderboard.PROTOCOL_KEY agree;
    guidance and sampler describe the row itself and are recorded with it."""
    distinct = list(dict.fromkeys(scoring.prompts))
    ref_size = reference_count(scoring.reference, scoring.reference_size)
    ref_steps = scoring.teacher_reference_steps
    ref_guidance = cfg.sample.guidance_scale if scoring.teacher_reference_guidance is None \
        else scoring.teacher_reference_guidance
    return {"samples": len(scoring.prompts), "num_prompts": len(distinct),
            "prompts": hashlib.sha256("\n".join(scoring.prompts).encode()).hexdigest()[:12],
            "prompt_examples": [p[:60] for p in distinct[:64]], "reference": scoring.reference,
            "reference_size": ref_size, "extractor": scoring.extractor,
            "extractor_weights": Path(scoring.extractor_weights).name if scoring.extractor_weights else None,
            "resolution": cfg.teacher.pixels, "eval_seeds": [scoring.seed], "bootstrap": scoring.bootstrap,
            "teacher_reference_steps": ref_steps or None,
            "teacher_reference_guidance": ref_guidance if ref_steps else None,
            "guidance": guidance, "sampler": "teacher DDIM" if teacher else f"{cfg.method.name} student"}


def adherence(images: torch.Tensor, prompts: list[str]) -> dict:
    """Prompt adherence with Wilson intervals, where every prompt names a digit or a pair of digits; else {}."""
    pairs = [data.PAIR.search(p) for p in prompts]
    if all(pairs):
        left, right = (torch.tensor([int(m.group(k)) for m in pairs]) for k in (1, 2))
        held_out = torch.tensor([(a, b) in data.HELD_OUT_PAIRS for a, b in zip(left.tolist(), right.tolist())])
        return metrics.pair_adherence(images, left, right, held_out)
    labels = [DIGIT.search(p) for p in prompts]
    if all(labels):
        return metrics.adherence_interval(images, torch.tensor([int(m.group(1)) for m in labels]))
    return {}


def row_identity(cfg: Config, steps: int, guidance: float, teacher: bool, train_step: int) -> dict:
    """What a leaderboard row measured: teacher, method and student, at which steps, guidance and training step,
    from which config and commit."""
    return {"teacher": cfg.teacher.source, "method": "teacher" if teacher else cfg.method.name,
            "student": "-" if teacher else cfg.student.kind, "steps": steps, "guidance": guidance,
            "train_steps": 0 if teacher else train_step, "config_hash": cfg.hash(), "git_commit": git_commit()}


def evaluate(method: Method, cfg: Config, steps: int, scoring: Scoring, guidance: float | None = None,
             teacher: bool = False, train_step: int = 0, run: str = "-",
             teacher_images: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """One leaderboard row for a method's student (or, with `teacher`, its teacher) and the images it was made
    from. `teacher_images` are the teacher-reference samples when the caller already has them."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DistillError(f"steps must be an integer >= 1 (got {steps!r})")
    if not scoring.prompts:
        raise DistillError("evaluation needs at least one prompt")
    prompts, device = scoring.prompts, method.teacher.device
    guidance = cfg.sample.guidance_scale if guidance is None else guidance
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ref = reference_images(scoring.reference, cfg.teacher.resolution, scoring.reference_size)
    if tuple(ref.shape[-2:]) != method.teacher.size:
        raise DistillError(f"the '{scoring.reference}' reference images are {ref.shape[-2]} x {ref.shape[-1]} px, this "
                           f"model's {method.teacher.size[0]} x {method.teacher.size[1]}; choose the reference of its "
                           f"world (--reference digits or digit_pairs)")
    images, ms = sample_images(method, prompts, steps, scoring.seed, guidance, teacher)
    row = {**row_identity(cfg, steps, guidance, teacher, train_step), "nfe": nfe(method, steps, guidance, teacher),
           "ms_per_image": ms, "peak_memory_mb": peak_memory_mb(device), "samples": len(prompts), "run": run,
           "protocol": protocol(scoring, cfg, guidance, teacher)}
    row.update(metrics.fid_kid(images, ref, scoring.extractor, scoring.extractor_weights, scoring.bootstrap,
                               scoring.seed))
    row.update(adherence(images, prompts))
    if teacher_images is None and scoring.teacher_reference_steps:
        teacher_images, _ = sample_images(method, prompts, scoring.teacher_reference_steps, scoring.seed,
                                          row["protocol"]["teacher_reference_guidance"], teacher=True)
    if teacher_images is not None:
        quality = metrics.fid_kid(images, teacher_images, scoring.extractor, scoring.extractor_weights,
                                  scoring.bootstrap, scoring.seed)
        # fid, fid_lo, fid_hi, kid, kid_std -> fid_teacher, fid_teacher_lo, ..., kid_teacher_std
        row.update({k[:3] + "_teacher" + k[3:]: v for k, v in quality.items()})
    times = Path(run).parent.parent / "train_time.txt"
    if times.is_file() and not teacher:
        row["train_seconds"] = float(times.read_text().split()[0])
    return row, images


def write_grid(images: torch.Tensor, num_per_prompt: int, path: Path) -> Path:
    """One sample per prompt (the first of each), up to 64, ten to a row."""
    import torchvision

    picks = images[::num_per_prompt][:64]
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(torchvision.utils.make_grid(picks, nrow=min(10, len(picks)), pad_value=1.0)[None])[0].save(path)
    return path
