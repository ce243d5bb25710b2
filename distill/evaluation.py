"""`distill eval`: sample a student (or its teacher) with fixed seeds, measure quality and cost, add a row.

Quality: FID/KID, precision/recall and within-prompt diversity against reference images (a built-in digits
world, or real images: a folder, a list, or the images a .jsonl pairs with its captions), FID/KID against the
teacher's own many-step samples (the fidelity of the distillation itself), CLIP score from a local CLIP folder,
and prompt adherence for digit prompts. Cost: steps, network evaluations per image (CFG counted), milliseconds per
image end to end, peak memory. A recipe (experiments/eval/*.yaml) holds a protocol's settings.
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

from distill import config, data, digits, metrics, paths
from distill.config import Config
from distill.errors import DistillError
from distill.methods.base import Method
from distill.sampling import conditioning, ddim_sample, to_pil

DIGIT = re.compile(r"digit (\d)\b")
PAIR_REFERENCE_SIZE = 2000  # real pairs drawn (with a fixed seed) for the digit_pairs reference set
# The reference sets: their prompts (the default of an evaluation) and the feature extractor FID/KID read.
WORLDS = {"digits": (digits.DIGIT_PROMPTS, metrics.DIGITS_EXTRACTOR),
          "digit_pairs": (digits.PAIR_PROMPTS, metrics.PAIRS_EXTRACTOR),
          "digit_stacks": (digits.STACK_PROMPTS, metrics.STACKS_EXTRACTOR)}


def check_reference(kind: str) -> None:
    if kind not in WORLDS:
        raise DistillError(f"unknown reference '{kind}'; allowed: {', '.join(WORLDS)} (a real reference, a folder or "
                           "list of images, has no prompts of its own: give --prompts)")


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
                  batch_size: int = 64, size: tuple[int, int] | None = None,
                  sized: bool = False) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] of (height, width) `size` (default: the teacher's) for the prompts (one per entry) and
    milliseconds per image, generation to pixels; `sized`: a bucketed run's conditioning (sampling.conditioning),
    which the teacher always reads, as its own pipeline conditions on the size it makes."""
    t, generator = method.teacher, torch.Generator().manual_seed(seed)
    size = size or t.size
    shape, out, elapsed = t.latent_shape(*size), [], 0.0
    for lo in tqdm(range(0, len(prompts), batch_size), desc=f"sample {'teacher' if teacher else 'student'} "
                   f"{steps} steps", unit="batch", leave=False):
        start = time.perf_counter()
        cond = conditioning(t, prompts[lo:lo + batch_size], size, sized or teacher)
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
    """Network evaluations per image: a CFG step costs two, unless the student or the teacher reads w as input."""
    cfg = guidance != 1.0 and not method.teacher.guidance_embedded and (teacher or not method.student.guidance_input)
    return steps * (2 if cfg else 1)


def _reference_set(kind: str, resolution: int):
    check_reference(kind)
    if kind == "digits":
        return digits.Digits(resolution)
    world = digits.DigitPairs if kind == "digit_pairs" else digits.DigitStacks
    return world(resolution, size=PAIR_REFERENCE_SIZE, seed=1, held_out=True)  # every pair, as drawn


def reference_images(kind: str, resolution: int, n: int | None = None) -> torch.Tensor:
    """The first n real images of the reference set (all of them when n is None: 1,797 for digits, 2,000 pairs;
    pairs are `resolution` high and twice as wide, stacked pairs twice as high)."""
    ds = _reference_set(kind, resolution)
    return torch.stack([ds[i]["image"] for i in range(len(ds) if n is None else min(n, len(ds)))])


def reference_count(kind: str, n: int | None = None) -> int:
    """How many real images `reference_images(kind, _, n)` gives, without loading them."""
    total = len(_reference_set(kind, 8))
    return total if n is None else min(n, total)


# The side each extractor's network reads: real references and generated images are resized to it by
# data.preprocess (PIL bicubic), so torch-fidelity's own resize inside the network has nothing left to do.
INPUT_SIZE = {"inception-v3-compat": 299, "vgg16": 224}
REAL_EXTRACTOR = "inception-v3-compat"  # the default for a real reference (with --extractor-weights)
NEEDS_PAIRS = ("--reference prompts reads the images paired with the prompts: give a .jsonl --prompts file whose "
               "lines carry an \"image\" next to their \"prompt\"")


