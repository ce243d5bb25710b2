"""`distill eval` on a real (tiny) run: rows with quality and cost land in a real SQLite leaderboard."""
import sqlite3

import pytest

from distill import config
from distill.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = config.parse({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                        "student": {"kind": "lora", "lora_rank": 4}, "data": {"kind": "digits", "batch_size": 2},
                        "train": {"output_dir": str(tmp / "run"), "max_steps": 2}})
    train(cfg)
    return tmp / "run"


def test_eval_adds_student_and_teacher_rows(run, tmp_path, cli):
    db = tmp_path / "board.sqlite"
    student = cli("eval", run, "--steps", "2", "--num-per-prompt", "3", "--db", db, "--teacher-reference-steps", "4")
    assert "added row 1" in student.stdout and "nfe=2" in student.stdout
    teacher = cli("eval", run, "--teacher", "--steps", "4", "--guidance-scale", "5", "--num-per-prompt", "3",
                  "--db", db, "--out", tmp_path / "grids")
    assert "nfe=8" in teacher.stdout  # 4 steps with CFG: two evaluations each
    rows = sqlite3.connect(db).execute(
        "SELECT method, student, steps, nfe, fid, kid, fid_teacher, adherence, ms_per_image, train_steps, "
        "config_hash, git_commit FROM rows ORDER BY id").fetchall()
    (s_method, s_kind, s_steps, s_nfe, s_fid, s_kid, s_fidt, s_adh, s_ms, s_train, s_hash, s_git), t = rows
    assert (s_method, s_kind, s_steps, s_nfe, s_train) == ("consistency", "lora", 2, 2, 2)
    assert s_fid > 0 and s_fidt is not None and 0 <= s_adh <= 1 and s_ms > 0 and len(s_hash) == 12 and s_git
    assert t[:4] == ("teacher", "-", 4, 8) and t[6] is None
    assert (tmp_path / "grids/teacher-4steps.png").is_file() and (run / "checkpoints/step-00000002/eval").is_dir()
    board = cli("leaderboard", "--db", db, "--out", tmp_path / "pages")
    assert "2 rows" in board.stdout


def test_eval_bad_inputs(run, tmp_path, cli):
    (tmp_path / "empty.txt").write_text("")
    proc = cli("eval", run, "--steps", "2", "--prompts", tmp_path / "empty.txt", "--db", tmp_path / "b.sqlite",
               check=False)
    assert proc.returncode == 2 and "holds no prompts" in proc.stderr
    proc = cli("eval", run, "--steps", "2", "--num-per-prompt", "2", "--extractor", "no-such", "--db",
               tmp_path / "b.sqlite", check=False)
    assert proc.returncode == 2 and "feature extractor 'no-such'" in proc.stderr
    (tmp_path / "corrupt.sqlite").write_bytes(b"junk" * 100)
    proc = cli("eval", run, "--steps", "2", "--db", tmp_path / "corrupt.sqlite", check=False)
    assert proc.returncode == 2 and "cannot be used" in proc.stderr
    assert (tmp_path / "corrupt.sqlite").read_bytes() == b"junk" * 100
