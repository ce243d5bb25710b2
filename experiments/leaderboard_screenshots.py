"""Build a sample leaderboard in a folder and write its pages, for the screenshots of the page in experiments/results.

The figures are illustrative, shaped like the digits benchmark's (a teacher at six step counts, four methods at 1, 2
and 4 steps, LADD over three training seeds that disagree), not measured; the samples are real digits of the
reference set, blurred and noised more the worse a row's FID, written as `distill eval` writes its 16-px grids. A
second table has a real-image reference with every protocol field a recent distill records (extractor weights and
CLIP model named with their sha256, preprocessing, a seeded prompt subset), a third an older protocol without
precision, recall or diversity: those columns are hidden there.

    .venv/bin/python experiments/leaderboard_screenshots.py /tmp/board            # writes /tmp/board/pages/
    .venv/bin/python experiments/leaderboard_screenshots.py /tmp/board --shoot    # and the two screenshots

--shoot runs headless Chromium at 1400 and 400 px wide (tall windows, trailing white trimmed), as:

    chromium --headless --no-sandbox --hide-scrollbars --force-device-scale-factor=1 \\
        --screenshot=experiments/results/leaderboard_page_1400.png --window-size=1400,9000 (16000 at 400 px) \\
        file:///tmp/board/pages/leaderboard.html
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from distill import digits, evaluation
from distill.leaderboard import Leaderboard
from distill.leaderboard_view import write_reports

RESULTS = Path(__file__).parent / "results"
TEACHER = "builtin:digits-sdxl"
DIGITS = {"samples": 1000, "num_prompts": 10, "reference": "digits", "reference_size": 1797,
          "extractor": "distill-digits", "extractor_weights": None, "resolution": 16, "eval_seeds": [0],
          "bootstrap": 200, "teacher_reference_steps": 50, "teacher_reference_guidance": 5.0,
          "prompts": hashlib.sha256("\n".join(p for p in digits.DIGIT_PROMPTS for _ in range(100)).encode())
          .hexdigest()[:12], "prompt_examples": list(digits.DIGIT_PROMPTS)}
NEW_FIELDS = {"prc_neighbours": 3, "diversity_features": "distill-digits"}
REAL = {**DIGITS, "samples": 500, "num_prompts": 50, "reference": "images", "reference_path": "data/digits-png",
        "reference_size": 1000, "reference_digest": hashlib.sha256(b"digits-png").hexdigest(),
        "extractor": "inception-v3-compat",
        "extractor_weights": {"name": "pt_inception-2015-12-05.safetensors",
                              "sha256": hashlib.sha256(b"inception").hexdigest()},
        "preprocessing": {"resize": "PIL bicubic", "size": [299, 299], "center_crop": True},
        "clip": {"name": "clip-vit-base-patch32", "sha256": hashlib.sha256(b"clip").hexdigest()},
        "prompt_subset": {"num_prompts": 50, "prompt_seed": 0}, "diversity_features": "clip image",
        "prc_neighbours": 3, "prompt_examples": [f"a photo of the digit {k}, handwritten" for k in range(10)]}

# (method, student, steps, nfe, fid, adherence, ms, seed) shaped like the digits benchmark
TEACHER_ROWS = [(50, 2.25, 0.985), (25, 2.28, 0.99), (8, 2.46, 0.99), (4, 2.66, 0.99), (2, 4.66, 0.985),
                (1, 18.73, 0.99)]
STUDENT_ROWS = [("consistency", "lora", 1, 2.68, 0.995), ("consistency", "lora", 2, 2.09, 0.975),
                ("consistency", "lora", 4, 1.96, 0.98), ("progressive", "full", 1, 1.97, 0.995),
                ("progressive", "full", 2, 2.23, 0.99), ("progressive", "full", 4, 2.21, 0.99),
                ("add", "lora", 1, 1.50, 0.96), ("add", "lora", 2, 1.34, 0.975), ("add", "lora", 4, 1.64, 0.945)]
LADD_SEEDS = {0: [(1, 13.62, 0.426), (2, 8.87, 0.51), (4, 7.03, 0.55)],
              1: [(1, 3.33, 0.912), (2, 2.42, 0.945), (4, 2.84, 0.935)],
              2: [(1, 4.76, 0.94), (2, 3.58, 0.923), (4, 3.40, 0.90)]}


def wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a share p over n trials (Wilson 1927)."""
    z = 1.959964
    centre, half = (p + z * z / (2 * n)), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def samples(fid: float, seed: int) -> torch.Tensor:
    """Real digits of the prompted classes, one per prompt, blurred and noised more the higher the FID: what a
    row's grid might hold."""
    ds = digits.Digits(16)
    by_digit: dict[str, list[int]] = {}
    for i in range(len(ds)):
        by_digit.setdefault(ds[i]["prompt"], []).append(i)
    picks = torch.stack([ds[by_digit[p][seed % len(by_digit[p])]]["image"] for p in digits.DIGIT_PROMPTS])
    g = torch.Generator().manual_seed(seed)
    blur = torch.nn.functional.avg_pool2d(picks, 3, 1, 1, count_include_pad=False)
    mix = min(1.0, fid / 8)
    noise = torch.randn((len(picks), 1, 16, 16), generator=g) * 0.035 * fid  # grey: the same in each channel
    return (picks * (1 - mix) + blur * mix + noise).clamp(-1, 1)