@dataclass
class Scoring:
    """What every row of one comparison shares: prompts, seeds, references and the feature extractor.

    `reference` is a built-in world (digits, digit_pairs), a folder or .txt/.jsonl list of images, or "prompts":
    the images paired with the prompts, given as `reference_files` (one per prompt, in the prompts' order)."""

    prompts: list[str]
    seed: int = 0
    reference: str = "digits"
    extractor: str | None = None  # default: the reference's own (distill-digits, distill-digit-pairs)
    extractor_weights: str | None = None
    teacher_reference_steps: int = 0  # also score against the teacher's own samples at this many steps
    reference_size: int | None = None  # real images FID/KID compare with; None: the whole set (1,797 digits)
    bootstrap: int = 200  # resamples for FID's 95% interval
    teacher_reference_guidance: float | None = None  # CFG of those samples (default: the config's)
    reference_files: list[Path] | None = None  # a real reference's images (read from `reference` unless paired)
    reference_root: Path | None = None  # the folder the images' recorded names are relative to
    center_crop: bool = False  # crop real and generated images to their central square before resizing
    clip: str | None = None  # a local CLIP folder: CLIP score, and diversity on CLIP image features
    num_prompts: int | None = None  # the prompts were a seeded draw of this many (recorded only)
    prompt_seed: int | None = None
    reference_digest: str | None = None

    def __post_init__(self):
        if self.reference not in WORLDS:
            self._resolve_real_reference()
        elif self.center_crop:
            raise DistillError(f"--center-crop applies to a real reference's images; the '{self.reference}' world's "
                               "are compared as they are")
        self.extractor = self.extractor or WORLDS.get(self.reference, (None, REAL_EXTRACTOR))[1]
        metrics.check_extractor(self.extractor, self.extractor_weights)  # refused here, before any sampling
        if self.clip:
            metrics.load_clip(self.clip)

    def _resolve_real_reference(self) -> None:
        if self.reference == "prompts":
            if self.reference_files is None:
                raise DistillError(NEEDS_PAIRS)
            if self.reference_size is not None and self.reference_size != len(self.reference_files):
                raise DistillError(f"--reference prompts pairs {len(self.reference_files)} prompts with their "
                                   f"images, but --reference-size is {self.reference_size}; the counts must agree")
        elif self.reference_files is None:
            self.reference_files, self.reference_root = data.reference_files(self.reference)
        self.reference_files = self.reference_files[:self.reference_size]
        self.reference_root = self.reference_root or Path(self.reference_files[0]).parent
        self.reference_digest = data.reference_digest(self.reference_files, self.reference_root)

    @property
    def real(self) -> bool:
        return self.reference_files is not None

    def eval_size(self, generated: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) every image is resized to: the extractor network's input side, or for distill's
        own extractors (which resize themselves) the generated images' size."""
        side = INPUT_SIZE.get(self.extractor)
        return (side, side) if side else tuple(generated)


# What a recipe (experiments/eval/*.yaml) may set, and the type of each; anything given explicitly wins over it.
RECIPE = {"prompts": str, "reference": str, "reference_size": int, "num_prompts": int, "prompt_seed": int,
          "num_per_prompt": int, "extractor": str, "extractor_weights": str, "clip": str, "center_crop": bool,
          "resolution_note": str}
DEFAULTS = {"reference": "digits", "num_per_prompt": 100, "center_crop": False}


def read_recipe(path: str | Path) -> dict:
    """An evaluation recipe: a YAML mapping of RECIPE's settings, each type-checked (one line naming the file and
    key otherwise). Paths in it are read from the working directory."""
    import yaml

    path = paths.regular_file(Path(path), "--recipe")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DistillError(f"--recipe {path} is not YAML text ({type(e).__name__})") from e
    if not isinstance(recipe, dict):
        raise DistillError(f"--recipe {path} must be a mapping of settings ({', '.join(RECIPE)})")
    for key, value in recipe.items():
        if key not in RECIPE:
            raise DistillError(f"--recipe {path}: unknown setting {key!r}; allowed: {', '.join(RECIPE)}")
        kind = RECIPE[key]
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise DistillError(f"--recipe {path}: {key} must be a {kind.__name__} (got {value!r})")
    return recipe


