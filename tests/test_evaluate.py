"""`distill eval` on a real (tiny) run: rows with quality, intervals, protocol and cost land in a real SQLite
leaderboard; a row measured another way, or with impossible steps, does not."""
import json
import sqlite3

import pytest

from distill import runs
from distill.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
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
    fid, lo, hi, kid_std, a_lo, adh, a_hi, protocol, pid = sqlite3.connect(db).execute(
        "SELECT fid, fid_lo, fid_hi, kid_std, adherence_lo, adherence, adherence_hi, protocol, protocol_id FROM rows "
        "WHERE id = 1").fetchone()
    assert 0 <= lo <= fid < hi and kid_std >= 0 and 0 <= a_lo <= adh <= a_hi <= 1
    protocol = json.loads(protocol)
    assert protocol["samples"] == 30 and protocol["reference_size"] == 1797 and protocol["eval_seeds"] == [0]
    assert protocol["teacher_reference_steps"] == 4 and protocol["extractor"] == "distill-digits"
    assert pid == sqlite3.connect(db).execute("SELECT protocol_id FROM rows WHERE id = 2").fetchone()[0]  # one table
    other = cli("eval", run, "--steps", "1", "--num-per-prompt", "2", "--db", db, check=False)
    (line,) = [ln for ln in other.stderr.splitlines() if "error:" in ln]
    assert other.returncode == 2 and "samples 30 -> 20" in line and "--new-table" in line
    assert "Traceback" not in other.stderr
    board = cli("leaderboard", "--db", db, "--out", tmp_path / "pages")
    assert "2 rows" in board.stdout


@pytest.mark.parametrize("steps", [-1, 0, 2.5])
def test_evaluate_refuses_impossible_steps_before_sampling(steps):
    from distill.errors import DistillError
    from distill.evaluation import Scoring, evaluate

    with pytest.raises(DistillError, match="steps must be an integer >= 1"):
        evaluate(None, None, steps, Scoring(["a handwritten digit 1"]))  # fails before touching the model


def test_a_row_records_its_protocol_and_only_how_it_was_measured_picks_its_table():
    from distill.evaluation import Scoring, protocol
    from distill.leaderboard import protocol_id

    cfg = runs.parse_config({"teacher": {"source": "builtin:digits-sdxl", "resolution": 16}}, for_training=False)
    prompts = [f"a handwritten digit {k}" for k in range(10) for _ in range(100)]
    default = protocol(Scoring(prompts, teacher_reference_steps=50), cfg, 5.0, teacher=True)
    assert default["samples"] == 1000 and default["reference_size"] == 1797 and default["eval_seeds"] == [0]
    assert default["sampler"] == "teacher DDIM" and default["guidance"] == 5.0 and default["resolution"] == 16
    assert default["extractor"] == "distill-digits" and default["num_prompts"] == 10 and default["bootstrap"] == 200
    student = protocol(Scoring(prompts, teacher_reference_steps=50), cfg, 1.0, teacher=False)
    assert protocol_id(student) == protocol_id(default)  # a student's own guidance and sampler: the same table
    for other in (Scoring(prompts[::2]), Scoring(prompts, seed=1), Scoring(prompts, reference_size=500)):
        assert protocol_id(protocol(other, cfg, 5.0, teacher=True)) != protocol_id(default)
