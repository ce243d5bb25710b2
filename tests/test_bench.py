"""`distill bench` end to end on a tiny teacher: baselines and a trained run land in a real SQLite leaderboard,
the pages carry a matplotlib plot and sample grids, and a second invocation redoes nothing."""
import sqlite3

import yaml


def test_bench_trains_evaluates_writes_pages_and_resumes(tmp_path, tiny_sdxl_dir, cli):
    run_cfg = tmp_path / "lcm.yaml"
    run_cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "lora", "lora_rank": 4},
        "method": {"name": "consistency"}, "data": {"kind": "digits", "batch_size": 2},
        "train": {"max_steps": 2, "checkpoint_every": 1}}))
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(yaml.safe_dump({
        "out": str(tmp_path / "bench"), "num_per_prompt": 1, "teacher_reference_steps": 4,
        "teachers": [{"source": str(tiny_sdxl_dir), "resolution": 32, "guidance_scale": 3.0, "steps": [4, 1]}],
        "runs": [{"config": str(run_cfg), "name": "lcm", "steps": [2, 1]}]}))
    first = cli("bench", matrix)
    assert "training consistency (lora)" in first.stdout and "leaderboard.html in a browser" in first.stdout
    db = tmp_path / "bench/leaderboard.sqlite"
    rows = sqlite3.connect(db).execute("SELECT method, steps, nfe, fid, fid_teacher, train_steps FROM rows "
                                       "ORDER BY id").fetchall()
    assert [r[:3] for r in rows] == [("teacher", 4, 8), ("teacher", 1, 2), ("consistency", 2, 2),
                                     ("consistency", 1, 1)]
    assert all(r[3] > 0 and r[4] is not None for r in rows) and rows[-1][5] == 2
    page = (tmp_path / "bench/leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # the plot and four grids
    assert (tmp_path / "bench/quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "bench/grids").glob("*.png"))) == 4

    again = cli("bench", matrix)  # nothing left to do: no training, no new rows
    assert "training" not in again.stdout
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 4


def test_bench_bad_matrix(tmp_path, cli):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("runs: [{config: no/such.yaml}]\n")
    proc = cli("bench", matrix, check=False)
    assert proc.returncode == 2 and "no such config file" in proc.stderr and "Traceback" not in proc.stderr
    matrix.write_text("teachers: [{source: builtin:digits-sdxl, stepz: [4]}]\n")
    proc = cli("bench", matrix, check=False)
    assert proc.returncode == 2 and "did you mean 'teachers[0].steps'" in proc.stderr
