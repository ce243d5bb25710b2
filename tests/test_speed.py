"""The sampling fast path and `distill bench-speed` on a real tiny run: the optimised student makes the same images,
SDPA is what the attention runs, and the side-by-side measurements land in the report and the leaderboard."""
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from distill import config
from distill.evaluate import load_run
from distill.speed import fast_path
from distill.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    out = tmp_path_factory.mktemp("speed") / "run"
    train(config.parse({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                        "student": {"kind": "lora", "lora_rank": 4},
                        "data": {"kind": "digits", "batch_size": 2},
                        "train": {"output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2}}))
    return out


def _pngs(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def test_generate_fast_path_flags_make_the_same_images(run, tmp_path, cli):
    args = ["generate", run, "--prompt", "a handwritten digit 1", "--num-per-prompt", 3, "--steps", 2]
    cli(*args, "--out", tmp_path / "plain")
    fast = cli(*args, "--out", tmp_path / "fast", "--channels-last", "--fuse-qkv", "--amp", "bf16")
    assert "fast path: LoRA fused, fused QKV in 1 backbone(s), channels-last" in fast.stdout
    for a, b in zip(_pngs(tmp_path / "plain"), _pngs(tmp_path / "fast"), strict=True):
        assert np.abs(a - b).max() <= 2
    proc = cli(*args, "--out", tmp_path / "t", "--fuse-qkv", "--teacher", check=False)
    assert proc.returncode == 2 and "the teacher is gone" in proc.stderr


def test_bench_speed_reports_side_by_side_and_fills_cost_columns(run, tmp_path, cli):
    db, report = tmp_path / "board.sqlite", tmp_path / "speed.md"
    proc = cli("bench-speed", run, "--steps", 1, 2, "--teacher-steps", 8, "--batch-size", 2, "--repeats", 1,
               "--channels-last", "--db", db, "--out", report)
    text = report.read_text()
    assert "AttnProcessor2_0" in text and "aten::_scaled_dot_product" in text  # SDPA is what ran
    lines = [line for line in text.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert len(lines) == 3 and "fast_speedup" in text and "wrote" in proc.stdout
    rows = sqlite3.connect(db).execute("SELECT method, steps, nfe, ms_per_image FROM rows ORDER BY id").fetchall()
    assert [r[:3] for r in rows] == [("teacher", 8, 16), ("consistency", 1, 1), ("consistency", 2, 2)]
    assert all(r[3] > 0 for r in rows)


def test_bench_speed_train_times_every_method_beside_a_fine_tune(run, tmp_path, cli):
    proc = cli("bench-speed", run, "--train", "--batch-size", 2, "--repeats", 1, "--db", tmp_path / "b.sqlite")
    table = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"denoise", "consistency", "progressive", "add", "ladd"} <= set(table)
    assert table["denoise"].split("|")[-2].strip() == "1"  # the fine-tune is the unit


@pytest.mark.slow
def test_compiled_sampling_matches_eager(run):
    _, _, method, _ = load_run(run)
    t = method.teacher
    cond = t.encode_prompts(["a handwritten digit 4", "a handwritten digit 9"])
    shape = t.latent_shape(32, 32)
    eager = method.sample(cond, 2, torch.Generator().manual_seed(3), shape)
    assert fast_path(method, compile=True) == ["torch.compile"]
    compiled = method.sample(cond, 2, torch.Generator().manual_seed(3), shape)
    assert torch.allclose(eager, compiled, atol=1e-4, rtol=1e-4), (eager - compiled).abs().max()
