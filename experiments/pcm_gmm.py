"""Phased consistency (PCM, `method.params.phases`) against LCM on the exact Gaussian-mixture teacher: energy
distance of each student's samples to the true distribution, three training seeds per recipe.

    python experiments/pcm_gmm.py > experiments/results/pcm_gmm.md      # ~10 min on 2 CPU cores

A K-phase student samples in K steps; LCM (K = 1) samples at any count, so it is measured at each K.
"""
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill import runs  # noqa: E402
from distill.trainer import train  # noqa: E402
from teachers.gmm import energy_distance  # noqa: E402

SEEDS, STEPS = (0, 1, 2), (2, 4)
T_975 = 4.303  # Student's t quantile for 2 degrees of freedom (3 seeds): the 95% interval of a mean


def distance(method, steps: int) -> float:
    labels = torch.arange(4).repeat_interleave(400)
    truth = method.teacher.sample_data(labels, torch.Generator().manual_seed(9))
    cond = method.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])
    x = method.sample(cond, steps, torch.Generator().manual_seed(5), (2,))
    return sum(energy_distance(x[labels == k], truth[labels == k]) for k in range(4)) / 4


def trained(schedule: str, phases: int, seed: int, out: Path):
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"}, "student": {"kind": "full"},
        "method": {"name": "consistency", "params": {"num_teacher_steps": 48, "guidance_min": 1.0,
                                                     "guidance_max": 1.0, "loss": "l2", "phases": phases}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(out), "max_steps": 1200, "learning_rate": 1e-3, "checkpoint_every": 100000,
                  "seed": seed}, "sample": {"steps": phases if phases > 1 else 4}})
    return train(cfg)


def main() -> None:
    print("# Phased consistency on the exact teacher\n")
    print("    python experiments/pcm_gmm.py\n")
    print("Energy distance (400 samples per class against 400 exact samples, mean over the 4 classes; lower is "
          "closer to the truth) of full students trained 1,200 steps on the 48-point grid, l2 loss, no CFG; "
          "mean over training seeds 0-2 with its 95% t-interval, and the per-seed values. A K-phase student "
          "samples in K steps. Rows whose intervals do not overlap differ; otherwise they tie.\n")
    print("| teacher | student | steps | energy distance, mean [95% interval] | seeds |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("vp", "flow"):
            for phases in (1, *STEPS):
                values = {s: [] for s in STEPS}
                for seed in SEEDS:
                    method = trained(schedule, phases, seed, Path(tmp) / f"{schedule}-{phases}-{seed}")
                    for steps in STEPS if phases == 1 else (phases,):
                        values[steps].append(distance(method, steps))
                for steps, v in values.items():
                    if v:
                        name = "LCM (phases 1)" if phases == 1 else f"PCM, {phases} phases"
                        mean, half = statistics.mean(v), T_975 * statistics.stdev(v) / len(v) ** 0.5
                        print(f"| gmm-{schedule} | {name} | {steps} | {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] "
                              f"| {', '.join(f'{x:.3f}' for x in v)} |", flush=True)


if __name__ == "__main__":
    main()
