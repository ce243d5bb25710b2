"""The sampling fast path and `distill bench-speed` on a real tiny run: the optimised student makes the same images,
SDPA is what the attention runs, and the side-by-side measurements land in the report and the leaderboard. The
measurements run with tiny repeats (`min_repeats`): these tests check the plumbing, never a timing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill import cli, runs, speed
from distill.errors import DistillError
from distill.runs import load_run
from distill.leaderboard import Leaderboard
from distill.fastpath import fast_path
from distill.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    out = tmp_path_factory.mktemp("speed") / "run"
    train(runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                        "student": {"kind": "lora", "lora_rank": 4},
                        "data": {"kind": "digits", "batch_size": 2},
                        "train": {"output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2}}))
    return out


def _field(row: dict, name: str):
    """A row's value whether the leaderboard keeps it in a column or in the JSON `extra`."""
    return row[name] if name in row else json.loads(row.get("extra") or "{}").get(name)


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


def test_bench_speed_reports_side_by_side_and_fills_cost_columns(run, tmp_path):
    db = tmp_path / "board.sqlite"
    before = torch.get_num_threads()
    text = speed.bench(run, [1, 2], 8, 5.0, 2, 2, dict(compile=False, channels_last=True, fuse_qkv=False), None,
                       False, db, threads=1, warmup=1, min_repeats=1)
    assert torch.get_num_threads() == before  # pinned while measuring only
    assert "CPU (1 threads)" in text and "median and IQR of 2 rounds after 1 warm-up" in text
    assert "AttnProcessor2_0" in text and "aten::_scaled_dot_product" in text  # SDPA is what ran
    lines = [line for line in text.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert len(lines) == 3 and "fast_speedup" in text and "speedup_iqr" in text
    rows = sorted(Leaderboard(db).rows("id"), key=lambda r: r["id"])
    assert [(r["method"], r["steps"], r["nfe"]) for r in rows] == [("teacher", 8, 16), ("consistency", 1, 1),
                                                                 ("consistency", 2, 2)]
    assert all(r["ms_per_image"] > 0 for r in rows) and _field(rows[0], "speedup") == 1.0
    assert all(_field(r, "threads") == 1 and _field(r, "timing_repeats") == 2 and _field(r, "ms_iqr") >= 0
               for r in rows)


def test_bench_speed_train_times_every_method_beside_a_fine_tune(run, tmp_path):
    # A config YAML works as well as a run folder (a real-size teacher has no run yet); one teacher serves all.
    text = speed.bench(run / "config.yaml", [1], 1, 5.0, 2, 2, {}, None, True, tmp_path / "b.sqlite", warmup=1,
                       min_repeats=1)
    table = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    assert set(table) == {"method", "denoise", "consistency", "progressive", "add", "ladd", "dmd2", "scm", "rcm"}
    assert "- guidance: config field 'student.guidance_embedding' has bad value False" in text  # said why
    head = [c.strip() for c in table["method"]]
    assert table["denoise"][head.index("vs_fine_tune")].strip() == "1"  # the fine-tune is the unit
    assert table["denoise"][head.index("vs_fine_tune_95ci")].strip() == "[1, 1]"
    peaks = {name: float(row[head.index("peak_mb")]) for name, row in table.items() if name != "method"}
    assert all(p > 0 for p in peaks.values()), peaks
    assert float(table["consistency"][head.index("vs_fine_tune")]) > 0


def test_peak_memory_is_each_measurements_own():
    with speed.peak_memory("cpu") as big:
        x = torch.empty(512 * 2**20, dtype=torch.uint8).fill_(1)  # 512 MB touched and held to the end
    del x
    with speed.peak_memory("cpu") as small:
        torch.ones(1)
    assert big["mb"] - small["mb"] > 256


def test_ratio_interval_brackets_the_ratio_of_medians():
    ratio, lo, hi = speed.ratio_interval([2.0, 2.2, 1.8, 2.1, 1.9], [1.0, 1.1, 0.9, 1.0, 1.0])
    assert ratio == 2.0 and 1.6 < lo <= ratio <= hi < 2.5


@pytest.mark.parametrize("flag, value", [("--repeats", 0), ("--repeats", 9), ("--steps", 0),
                                         ("--teacher-steps", 0), ("--batch-size", 0)])
def test_bench_speed_refuses_bad_counts_in_one_line(tmp_path, capsys, flag, value):
    counts = {"steps": [1], "teacher_steps": 50, "batch_size": 10, "repeats": 10}
    name = flag[2:].replace("-", "_")
    counts[name] = [value] if name == "steps" else value
    with pytest.raises(DistillError, match=f"^{flag} must be an integer >= (1|10), got {value}$"):
        speed.bench(tmp_path / "never-loaded", teacher_guidance=5.0, flags={}, amp=None, train=False,
                    db=tmp_path / "db", **counts)
    try:  # the command line may refuse it while parsing (argparse exits) or through the error above
        code = cli.main(["bench-speed", str(tmp_path / "never-loaded"), "--repeats", "10", flag, str(value)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and flag in err and str(value) in err


def test_interleaved_warms_up_then_rotates_round_robin():
    calls = []
    times = speed.interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=3, warmup=2)
    assert calls == list("aabbcc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert speed.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)  # the outlier moves neither
    assert speed.ratio([4.0, 9.0, 2.0], [2.0, 3.0, 2.0]) == (2.0, 1.0)


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
