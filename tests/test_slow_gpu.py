"""Long runs (slow) and real-weight runs (gpu), skipped by default.

gpu tests read local diffusers folders from DISTILL_SDXL and DISTILL_SD3 (nothing is downloaded).
"""
import os
from pathlib import Path

import pytest
import torch

from distill import runs
from distill.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_end_to_end(tmp_path, cli):
    run = tmp_path / "demo"
    cli("train", ROOT / "experiments/demo.yaml", f"train.output_dir={run}")
    cli("generate", run, "--prompts", ROOT / "experiments/prompts/digits.txt", "--steps", "4", "--out", run / "s")
    assert len(list((run / "s").glob("*.png"))) == 10
    assert (run / "student/pytorch_lora_weights.safetensors").is_file()


def _real(env: str) -> str:
    path = os.environ.get(env)
    if not path or not Path(path).is_dir():
        pytest.skip(f"set {env} to a local diffusers folder")
    return path


@pytest.mark.gpu
@pytest.mark.parametrize("env,steps", [("DISTILL_SDXL", 50), ("DISTILL_SD3", 28)])
def test_real_teacher_lora_consistency_steps(tmp_path, env, steps):
    cfg = runs.parse_config({
        "teacher": {"source": _real(env), "dtype": "float16", "resolution": 1024},
        "student": {"kind": "lora", "lora_rank": 64, "gradient_checkpointing": True},
        "method": {"name": "consistency", "params": {"num_teacher_steps": steps}},
        "data": {"kind": "digits", "batch_size": 1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "mixed_precision": "fp16",
                  "checkpoint_every": 3}})
    method = train(cfg)
    assert method.teacher.device.type == "cuda"
    lora = method.student.trainable_parameters()
    assert lora and all(torch.isfinite(p).all() for p in lora)
    assert (tmp_path / "run/student/pytorch_lora_weights.safetensors").is_file()
