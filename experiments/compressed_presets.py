"""The compressed-student presets at SDXL's real size: parameters, MACs per sampling step and `distill plan`'s
memory for a fine-tune step with feature distillation (meta device, no weights; ~30 s per preset on 2 CPU cores).

    python experiments/compressed_presets.py > experiments/results/compressed_students.md
"""
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill import plan  # noqa: E402
from distill.runs import load_config  # noqa: E402
from students.compressed import UNET_PRESETS  # noqa: E402

GB = 1e9
base = load_config(ROOT / "experiments/lcm_sdxl_lora.yaml", ["teacher.resolution=1024", "data.batch_size=1",
                                                          "method.name=denoise", "method.params={}",
                                                          "train.mixed_precision=bf16"], for_training=False,
                   source=False)
print("# Compressed students of SDXL (`student.kind: compressed`)\n")
print("    python experiments/compressed_presets.py > experiments/results/compressed_students.md\n")
print("SDXL base's architecture (`teachers/architectures/sdxl-base.json`) on the meta device. MACs: one forward of "
      "the student's UNet at batch 1, 1024 px, no CFG (a sampling step). Memory: `distill plan`'s peak for a "
      "fine-tune (`denoise`) step at batch 1 with gradient checkpointing, the frozen bf16 teacher included, feature "
      "distillation on for compressed students (one more teacher forward and the matched features); a full "
      "student is the whole UNet trained without compression. On a GPU under bf16 autocast the peak ran 11% "
      "(compressed) and 22% (full) above the plan (`gpu_check.md`).\n")
print("| student | removal plan | UNet parameters | share of the teacher's | GMACs / step | plan peak (GB) |")
print("|---|---|---|---|---|---|")
for preset in ["full", "half", *UNET_PRESETS]:
    student = dataclasses.replace(base.student, gradient_checkpointing=True, kind="full" if preset == "full" else
                                  "compressed", compression=None if preset == "full" else preset)
    r = plan.plan(dataclasses.replace(base, student=student), "sdxl-base-arch")
    plan_text = "-" if preset == "full" else str(UNET_PRESETS.get(preset, "every stage halved, no mid block"))
    print(f"| {preset} | {plan_text} | {r['student_params'] / 1e9:.3f}B | {r['student_params'] / r['teacher_params']:.2f} "
          f"| {r['student_macs'] / 1e9:.0f} | {r['peak'] / GB:.1f} |", flush=True)
