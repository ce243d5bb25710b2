"""The SQLite leaderboard under concurrent writers, its migrations, protocols, row checks, foreign and read-only
files, locks, and its reports. Every test uses a real SQLite file."""
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from distill import cli
from distill.errors import DistillError
from distill.leaderboard import SCHEMA_VERSION, Leaderboard, protocol_id

# The schema distill wrote before intervals and protocols (schema version 2), as `git show HEAD:distill/
# leaderboard.py` had it before this change: a file from the wild that must migrate without losing a row.
SCHEMA_V2 = """
CREATE TABLE rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, teacher TEXT NOT NULL, method TEXT NOT NULL,
    student TEXT NOT NULL, steps INTEGER NOT NULL, nfe INTEGER, fid REAL, kid REAL, adherence REAL,
    ms_per_image REAL, train_steps INTEGER, train_seconds REAL, config_hash TEXT, git_commit TEXT);
ALTER TABLE rows ADD COLUMN fid_teacher REAL;
ALTER TABLE rows ADD COLUMN kid_teacher REAL;
ALTER TABLE rows ADD COLUMN clip_score REAL;
ALTER TABLE rows ADD COLUMN peak_memory_mb REAL;
ALTER TABLE rows ADD COLUMN extra TEXT;
PRAGMA user_version = 2;
"""
PROTOCOL = {"samples": 1000, "num_prompts": 10, "prompts": "p10", "reference": "digits", "reference_size": 1797,
            "extractor": "distill-digits", "extractor_weights": None, "resolution": 16, "eval_seeds": [0],
            "bootstrap": 200, "teacher_reference_steps": 50, "teacher_reference_guidance": 5.0}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def v2_file(path):
    """A leaderboard as today's distill leaves it: schema 2, WAL, two rows, one with JSON extra."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_V2)
    db.execute("INSERT INTO rows (created, teacher, method, student, steps, nfe, fid, kid, adherence, fid_teacher, "
               "extra) VALUES (1, 'builtin:digits-sdxl', 'teacher', '-', 50, 100, 2.26, 0.001, 0.985, -6.1e-13, "
               "'{\"guidance\": 5.0, \"samples\": 200}')")
    db.execute("INSERT INTO rows (created, teacher, method, student, steps, nfe, fid) VALUES "
               "(2, 'builtin:digits-sdxl', 'consistency', 'lora', 4, 4, 1.96)")
    db.commit()
    db.close()
    return path


def good_row(**kw):
    row = {"teacher": "t", "method": "consistency", "student": "lora", "steps": 4, "nfe": 4, "fid": 2.0,
           "fid_lo": 1.9, "fid_hi": 2.1, "kid": 0.01, "kid_std": 0.002, "adherence": 0.9, "adherence_lo": 0.88,
           "adherence_hi": 0.92, "ms_per_image": 5.0, "protocol": dict(PROTOCOL, guidance=1.0, sampler="x")}
    return {**row, **kw}

WRITER = """
import sys
from distill.leaderboard import Leaderboard
board = Leaderboard(sys.argv[1])
for i in range(50):
    board.add({"teacher": "tiny", "method": f"m{sys.argv[2]}", "student": "lora", "steps": i % 4 + 1,
               "fid": float(i), "nfe": i % 4 + 1, "config_hash": f"{sys.argv[2]}-{i}"})