def row(method, student, steps, nfe, fid, adherence, ms, protocol, grid=None, seed=None, shares=True, clip=False):
    half = 0.1 + 0.04 * fid
    out = {"teacher": TEACHER, "method": method, "student": student, "steps": steps, "nfe": nfe, "fid": fid,
           "fid_lo": max(0.0, fid - half), "fid_hi": fid + half, "kid": fid / 90, "kid_std": 0.004 + fid / 900,
           "fid_teacher": max(0.0, fid - 2.2), "adherence": adherence, "ms_per_image": ms, "seed": seed,
           "train_steps": 0 if method == "teacher" else 1000, "device": "CPU", "threads": 2, "timing_repeats": 10,
           "timing_batch": 10, "speedup": 90.0 / ms, "speedup_reference_steps": 50,
           "protocol": {**protocol, "guidance": 5.0 if method == "teacher" else 1.0,
                        "sampler": "teacher DDIM" if method == "teacher" else f"{method} student"}}
    out["fid_teacher_lo"], out["fid_teacher_hi"] = max(0.0, out["fid_teacher"] - half), out["fid_teacher"] + half
    out["adherence_lo"], out["adherence_hi"] = wilson(adherence, 1000)
    if shares:  # precision and recall fall, diversity rises a little, as FID grows
        precision, recall = max(0.2, 0.82 - 0.03 * fid), max(0.1, 0.76 - 0.045 * fid)
        out.update(precision=precision, recall=recall, diversity=0.31 + 0.004 * fid)
        out["precision_lo"], out["precision_hi"] = wilson(precision, protocol["samples"])
        out["recall_lo"], out["recall_hi"] = wilson(recall, protocol["reference_size"])
        out["diversity_lo"], out["diversity_hi"] = out["diversity"] - 0.012, out["diversity"] + 0.012
    if clip:
        out.update(clip_score=27.4 - 0.3 * fid, clip_score_lo=27.1 - 0.3 * fid, clip_score_hi=27.7 - 0.3 * fid)
    if seed is not None:
        out.update(seedless_hash=f"{method}-{student}-{steps}")
    if grid is not None:
        out["grid"] = str(grid)
    return out


def build(folder: Path) -> Path:
    """The sample leaderboard (folder/leaderboard.sqlite) with its grids in folder/grids; its path."""
    db = folder / "leaderboard.sqlite"
    if db.exists():
        db.unlink()
    grids = folder / "grids"
    board = Leaderboard(db)
    old = {**DIGITS, "samples": 500}  # an older protocol: no precision, recall or diversity recorded
    for steps, fid, adh in TEACHER_ROWS[:1] + TEACHER_ROWS[3:4]:
        board.add(row("teacher", "-", steps, 2 * steps, fid + 0.3, adh, 1.8 * steps, old, shares=False))
    board.add(row("consistency", "lora", 4, 4, 2.31, 0.975, 7.5, old, shares=False))
    for steps, fid in [(50, 2.9), (4, 3.4)]:
        board.add(row("teacher", "-", steps, 2 * steps, fid, 0.97, 1.8 * steps, REAL, clip=True), new_table=True)
    board.add(row("consistency", "lora", 4, 4, 3.1, 0.975, 7.5, REAL, clip=True), new_table=True)
    protocol = {**DIGITS, **NEW_FIELDS}
    for steps, fid, adh in TEACHER_ROWS:
        grid = evaluation.write_grid(samples(fid, steps), 1, grids / f"teacher-{steps}steps.png")
        board.add(row("teacher", "-", steps, 2 * steps, fid, adh, 1.8 * steps, protocol, grid), new_table=True)
    for method, student, steps, fid, adh in STUDENT_ROWS:
        grid = evaluation.write_grid(samples(fid, steps), 1, grids / f"{method}-{steps}steps.png")
        board.add(row(method, student, steps, steps, fid, adh, 1.0 + 1.9 * steps, protocol, grid))
    for seed, points in LADD_SEEDS.items():
        for steps, fid, adh in points:
            grid = evaluation.write_grid(samples(fid, 10 * seed + steps), 1,
                                         grids / f"ladd-seed{seed}-{steps}steps.png")
            board.add(row("ladd", "lora", steps, steps, fid, adh, 1.2 + 1.9 * steps, protocol, grid, seed))
    return db


def shoot(html: Path, png: Path, width: int) -> None:
    """A screenshot of the page `width` CSS pixels wide, its trailing white trimmed."""
    from PIL import Image, ImageChops

    chromium = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
    if chromium is None:
        sys.exit("no chromium found: apt-get install chromium")
    height = 9000 if width >= 1000 else 16000  # taller than the page: the white below it is trimmed
    subprocess.run([chromium, "--headless", "--no-sandbox", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--screenshot={png}", f"--window-size={width},{height}", html.resolve().as_uri()], check=True,
                   capture_output=True)
    with Image.open(png) as im:
        im = im.convert("RGB")
        box = ImageChops.difference(im, Image.new("RGB", im.size, "white")).getbbox()
        im = im.crop((0, 0, im.width, min(im.height, box[3] + 24)))
        im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)  # a third the size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shoot", action="store_true", help="write the two screenshots into experiments/results")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    db = build(args.folder)
    rows = Leaderboard(db, readonly=True).rows()
    _, html = write_reports(rows, args.folder / "pages", grid_roots=[args.folder])
    print(html)
    if args.shoot:
        for width in (1400, 400):
            shoot(html, RESULTS / f"leaderboard_page_{width}.png", width)


if __name__ == "__main__":
    main()
