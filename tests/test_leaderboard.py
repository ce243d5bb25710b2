"""The SQLite leaderboard under concurrent writers, its migrations, and its reports."""
import sqlite3
import subprocess
import sys
import threading

import pytest

from distill import cli
from distill.errors import DistillError
from distill.leaderboard import SCHEMA_VERSION, Leaderboard

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
    assert out.index("3.25") < out.index("12.5") and "2 rows" in out
    page = (tmp_path / "out/leaderboard.html").read_text()
    assert page.count("<tr>") == 3 and "consistency" in page
    assert "| tiny-sdxl | teacher | - | 50 | 100 | 3.25 |" in (tmp_path / "out/leaderboard.md").read_text()
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert cli.main(["leaderboard", "--db", str(tmp_path / "none.sqlite")]) == 2
