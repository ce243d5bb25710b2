"""distill's consistency (LCM-LoRA) training step against diffusers' own LCM-LoRA script, each as a ratio to distill's
plain LoRA fine-tune step (`denoise`) of the same teacher and settings, measured in one invocation (issue #17).

    python experiments/speed_vs_diffusers_lcm.py experiments/speed_real_size_sdxl.yaml \
        --script DIFFUSERS/examples/consistency_distillation/train_lcm_distill_lora_sdxl.py --repeats 5

The script runs first, in its own process, on the config's teacher folder, resolution, LoRA rank and gradient
checkpointing, batch 1, without mixed precision (so the teacher's dtype must be float32), on a folder of captioned
digits it reads as an imagefolder. experiments/time_optimiser_steps.py times it from outside: a step is the time
between two optimiser steps (data, text encoding, VAE encode, student pass, the teacher's two guidance passes, the
target pass, backward, clipping, AdamW), the same work as a `distill bench-speed --train` step. `distill train`
itself runs next on the same folder (data.kind=images), timed from outside the same way. Then distill's steps are
timed in this process, as bench-speed does. All use 2 warm-up steps, `repeats` timed ones and the peak resident
set over the timed steps. The script needs the `datasets` package: give an interpreter that has it and diffusers
with --python.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from distill import runs, speed

HERE = Path(__file__).parent


def captioned_digits(folder: Path, resolution: int, n: int = 16) -> None:
    """n sklearn digits at resolution x resolution with captions, as an imagefolder (metadata.jsonl)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((resolution, resolution)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {digits.target[i]}"}) + "\n")


def timed_steps(python: str, program: list[str], repeats: int) -> dict:
    """{"step_ms": [...], "peak_mb": ...} of a training program's timed steps, timed from outside."""
    cmd = [python, str(HERE / "time_optimiser_steps.py"), "2", str(repeats), *program]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[time_optimiser_steps] {")]
    if proc.returncode or not lines:
        sys.exit(f"{Path(program[0]).name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def script_steps(args, cfg, work: Path) -> dict:
    """The script's timed steps on the captioned digits in work/data."""
    program = [args.script, "--pretrained_teacher_model", cfg.teacher.source, "--train_data_dir", str(work / "data"),
               "--output_dir", str(work / "out"), "--cache_dir", str(work / "cache"),
               "--resolution", str(cfg.teacher.resolution), "--train_batch_size", "1",
               "--lora_rank", str(cfg.student.lora_rank), "--mixed_precision", "no", "--max_train_steps", "1000",
               "--dataloader_num_workers", "0", "--checkpointing_steps", "100000", "--validation_steps", "100000",
               "--report_to", "tensorboard", "--seed", str(cfg.train.seed)]
    program += ["--gradient_checkpointing"] if cfg.student.gradient_checkpointing else []
    return timed_steps(args.python, program, args.repeats)


def trainer_steps(args, work: Path) -> dict:
    """`distill train`'s timed steps (consistency, the config's settings) on the captioned digits in work/data."""
    program = [str(Path(sys.executable).with_name("distill")), "train", args.config, "method.name=consistency",
               "data.kind=images", f"data.path={work / 'data'}", f"train.output_dir={work / 'distill'}",
               "train.max_steps=1000", "train.checkpoint_every=100000"]
    return timed_steps(sys.executable, program, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--script", required=True, help="diffusers' train_lcm_distill_lora_sdxl.py")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with diffusers and datasets")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = runs.load_config(args.config, for_training=False)
    if cfg.teacher.dtype != "float32" or cfg.student.kind != "lora" or cfg.teacher.width:
        sys.exit("needs a float32 teacher, a LoRA student and a square resolution: the script's settings")
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "data").mkdir()
        captioned_digits(Path(work) / "data", cfg.teacher.resolution)
        script = script_steps(args, cfg, Path(work))
        trainer = trainer_steps(args, Path(work))
    rows, _, _ = speed.training_rows(cfg, 1, args.repeats, False, methods=["consistency"])
    fine_tune, consistency = rows[0], rows[1]
    rows += [speed.step_row(name, steps["step_ms"], steps["peak_mb"], fine_tune)
             for name, steps in [("diffusers " + Path(args.script).name, script), ("distill train", trainer)]]
    vs_script = {name: speed.ratio_interval(steps, script["step_ms"])
                 for name, steps in [("consistency step", consistency["times_ms"]),
                                     ("train step", trainer["step_ms"])]}
    cols = ["method", "eager_ms", "eager_iqr", "vs_fine_tune", "vs_fine_tune_95ci", "peak_mb", "peak_vs_fine_tune"]
    print(f"# python experiments/speed_vs_diffusers_lcm.py {args.config} --script {args.script} "
          f"--repeats {args.repeats}\n\nteacher {cfg.teacher.source} ({cfg.teacher.dtype}), {cfg.teacher.pixels} px, "
          f"batch 1, LoRA rank {cfg.student.lora_rank}, gradient checkpointing "
          f"{'on' if cfg.student.gradient_checkpointing else 'off'}; median and IQR (ms) of {args.repeats} steps after "
          f"2 warm-up steps\n\n{speed.markdown(rows, cols)}\n")
    for name, (ratio, lo, hi) in vs_script.items():
        print(f"distill {name} / the script's step: {ratio:.3f} [{lo:.3g}, {hi:.3g}]")


if __name__ == "__main__":
    main()
