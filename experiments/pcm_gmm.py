"""Phased consistency (PCM, `method.params.phases`) and continuous-time consistency (sCM, method `scm`) against LCM
on the exact Gaussian-mixture teacher: energy distance of each student's samples to the true distribution, three
training seeds per recipe.

    python experiments/pcm_gmm.py > experiments/results/pcm_gmm.md      # ~15 min on 2 CPU cores

A K-phase student samples in K steps; LCM (K = 1) and sCM sample at any count, so they are measured at 1, 2 and 4.
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
from teachers.gmm import class_energy_distance  # noqa: E402

SEEDS = (0, 1, 2)
T_975 = 4.303  # Student's t quantile for 2 degrees of freedom (3 seeds): the 95% interval of a mean


def cell(v: list[float]) -> str:
    """Mean over the seeds with its 95% t-interval."""
    mean, half = statistics.mean(v), T_975 * statistics.stdev(v) / len(v) ** 0.5
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def distance(method, steps: int) -> float:
    labels = torch.arange(4).repeat_interleave(400)
    truth = method.teacher.sample_data(labels, torch.Generator().manual_seed(9))
    cond = method.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])
    x = method.sample(cond, steps, torch.Generator().manual_seed(5), (2,))
    return class_energy_distance(x, truth, labels)


def trained(schedule: str, method: dict, seed: int, out: Path):
    phases = method["params"].get("phases", 1)  # a K-phase student samples in K steps
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"}, "student": {"kind": "full"}, "method": method,
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(out), "max_steps": 1200, "learning_rate": 1e-3, "checkpoint_every": 100000,
                  "seed": seed}, "sample": {"steps": phases if phases > 1 else 4}})
    return train(cfg)


def consistency(phases: int) -> dict:
    return {"name": "consistency", "params": {"num_teacher_steps": 48, "guidance_min": 1.0, "guidance_max": 1.0,
                                              "loss": "l2", "phases": phases}}


# (name, method, the step counts it is measured at)
RECIPES = [("LCM (phases 1)", consistency(1), (1, 2, 4)), ("PCM, 2 phases", consistency(2), (2,)),
           ("PCM, 4 phases", consistency(4), (4,)),
           ("sCM", {"name": "scm", "params": {"guidance_min": 1.0, "guidance_max": 1.0, "warmup": 100}}, (1, 2, 4))]


def main() -> None:
    print("# Phased and continuous-time consistency on the exact teacher\n")
    print("    python experiments/pcm_gmm.py\n")
    print("Energy distance (400 samples per class against 400 exact samples, mean over the 4 classes; lower is "
          "closer to the truth) of full students trained 1,200 steps at learning rate 1e-3, no CFG: LCM and PCM on "
          "the 48-point grid with the l2 loss, sCM with its defaults and a 100-step tangent warm-up; mean over "
          "training seeds 0-2 with its 95% t-interval, and the per-seed values. A K-phase student samples in K "
          "steps. Rows whose intervals do not overlap differ; otherwise they tie.\n")
    print("| teacher | student | steps | energy distance, mean [95% interval] | seeds |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("vp", "flow"):
            for i, (name, method, steps_list) in enumerate(RECIPES):
                values = {s: [] for s in steps_list}
                for seed in SEEDS:
                    student = trained(schedule, method, seed, Path(tmp) / f"{schedule}-{i}-{seed}")
                    for steps in steps_list:
                        values[steps].append(distance(student, steps))
                for steps, v in values.items():
                    print(f"| gmm-{schedule} | {name} | {steps} | {cell(v)} | {', '.join(f'{x:.3f}' for x in v)} |",
                          flush=True)


if __name__ == "__main__":
    main()