def build_scoring(prompts=None, recipe: str | Path | None = None, **given) -> tuple[Scoring, int]:
    """The Scoring of `distill eval` and its samples per prompt, from explicit settings (None: unset), then the
    recipe's, then DEFAULTS. `prompts`: a list, or a .txt/.jsonl file (default: the reference world's); with
    `num_prompts`, a seeded draw of them (and of their paired images)."""
    settings = {**DEFAULTS, **(read_recipe(recipe) if recipe else {}),
                **{k: v for k, v in {"prompts": prompts, **given}.items() if v is not None}}
    settings.pop("resolution_note", None)
    prompts, reference = settings.pop("prompts", None), settings["reference"]
    images = None
    if prompts is None:
        base = world_prompts(reference)
    elif isinstance(prompts, (str, Path)):
        base, images = data.read_captions(Path(prompts))
    else:
        base = list(prompts)
    num_prompts = settings.pop("num_prompts", None)
    prompt_seed = settings.pop("prompt_seed", None)
    if num_prompts is None and prompt_seed is not None:
        raise DistillError(f"--prompt-seed {prompt_seed} seeds the draw of --num-prompts prompts; give --num-prompts "
                           "too, or drop it")
    if num_prompts is not None:
        prompt_seed = prompt_seed or 0
        keep = data.subset(len(base), num_prompts, prompt_seed)
        base, images = [base[i] for i in keep], images and [images[i] for i in keep]
    files = paired_images(base, images) if reference == "prompts" else None
    per = settings.pop("num_per_prompt")
    return Scoring([p for p in base for _ in range(per)], reference_files=files,
                   reference_root=Path(prompts).parent if files else None, num_prompts=num_prompts,
                   prompt_seed=prompt_seed, **settings), per


def paired_images(prompts: list[str], images: list[Path | None] | None) -> list[Path]:
    """The image of every prompt, for `--reference prompts`; refused when any prompt has none."""
    if images is None:
        raise DistillError(NEEDS_PAIRS)
    lacking = [i for i, image in enumerate(images) if image is None]
    if lacking:
        raise DistillError(f"--reference prompts pairs every prompt with its image, but {len(lacking)} of the "
                           f"{len(prompts)} prompts have no \"image\" (the first: {prompts[lacking[0]][:40]!r})")
    return list(images)


def protocol(scoring: Scoring, cfg: Config, guidance: float, teacher: bool,
             size: tuple[int, int] | None = None) -> dict:
    """How a row was measured. Rows are ranked together only when the fields in leaderboard.PROTOCOL_KEY agree;
    guidance and sampler describe the row itself and are recorded with it. Weights are named with their sha256, so
    one changed byte makes another table; a real reference is identified by its images' names and bytes."""
    distinct = list(dict.fromkeys(scoring.prompts))
    ref_size = len(scoring.reference_files) if scoring.real else reference_count(scoring.reference,
                                                                                 scoring.reference_size)
    ref_steps = scoring.teacher_reference_steps
    ref_guidance = cfg.sample.guidance_scale if scoring.teacher_reference_guidance is None \
        else scoring.teacher_reference_guidance
    generated = size or cfg.teacher.size
    resolution = config.pixels(*generated)
    size = scoring.eval_size(generated) if scoring.real else None
    subset = None if scoring.num_prompts is None else {"num_prompts": scoring.num_prompts,
                                                        "prompt_seed": scoring.prompt_seed}
    return {"samples": len(scoring.prompts), "num_prompts": len(distinct),
            "prompts": hashlib.sha256("\n".join(scoring.prompts).encode()).hexdigest()[:12],
            "prompt_examples": [p[:60] for p in distinct[:64]],
            "reference": scoring.reference if scoring.reference in (*WORLDS, "prompts") else "images",
            "reference_path": None if scoring.reference in WORLDS else str(scoring.reference),
            "reference_digest": scoring.reference_digest, "reference_size": ref_size, "extractor": scoring.extractor,
            "extractor_weights": metrics.weights_identity(scoring.extractor_weights)
            if scoring.extractor_weights else None,
            "clip": metrics.weights_identity(scoring.clip) if scoring.clip else None,
            "preprocessing": {"resize": "PIL bicubic", "size": list(size), "center_crop": scoring.center_crop}
            if size else None,
            "prompt_subset": subset, "diversity_features": "clip image" if scoring.clip else scoring.extractor,
            "prc_neighbours": metrics.PRC_NEIGHBOURS,
            "resolution": resolution, "eval_seeds": [scoring.seed], "bootstrap": scoring.bootstrap,
            "teacher_reference_steps": ref_steps or None,
            "teacher_reference_guidance": ref_guidance if ref_steps else None,
            "guidance": guidance, "sampler": "teacher DDIM" if teacher else f"{cfg.method.name} student"}


def adherence(images: torch.Tensor, prompts: list[str]) -> dict:
    """Prompt adherence with Wilson intervals, where every prompt names a digit or a pair of digits (side by side, or
    stacked); else {}."""
    for pattern, stacked in ((digits.PAIR, False), (digits.STACK, True)):
        pairs = [pattern.search(p) for p in prompts]
        if all(pairs):
            left, right = (torch.tensor([int(m.group(k)) for m in pairs]) for k in (1, 2))
            held_out = torch.tensor([(a, b) in digits.HELD_OUT_PAIRS for a, b in zip(left.tolist(), right.tolist())])
            return metrics.pair_adherence(images, left, right, held_out, stacked=stacked)
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


