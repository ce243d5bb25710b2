"""`distill eval`: sample a student (or its teacher) with fixed seeds, measure quality and cost, add a row.

Quality: FID/KID against reference images (and against the teacher's own many-step samples, the
fidelity of the distillation itself) and prompt adherence for digit prompts. Cost: steps, network
evaluations per image (CFG counted), milliseconds per image end to end, peak memory.
"""
from __future__ import annotations

import re
import resource
import subprocess
import time
from pathlib import Path

import torch

from distill import checkpoint, config, metrics
from distill.errors import DistillError
from distill.sampling import ddim_sample
from distill.trainer import build_method

DIGIT = re.compile(r"digit (\d)\b")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def _peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak, on Linux in KB


@torch.no_grad()
def sample_images(method, prompts: list[str], steps: int, seed: int, guidance: float, teacher: bool,
                  batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for the prompts (one per entry) and milliseconds per image, generation to pixels."""
    t, generator = method.teacher, torch.Generator().manual_seed(seed)
    shape, out, elapsed = t.latent_shape(t.resolution, t.resolution), [], 0.0
    for lo in range(0, len(prompts), batch_size):
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


def reference_images(kind: str, resolution: int, n: int) -> torch.Tensor:
    if kind != "digits":
        raise DistillError(f"unknown reference '{kind}'; allowed: digits")
    from distill.data import Digits

    ds = Digits(resolution)
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def evaluate(run: Path, steps: int, prompts: list[str], seed: int = 0, guidance: float | None = None,
             teacher: bool = False, reference: str = "digits", extractor: str = metrics.DIGITS_EXTRACTOR,
             extractor_weights: str | None = None, teacher_reference_steps: int = 0) -> tuple[dict, torch.Tensor]:
    """One leaderboard row for a run's student (or, with `teacher`, its teacher) and the images it was made from."""
    ckpt = checkpoint.find(Path(run), str(run))
    cfg = config.load(ckpt / "config.yaml", for_training=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = build_method(cfg, device)
    weights, _, state = checkpoint.load(ckpt)
    method.load_saved(weights)
    method.resume_at(state["step"])
    method.eval()
    guidance = cfg.sample.guidance_scale if guidance is None else guidance

    images, ms = sample_images(method, prompts, steps, seed, guidance, teacher)
    ref = reference_images(reference, cfg.teacher.resolution, len(prompts))
    row = {"teacher": cfg.teacher.source, "method": "teacher" if teacher else cfg.method.name,
           "student": "-" if teacher else cfg.student.kind, "steps": steps, "nfe": nfe(method, steps, guidance, teacher),
           "ms_per_image": ms, "peak_memory_mb": _peak_memory_mb(device),
           "train_steps": 0 if teacher else state["step"], "config_hash": cfg.hash(), "git_commit": _git_commit(),
           "guidance": guidance, "samples": len(prompts), "run": str(ckpt)}
    quality = metrics.fid_kid(images, ref, extractor, extractor_weights)
    row.update(fid=quality["fid"], kid=quality["kid"])
    labels = [DIGIT.search(p) for p in prompts]
    if all(labels):
        row["adherence"] = metrics.adherence(images, torch.tensor([int(m.group(1)) for m in labels]))
    if teacher_reference_steps:
        teacher_images, _ = sample_images(method, prompts, teacher_reference_steps, seed, cfg.sample.guidance_scale,
                                          teacher=True)
        quality = metrics.fid_kid(images, teacher_images, extractor, extractor_weights)
        row.update(fid_teacher=quality["fid"], kid_teacher=quality["kid"])
    times = ckpt.parent.parent / "train_time.txt"
    if times.is_file() and not teacher:
        row["train_seconds"] = float(times.read_text().split()[0])
    return row, images