"""


def test_four_processes_append_fifty_rows_each_while_a_reader_reads(tmp_path):
    db = tmp_path / "board.sqlite"
    Leaderboard(db).close()
    seen, errors, stop = [], [], threading.Event()

    def read():
        reader = Leaderboard(db)
        while not stop.is_set():
            try:
                rows = reader.rows()
                assert all(r["teacher"] == "tiny" and r["config_hash"] and r["fid"] is not None for r in rows)
                seen.append(len(rows))
            except Exception as e:  # any error here is a broken table
                errors.append(e)

    thread = threading.Thread(target=read)
    thread.start()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(k)]) for k in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    stop.set()
    thread.join()
    rows = Leaderboard(db).rows()
    assert len(rows) == 200 and len({r["config_hash"] for r in rows}) == 200
    assert not errors and seen == sorted(seen)  # the reader only ever saw whole, growing tables


def test_todays_file_is_migrated_with_every_row(tmp_path):
    db = v2_file(tmp_path / "v2.sqlite")
    board = Leaderboard(db)
    assert board.version == SCHEMA_VERSION == 4
    assert {"fid_lo", "fid_hi", "kid_std", "adherence_lo", "adherence_hi", "seed", "protocol", "protocol_id"} <= \
        set(board.columns())
    old = board.rows("id")
    assert [(r["method"], r["fid"]) for r in old] == [("teacher", 2.26), ("consistency", 1.96)]
    assert old[0]["fid_lo"] is None and json.loads(old[0]["extra"]) == {"guidance": 5.0, "samples": 200}
    board.add(good_row())  # the new columns take new rows beside the old ones
    assert len(board.rows()) == 3 and board.rows("id")[-1]["protocol_id"] == protocol_id(PROTOCOL)
    board.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_older_file_is_migrated_not_dropped(tmp_path):
    db = tmp_path / "old.sqlite"
    old = Leaderboard(db, target_version=1)
    assert old.version == 1 and "fid_teacher" not in old.columns()
    old.add({"teacher": "t", "method": "consistency", "student": "lora", "steps": 4, "fid": 3.5})
    old.close()
    board = Leaderboard(db)
    assert board.version == SCHEMA_VERSION and "fid_teacher" in board.columns()
    (row,) = board.rows()
    assert row["fid"] == 3.5 and row["method"] == "consistency"
    board.add({"teacher": "t", "method": "consistency", "student": "lora", "steps": 1, "fid_teacher": 1.0,
               "kid": 0.1, "new_metric": 7})
    assert len(board.rows()) == 2 and '"new_metric": 7' in board.rows("steps")[0]["extra"]


def test_corrupt_or_newer_files_are_reported_and_left_alone(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(DistillError, match="cannot be used"):
        Leaderboard(bad)
    assert bad.read_bytes() == b"not a database" * 100
    newer = tmp_path / "newer.sqlite"
    sqlite3.connect(newer).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DistillError, match="newer than this distill"):
        Leaderboard(newer)


def test_leaderboard_command_prints_and_writes_pages(tmp_path, capsys):
    board = Leaderboard(tmp_path / "b.sqlite")
    board.add({"teacher": "tiny-sdxl", "method": "consistency", "student": "lora", "steps": 4, "fid": 12.5, "nfe": 4})
    board.add({"teacher": "tiny-sdxl", "method": "teacher", "student": "-", "steps": 50, "fid": 3.25, "nfe": 100})
    assert cli.main(["leaderboard", "--db", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.index("3.25") < out.index("12.50") and "2 rows" in out  # teacher@50 heads its group
    page = (tmp_path / "out/leaderboard.html").read_text()
    assert page.count("<tr class='ref'>") == 1 and page.count("<tr class='row'>") == 1 and "consistency" in page
    md = (tmp_path / "out/leaderboard.md").read_text()
    assert "| **★ teacher (reference)** | - | 50 | 100 | - | 3.25 | - |" in md and "| +9.25 |" in md
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert cli.main(["leaderboard", "--db", str(tmp_path / "none.sqlite")]) == 2


def test_a_row_under_another_protocol_is_refused_unless_a_new_table_is_started(tmp_path):
    board = Leaderboard(tmp_path / "b.sqlite")
    board.add(good_row())
    board.add(good_row(method="teacher", student="-", protocol=dict(PROTOCOL, guidance=5.0, sampler="teacher DDIM")))
    fewer = dict(PROTOCOL, samples=200, reference_size=200)
    with pytest.raises(DistillError) as refused:
        board.add(good_row(protocol=fewer))
    line = str(refused.value)
    assert "\n" not in line and "samples 1000 -> 200" in line and "reference_size 1797 -> 200" in line
    assert "--new-table" in line and len(board.rows()) == 2
    board.add(good_row(protocol=fewer), new_table=True)
    board.add(good_row(protocol=fewer, steps=2))  # that table exists now
    assert list(board.protocols()) == [protocol_id(PROTOCOL), protocol_id(fewer)]
    assert len(board.rows()) == 4


@pytest.mark.parametrize("bad,why", [
    ({"steps": -1}, "steps must be an integer >= 1"), ({"nfe": -1}, "nfe must be an integer >= 1"),
    ({"steps": 0}, "steps must be"), ({"steps": 2.5}, "steps must be"), ({"steps": True}, "steps must be"),
    ({"teacher": ""}, "needs teacher"), ({"fid": math.nan}, "fid must be a finite number"),
    ({"fid": math.inf, "fid_hi": math.inf}, "fid must be a finite"), ({"kid": "0.1"}, "kid must be a finite"),
    ({"fid": -1.0, "fid_lo": -2.0}, "cannot be negative"), ({"adherence": 1.5, "adherence_hi": 1.6}, "in \\[0, 1\\]"),
    ({"ms_per_image": 0.0}, "ms_per_image must be > 0"), ({"fid_lo": 2.5}, "contain fid"),
    ({"fid_hi": None}, "must both be given"), ({"train_steps": -5}, "train_steps must be an integer >= 0"),
    ({"seed": "zero"}, "seed must be an integer"), ({"speedup": math.nan}, "row refused"),
])
def test_invalid_rows_never_reach_the_leaderboard(tmp_path, bad, why):
    board = Leaderboard(tmp_path / "b.sqlite")
    with pytest.raises(DistillError, match=why):
        board.add(good_row(**bad))
    assert board.rows() == []


def test_another_programs_database_is_refused_and_untouched(tmp_path, capsys):
    other = tmp_path / "other_app.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO users (name) VALUES ('ada')")
    db.commit()
    db.close()
    before = sha256(other)
    for readonly in (False, True):
        with pytest.raises(DistillError, match="not a distill leaderboard .*tables: users.* left untouched"):
            Leaderboard(other, readonly=readonly)
    assert cli.main(["leaderboard", "--db", str(other), "--out", str(tmp_path / "out")]) == 2
    assert "not a distill leaderboard" in capsys.readouterr().err
    assert sha256(other) == before and sorted(p.name for p in tmp_path.iterdir()) == ["other_app.sqlite"]
    check = sqlite3.connect(f"file:{other}?mode=ro", uri=True)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    assert check.execute("PRAGMA user_version").fetchone()[0] == 0
    # A table called `rows` with no schema version is another program's too.
    lookalike = tmp_path / "rows.sqlite"
    sqlite3.connect(lookalike).execute("CREATE TABLE rows (x)")
    with pytest.raises(DistillError, match="not a distill leaderboard"):
        Leaderboard(lookalike)


def test_a_read_only_view_writes_nothing(tmp_path):
    db = v2_file(tmp_path / "old.sqlite")
    before = sha256(db)
    board = Leaderboard(db, readonly=True)
    rows = board.rows()
    assert [r["fid"] for r in rows] == [1.96, 2.26] and rows[0]["fid_lo"] is None  # new columns read as empty
    with pytest.raises(DistillError, match="read-only"):
        board.add(good_row())
    board.close()
    assert sha256(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.sqlite"]
    assert sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("PRAGMA user_version").fetchone()[0] == 2
    db.chmod(0o444)  # a file the viewer may not write can still be viewed
    try:
        assert len(Leaderboard(db, readonly=True).rows()) == 2
    finally:
        db.chmod(0o644)
    with pytest.raises(DistillError, match="no leaderboard at"):
        Leaderboard(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _hold(db, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_locked_leaderboard_says_by_whom_and_counts_down(tmp_path):
    db = tmp_path / "b.sqlite"
    Leaderboard(db).close()
    said = []
    holder = _hold(db, 30)
    try:
        start = time.monotonic()
        with pytest.raises(DistillError) as refused:
            Leaderboard(db, timeout=1.5, log=lambda msg, end="\n": said.append(msg)).add(good_row())
        assert 1.4 < time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    assert said and f"is locked by pid {holder.pid}" in said[0] and "waiting" in said[0] and " s more" in said[0]
    line = str(refused.value)
    assert f"still locked by pid {holder.pid}" in line and "nothing was written" in line and "move" not in line
    # A lock released while we wait: the row lands once it is free.
    said.clear()
    holder = _hold(db, 1.0)
    board = Leaderboard(db, timeout=30, log=lambda msg, end="\n": said.append(msg))
    board.add(good_row())
    holder.wait()
    assert len(board.rows()) == 1 and said and "locked by pid" in said[0]
