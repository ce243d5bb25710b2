"""Two CPU processes over gloo under `accelerate launch`: the ranks read different shards, start and end with
identical weights (LoRA and discriminator heads), and match one process accumulating the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
CONFIGS = Path(__file__).parents[1] / "experiments" / "accelerate"


def _run(args, timeout=600):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# LADD: heads on the teacher (slow-marked); DMD2: heads on the fake score, an adapter beside the student's
@pytest.mark.parametrize("method", [pytest.param("ladd", marks=pytest.mark.slow), "dmd2"])
def test_two_process_training_matches_one_process_with_the_same_global_batch(tmp_path, tiny_sdxl_dir, method):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "lora", "lora_rank": 4},
        "method": {"name": method, "params": {"student_steps": 2}}, "data": {"kind": "digits", "batch_size": 2},
        "train": {"max_steps": 3, "learning_rate": 1e-3, "checkpoint_every": 3, "output_dir": str(tmp_path / "x")}}))
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    _run([*launch, str(WORKER), str(cfg), str(two), f"train.output_dir={two}/run"])
    _run([sys.executable, str(WORKER), str(cfg), str(one), f"train.output_dir={one}/run",
          "train.gradient_accumulation_steps=2"])

    init = [load_file(two / f"init-{r}.safetensors") for r in (0, 1)]
    final = [load_file(two / f"final-{r}.safetensors") for r in (0, 1)]
    single = load_file(one / "final-0.safetensors")
    assert any(k.startswith("discriminator.") for k in init[0]) and any(k.startswith("student.") for k in init[0])
    assert method != "dmd2" or any(k.startswith("fake.") for k in init[0])
    for k in init[0]:
        assert torch.equal(init[0][k], init[1][k]), k  # heads and adapters identical at step 0
        assert torch.equal(final[0][k], final[1][k]), k  # and after training
        assert torch.allclose(final[0][k], single[k], atol=1e-5, rtol=1e-4), (k, (final[0][k] - single[k]).abs().max())
    for part in ("student.", "discriminator.") + (("fake.",) if method == "dmd2" else ()):
        assert any(not torch.equal(init[0][k], final[0][k]) for k in init[0] if k.startswith(part)), part

    seen = [json.loads((two / f"seen-{r}.json").read_text()) for r in (0, 1)]
    seen_one = json.loads((one / "seen-0.json").read_text())
    steps = 3
    for s in range(steps):
        assert not set(seen[0][s]) & set(seen[1][s])  # different shards
        assert seen[0][s] + seen[1][s] == seen_one[2 * s] + seen_one[2 * s + 1]  # one global batch


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: load_config_from_file(str(p)).distributed_type for p in sorted(CONFIGS.glob("*.yaml"))}
    assert {k: str(v).split(".")[-1] for k, v in kinds.items()} == {
        "cpu_2proc": "MULTI_GPU", "ddp_8gpu": "MULTI_GPU", "deepspeed_zero2_8gpu": "DEEPSPEED",
        "fsdp_8gpu": "FSDP", "single_gpu": "NO"}
