"""Sampling cost of the compressed digits students against the uncompressed ones, side by side in one process:
each LoRA student as evaluated (adapter unfused) and merged (the LoRA fused into the UNet, as `distill export
--format merged` ships it), the compressed student, and T-Stitch (the compressed student's first half of the steps,
the merged LoRA student's second half), with the teacher's 50 CFG steps as the yardstick.

    python experiments/compressed_digits_speed.py runs/bench-digits-sdxl > experiments/results/digits_sdxl_compressed_speed.md

Runs (in the folder a `distill bench experiments/bench_digits_sdxl.yaml` wrote): <method>_digits_sdxl-seed0 and
<method>_digits_sdxl_compressed-seed0 for consistency (lcm) and dmd2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import students  # noqa: E402
from distill import digits, sampling, speed  # noqa: E402
from distill.evaluation import sample_images  # noqa: E402
from distill.runs import load_run  # noqa: E402
from students import compressed  # noqa: E402

STEPS, BATCH, REPEATS = 4, 10, 20


def call(method, guidance, stitch_with=None):
    prompts = [digits.DIGIT_PROMPTS[i % 10] for i in range(BATCH)]

    def run():
        if stitch_with is None:
            sample_images(method, prompts, STEPS, 0, guidance, False, batch_size=BATCH)
            return
        with sampling.stitched(method, stitch_with, 0.5, STEPS):
            sample_images(method, prompts, STEPS, 0, guidance, False, batch_size=BATCH)
    return run


def main() -> None:
    root = Path(sys.argv[1])
    torch.set_num_threads(2)
    jobs, params = {}, {}
    teacher_job = None
    for name in ("lcm", "dmd2"):
        _, cfg, lora, _ = load_run(root / f"{name}_digits_sdxl-seed0")
        _, _, merged, _ = load_run(root / f"{name}_digits_sdxl-seed0")
        students.fuse_lora(merged.student.backbone)
        _, _, small, _ = load_run(root / f"{name}_digits_sdxl_compressed-seed0")
        g = cfg.sample.guidance_scale
        jobs |= {f"{name} LoRA (unfused)": call(lora, g), f"{name} LoRA merged": call(merged, g),
                 f"{name} compressed": call(small, g), f"{name} T-Stitch 0.5 (compressed, then merged)":
                 call(merged, g, stitch_with=small)}
        params |= {f"{name} LoRA merged": compressed.parameters(merged.student.backbone),
                   f"{name} compressed": compressed.parameters(small.student.backbone)}
        if teacher_job is None:
            prompts = [digits.DIGIT_PROMPTS[i % 10] for i in range(BATCH)]
            teacher_job = speed.sampler(lora, prompts, 50, 5.0, True)
    jobs["teacher, 50 CFG steps"] = teacher_job
    times = speed.interleaved(jobs, REPEATS, warmup=2)
    print(f"# Compressed digits students: sampling cost side by side ({STEPS} steps, batch {BATCH})\n")
    print("    python experiments/compressed_digits_speed.py runs/bench-digits-sdxl\n")
    print(f"CPU, 2 threads, torch {torch.__version__}; {REPEATS} interleaved rounds after 2 warm-up rounds, each "
          f"call prompts to pixels for a batch of {BATCH}; median ms/image with IQR; ratios are of medians with 95% "
          "bootstrap intervals. `LoRA (unfused)` samples as `distill eval` does (peft adapter layers in the UNet); "
          "`merged` has the LoRA fused, as the merged export ships it.\n")
    print("| sampler | UNet parameters | ms / image | IQR | vs LoRA unfused | vs LoRA merged | vs teacher 50 steps |")
    print("|---|---|---|---|---|---|---|")
    for key, ms in times.items():
        name = key.split()[0]
        per = [t / BATCH for t in ms]
        median, iqr = speed.median_iqr(per)
        cells = []
        for ref in (f"{name} LoRA (unfused)", f"{name} LoRA merged", "teacher, 50 CFG steps"):
            if ref not in times or ref == key:
                cells.append("-")
                continue
            r, lo, hi = speed.ratio_interval(ms, times[ref])
            cells.append(f"{r:.2f} [{lo:.2f}, {hi:.2f}]")
        p = params.get(key)
        print(f"| {key} | {p / 1e6:.2f}M |" if p else f"| {key} | - |", f"{median:.2f} | {iqr:.2f} |",
              " | ".join(cells), "|")


if __name__ == "__main__":
    main()