def _reference(scoring: Scoring, generated: tuple[int, int]):
    """The reference images as the extractor reads them: a built-in world's tensors, its digits the generated
    images' (which must then match their size), or a real reference's files, read and preprocessed a batch at a
    time."""
    if scoring.real:
        return data.EvalImages(scoring.reference_files, scoring.eval_size(generated), scoring.center_crop,
                               scoring.reference_digest)
    side = generated[1] if scoring.reference == "digit_stacks" else generated[0]  # one digit's
    ref = reference_images(scoring.reference, side, scoring.reference_size)
    if tuple(ref.shape[-2:]) != tuple(generated):
        raise DistillError(f"the '{scoring.reference}' reference images are {ref.shape[-2]} x {ref.shape[-1]} px, this "
                           f"model's {generated[0]} x {generated[1]}; choose the reference of its world (--reference "
                           "digits, digit_pairs or digit_stacks), or a real reference")
    return ref


def _prepared(images: torch.Tensor, scoring: Scoring):
    """Generated images under the same preprocessing as a real reference; a built-in world's as they are."""
    if not scoring.real:
        return images
    return data.EvalImages(list(images), scoring.eval_size(tuple(images.shape[-2:])), scoring.center_crop)


def quality(generated, reference, scoring: Scoring, prompts: list[str],
            images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """FID/KID with intervals, precision/recall (when each set has more than k images), within-prompt diversity and,
    with a CLIP folder, CLIP score: all on features extracted once; and the generated images' features."""
    f_gen = metrics.features(generated, scoring.extractor, scoring.extractor_weights)
    f_ref = metrics.features_of_reference(reference, scoring.extractor, scoring.extractor_weights)
    out = metrics.fid_kid_of_features(f_gen, f_ref, scoring.bootstrap, scoring.seed)
    if min(len(f_gen), len(f_ref)) > metrics.PRC_NEIGHBOURS:
        out.update(metrics.precision_recall(f_gen, f_ref))
    spread = f_gen
    if scoring.clip:
        scores, spread = metrics.clip_score(images, prompts, scoring.clip)
        out.update(scores)
    out.update(metrics.diversity(spread, prompts, scoring.bootstrap, scoring.seed))
    return out, f_gen


def evaluate(method: Method, cfg: Config, steps: int, scoring: Scoring, guidance: float | None = None,
             teacher: bool = False, train_step: int = 0, run: str = "-",
             teacher_images: torch.Tensor | None = None,
             size: tuple[int, int] | None = None) -> tuple[dict, torch.Tensor]:
    """One leaderboard row for a method's student (or, with `teacher`, its teacher) and the images it was made
    from, at (height, width) `size` (default: data.sample_size's, measured). `teacher_images` are the
    teacher-reference samples when the caller already has them."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DistillError(f"steps must be an integer >= 1 (got {steps!r})")
    if not scoring.prompts:
        raise DistillError("evaluation needs at least one prompt")
    prompts, device = scoring.prompts, method.teacher.device
    guidance = cfg.sample.guidance_scale if guidance is None else guidance
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    size = size or data.sample_size(cfg, method.teacher, measured=True)
    sized = {"size": size, "sized": cfg.data.buckets is not None}
    ref = _reference(scoring, size)
    images, ms = sample_images(method, prompts, steps, scoring.seed, guidance, teacher, **sized)
    row = {**row_identity(cfg, steps, guidance, teacher, train_step), "nfe": nfe(method, steps, guidance, teacher),
           "ms_per_image": ms, "peak_memory_mb": peak_memory_mb(device), "samples": len(prompts), "run": run,
           "protocol": protocol(scoring, cfg, guidance, teacher, size)}
    scores, f_gen = quality(_prepared(images, scoring), ref, scoring, prompts, images)
    row.update(scores)
    row.update(adherence(images, prompts))
    if teacher_images is None and scoring.teacher_reference_steps:
        teacher_images, _ = sample_images(method, prompts, scoring.teacher_reference_steps, scoring.seed,
                                          row["protocol"]["teacher_reference_guidance"], teacher=True, **sized)
    if teacher_images is not None:
        f_teacher = metrics.features_of_reference(_prepared(teacher_images, scoring), scoring.extractor,
                                                  scoring.extractor_weights)
        fid_kid = metrics.fid_kid_of_features(f_gen, f_teacher, scoring.bootstrap, scoring.seed)
        # fid, fid_lo, fid_hi, kid, kid_std -> fid_teacher, fid_teacher_lo, ..., kid_teacher_std
        row.update({k[:3] + "_teacher" + k[3:]: v for k, v in fid_kid.items()})
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
