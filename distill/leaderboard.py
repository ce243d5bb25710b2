"""The leaderboard: one SQLite row per evaluated model, safe under many concurrent writers.

SQLite in WAL mode gives each reader a consistent snapshot while writers append, and every insert
is one transaction, so no row is half-written or lost. The schema carries a version
(`PRAGMA user_version`); an older file is migrated forward in place, never dropped. A file that is
not ours (another program's tables) is refused before anything is written to it, and a read-only
view (`readonly=True`) never writes. Rows are checked before they are stored: nothing invalid lands. A row added
with a `key` (bench's done key) is added at most once: the look-up and the insert are one transaction, so a writer
killed after its insert, or two writers at once, never leave the row twice.
The tables, pages and plot are drawn by `distill.leaderboard_view` (re-exported here).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import sys
import time
from pathlib import Path

from distill.errors import DistillError
from distill.leaderboard_view import (  # noqa: F401  (the views, re-exported for the commands)
    INTERVALS, markdown, page, plot_quality_vs_nfe, table, write_reports)

# Each entry upgrades the file from version i to i + 1. Append, never edit: files in the wild hold old versions.
MIGRATIONS = [
    """CREATE TABLE rows (
        id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, teacher TEXT NOT NULL, method TEXT NOT NULL,
        student TEXT NOT NULL, steps INTEGER NOT NULL, nfe INTEGER, fid REAL, kid REAL, adherence REAL,
        ms_per_image REAL, train_steps INTEGER, train_seconds REAL, config_hash TEXT, git_commit TEXT)""",
    """ALTER TABLE rows ADD COLUMN fid_teacher REAL;
       ALTER TABLE rows ADD COLUMN kid_teacher REAL;
       ALTER TABLE rows ADD COLUMN clip_score REAL;
       ALTER TABLE rows ADD COLUMN peak_memory_mb REAL;
       ALTER TABLE rows ADD COLUMN extra TEXT""",
    # Intervals (95% bootstrap for FID, Wilson for adherence, std over subsets for KID), the training seed, and
    # the evaluation protocol (JSON) with the id of the table it belongs to.
    """ALTER TABLE rows ADD COLUMN fid_lo REAL;
       ALTER TABLE rows ADD COLUMN fid_hi REAL;
       ALTER TABLE rows ADD COLUMN kid_std REAL;
       ALTER TABLE rows ADD COLUMN fid_teacher_lo REAL;
       ALTER TABLE rows ADD COLUMN fid_teacher_hi REAL;
       ALTER TABLE rows ADD COLUMN kid_teacher_std REAL;
       ALTER TABLE rows ADD COLUMN adherence_lo REAL;
       ALTER TABLE rows ADD COLUMN adherence_hi REAL;
       ALTER TABLE rows ADD COLUMN seed INTEGER;
       ALTER TABLE rows ADD COLUMN protocol TEXT;
       ALTER TABLE rows ADD COLUMN protocol_id TEXT""",
    # Precision and recall (Kynkaanniemi et al. 2019) with Wilson intervals, within-prompt diversity with a bootstrap
    # interval over prompts, and CLIP score's 95% interval.
    """ALTER TABLE rows ADD COLUMN precision REAL;
       ALTER TABLE rows ADD COLUMN precision_lo REAL;
       ALTER TABLE rows ADD COLUMN precision_hi REAL;
       ALTER TABLE rows ADD COLUMN recall REAL;
       ALTER TABLE rows ADD COLUMN recall_lo REAL;
       ALTER TABLE rows ADD COLUMN recall_hi REAL;
       ALTER TABLE rows ADD COLUMN diversity REAL;
       ALTER TABLE rows ADD COLUMN diversity_lo REAL;
       ALTER TABLE rows ADD COLUMN diversity_hi REAL;
       ALTER TABLE rows ADD COLUMN clip_score_lo REAL;
       ALTER TABLE rows ADD COLUMN clip_score_hi REAL""",
]
SCHEMA_VERSION = len(MIGRATIONS)
OUR_TABLES = {"rows", "sqlite_sequence"}  # sqlite_sequence: SQLite's own, for AUTOINCREMENT
REQUIRED = ("teacher", "method", "student", "steps")
INTEGERS = {"steps": 1, "nfe": 1, "train_steps": 0}  # column -> least allowed value
FLOATS = ("fid", "kid", "fid_teacher", "kid_teacher", "adherence", "clip_score", "ms_per_image", "peak_memory_mb",
          "train_seconds", "fid_lo", "fid_hi", "kid_std", "fid_teacher_lo", "fid_teacher_hi", "kid_teacher_std",
          "adherence_lo", "adherence_hi", "precision", "precision_lo", "precision_hi", "recall", "recall_lo",
          "recall_hi", "diversity", "diversity_lo", "diversity_hi", "clip_score_lo", "clip_score_hi")
NON_NEGATIVE = ("fid", "fid_teacher", "fid_lo", "fid_teacher_lo", "kid_std", "kid_teacher_std", "peak_memory_mb",
                "train_seconds", "clip_score", "precision", "precision_lo", "precision_hi", "recall", "recall_lo",
                "recall_hi", "diversity", "diversity_lo", "diversity_hi", "clip_score_lo", "clip_score_hi")
# The fields of a protocol that must match for rows to be ranked together (by FID against the reference set). A
# row's guidance and sampler are also recorded in its protocol, but they are what sets a row apart (teacher DDIM
# with CFG against a one-pass student); the bootstrap's resample count only refines an interval; and the teacher
# reference (steps, guidance) concerns only the unranked "FID vs teacher samples" column.
# A real reference is named by the digest of its images' names and bytes, and every weights file (extractor, CLIP) by
# its sha256; the preprocessing and the drawn subset of prompts complete it.
PROTOCOL_KEY = ("samples", "prompts", "reference", "reference_size", "extractor", "extractor_weights", "resolution",
                "eval_seeds", "reference_digest", "preprocessing", "clip", "prompt_subset")
OPTIONAL_KEY = PROTOCOL_KEY[8:]  # added later: left out of the id when unset, so older tables keep their ids


# A row's idempotence key lives in its JSON `extra` (no schema change); a row whose `extra` is not valid JSON has none.
ROW_KEY = "row_key"
KEY_OF_ROW = f"CASE WHEN json_valid(extra) THEN json_extract(extra, '$.{ROW_KEY}') END"


def protocol_id(protocol: dict) -> str:
    """The id of a protocol's table: a hash of the fields rows must share to be ranked together."""
    key = {k: protocol.get(k) for k in PROTOCOL_KEY if k not in OPTIONAL_KEY or protocol.get(k) is not None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def _holders(path: Path) -> list[str]:
    """'pid N (command line)' of every other process that has the file (or its -wal/-shm) open, read from /proc:
    nothing is opened, so none of this process's own SQLite locks are disturbed."""
    names = {str(path.resolve()) + s for s in ("", "-wal", "-shm", "-journal")}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in names for fd in (proc / "fd").iterdir()):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(f"pid {proc.name} ({cmd[:80]})")
        except OSError:  # gone, or not ours to read
            continue
    return found


def _is_locked(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


class Leaderboard:
    """`timeout`: how long to wait for another process's lock, with a countdown on stderr. `readonly`: view an
    existing file without writing anything to it (no migration, no WAL switch), even when the file is read-only."""

    def __init__(self, path: str | Path, timeout: float = 60.0, target_version: int = SCHEMA_VERSION,
                 readonly: bool = False, log=None):
        self.path, self.timeout, self.readonly = Path(path), timeout, readonly
        self.log = log or (lambda msg, end="\n": print(msg, end=end, file=sys.stderr, flush=True))
        if readonly and not self.path.is_file():
            raise DistillError(f"no leaderboard at {self.path}; evaluations add rows to it (set --db to another file)")
        try:
            self._wait_if_locked(self._check_ours)
            if readonly:
                self.db = self._connect_readonly()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=min(timeout, 0.5), isolation_level=None)
                self._wait_if_locked(lambda: self.db.execute("PRAGMA journal_mode=WAL"))
                self._wait_if_locked(lambda: self._migrate(target_version))
        except sqlite3.DatabaseError as e:
            raise DistillError(f"leaderboard {self.path} cannot be used ({e}); it is left untouched: move it "
                               "aside or point --db at another file") from e

    def _connect_readonly(self) -> sqlite3.Connection:
        # With no -wal file every row is in the main file: read it as immutable, which creates no -wal/-shm files
        # and needs no write access. With one, a plain read-only connection sees the rows still in the WAL.
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal").exists()
        return sqlite3.connect(f"{uri}?mode=ro" if wal else f"{uri}?immutable=1", uri=True, isolation_level=None)

    def _check_ours(self) -> None:
        """Refuse, before writing a byte, a file with a newer schema or another program's tables."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        probe = self._connect_readonly()
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            probe.close()
        if version > SCHEMA_VERSION:
            raise DistillError(f"leaderboard {self.path} has schema {version}, newer than this distill "
                               f"({SCHEMA_VERSION}); upgrade distill")
        if tables - OUR_TABLES or (version == 0 and tables) or (version > 0 and "rows" not in tables):
            shown = ", ".join(sorted(tables)) or "none"
            raise DistillError(f"{self.path} is not a distill leaderboard (schema version {version}, tables: "
                               f"{shown}); it is left untouched: point --db at a leaderboard or a new file")

    def _wait_if_locked(self, fn):
        """Run fn, retrying while another process holds the lock: say who holds it and count down to `timeout`."""
        deadline, told = time.monotonic() + self.timeout, None
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_locked(e):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    if told is not None and sys.stderr.isatty():
                        self.log("")  # end the countdown's line
                    raise DistillError(f"leaderboard {self.path} is still locked by {self._who()} after "
                                       f"{self.timeout:.0f} s; nothing was written: run again once it has finished") \
                        from e
                # A countdown: in place on a terminal, a line every 10 s in a log.
                if told is None or told - left >= (1 if sys.stderr.isatty() else 10):
                    told = left
                    self.log(f"leaderboard {self.path} is locked by {self._who()}; waiting {left:.0f} s more ",
                             end="\r" if sys.stderr.isatty() else "\n")
                time.sleep(min(0.5, max(left, 0.01)))

    def _who(self) -> str:
        return ", ".join(_holders(self.path)[:3]) or "another process"

    def _migrate(self, target: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")  # one migrator at a time; the others wait, then see it done
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DistillError(f"leaderboard {self.path} has schema {version}, newer than this distill "
                                   f"({SCHEMA_VERSION}); upgrade distill")
            for v in range(version, target):
                for statement in MIGRATIONS[v].split(";"):
                    self.db.execute(statement)
            if target > version:
                self.db.execute(f"PRAGMA user_version = {target}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def columns(self) -> list[str]:
        return [r[1] for r in self.db.execute("PRAGMA table_info(rows)")]

    def protocols(self) -> dict[str, dict]:
        """protocol_id -> protocol of every table in the file (rows without a recorded protocol are not one)."""
        if "protocol_id" not in self.columns():
            return {}
        found = self._wait_if_locked(lambda: self.db.execute(
            "SELECT protocol_id, protocol, MAX(id) AS last FROM rows WHERE protocol_id IS NOT NULL "
            "GROUP BY protocol_id ORDER BY last").fetchall())
        return {pid: json.loads(text) for pid, text, _ in found}  # oldest table first

    def check_protocol(self, protocol: dict, new_table: bool = False) -> None:
        """Refuse, in one line, a row whose protocol differs from every table in the file, unless `new_table`."""
        tables = self.protocols()
        if new_table or not tables or protocol_id(protocol) in tables:
            return
        latest = list(tables.values())[-1]
        diff = "; ".join(f"{k} {latest.get(k)!r} -> {protocol.get(k)!r}" for k in PROTOCOL_KEY
                         if latest.get(k) != protocol.get(k))
        raise DistillError(f"leaderboard {self.path} ranks rows under another protocol ({diff}); rows are only "
                           "ranked against the same protocol: use the same settings, or start a new table "
                           "(--new-table)")

    def add(self, row: dict, new_table: bool = False, key: str | None = None) -> int:
        """Store a checked row; its id. With `key` (kept in the row as `row_key`), a row already stored under that
        key is kept and its id returned instead: adding is idempotent."""
        if self.readonly:
            raise DistillError(f"leaderboard {self.path} was opened read-only")
        if key is not None:
            if not isinstance(key, str) or not key:
                raise _refuse(f"a row key must be a non-empty string (got {key!r})")
            row = {**row, ROW_KEY: key}
        row = validate(row)
        if row.get("protocol") is not None:
            protocol = row["protocol"] if isinstance(row["protocol"], dict) else json.loads(row["protocol"])
            self.check_protocol(protocol, new_table)
            row = {**row, "protocol": json.dumps(protocol, sort_keys=True), "protocol_id": protocol_id(protocol)}
        known = set(self.columns())
        extra = {k: v for k, v in row.items() if k not in known}
        values = {k: v for k, v in row.items() if k in known and k != "id"}
        values.setdefault("created", time.time())
        if extra and "extra" not in known:
            raise DistillError(f"leaderboard {self.path} has no columns {', '.join(extra)}")
        if extra:
            values["extra"] = json.dumps({**json.loads(values.get("extra") or "{}"), **extra}, sort_keys=True,
                                         allow_nan=False)
        insert = f"INSERT INTO rows ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})"
        if key is None:
            return self._wait_if_locked(lambda: self.db.execute(insert, list(values.values()))).lastrowid
        return self._wait_if_locked(lambda: self._insert_once(key, insert, list(values.values())))

    def _insert_once(self, key: str, insert: str, values: list) -> int:
        self.db.execute("BEGIN IMMEDIATE")  # the look-up and the insert under one write lock
        try:
            found = self.db.execute(f"SELECT id FROM rows WHERE {KEY_OF_ROW} = ? ORDER BY id LIMIT 1",
                                    (key,)).fetchone()
            row_id = found[0] if found else self.db.execute(insert, values).lastrowid
            self.db.execute("COMMIT")
            return row_id
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def keys(self) -> set[str]:
        """The keys of every row added with one (see `add`)."""
        if "extra" not in self.columns():
            return set()
        found = self._wait_if_locked(lambda: self.db.execute(
            f"SELECT DISTINCT {KEY_OF_ROW} FROM rows WHERE {KEY_OF_ROW} IS NOT NULL").fetchall())
        return {k for (k,) in found if isinstance(k, str)}

    def rows(self, sort: str = "fid") -> list[dict]:
        """Every row as a dict with every column of the current schema (None where an older file lacks one)."""
        if sort not in self.columns():
            raise DistillError(f"cannot sort by '{sort}'; columns: {', '.join(self.columns())}")
        cur = self._wait_if_locked(lambda: self.db.execute(f"SELECT * FROM rows ORDER BY {sort} IS NULL, {sort}, id"))
        names = [d[0] for d in cur.description]
        blank = dict.fromkeys(ALL_COLUMNS)
        return [{**blank, **dict(zip(names, r))} for r in cur.fetchall()]

    def close(self) -> None:
        self.db.close()


ALL_COLUMNS = ("id", "created", "teacher", "method", "student", "steps", "nfe", *FLOATS, "train_steps",
               "config_hash", "git_commit", "extra", "seed", "protocol", "protocol_id")


def _refuse(why: str) -> DistillError:
    return DistillError(f"leaderboard row refused: {why}; nothing was written")


def validate(row: dict) -> dict:
    """The row if every field is sound (one-line DistillError otherwise): names present, steps and NFE >= 1,
    metrics finite and in range, each interval around its value."""
    missing = [k for k in REQUIRED if row.get(k) is None or row.get(k) == ""]
    if missing:
        raise _refuse(f"a leaderboard row needs {', '.join(missing)}")
    for k, least in INTEGERS.items():
        v = row.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise _refuse(f"{k} must be an integer >= {least} (got {v!r})")
    if row.get("seed") is not None and (isinstance(row["seed"], bool) or not isinstance(row["seed"], int)):
        raise _refuse(f"seed must be an integer (got {row['seed']!r})")
    for k, v in row.items():  # extra fields too: JSON has no NaN
        if isinstance(v, float) and not math.isfinite(v):
            raise _refuse(f"{k} must be a finite number (got {v!r})")
    for k in FLOATS:
        v = row.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _refuse(f"{k} must be a finite number (got {v!r})")
        if k in NON_NEGATIVE and v < -1e-6:
            raise _refuse(f"{k} cannot be negative (got {v!r})")
    if row.get("ms_per_image") is not None and row["ms_per_image"] <= 0:
        raise _refuse(f"ms_per_image must be > 0 (got {row['ms_per_image']!r})")
    for k in ("adherence", "adherence_lo", "adherence_hi"):
        if row.get(k) is not None and not 0 <= row[k] <= 1:
            raise _refuse(f"{k} must lie in [0, 1] (got {row[k]!r})")
    for k, (lo, hi) in INTERVALS.items():
        v, a, b = row.get(k), row.get(lo), row.get(hi)
        if (a is None) != (b is None) or (a is not None and (v is None or not a - 1e-9 <= v <= b + 1e-9)):
            raise _refuse(f"{lo}..{hi} must both be given and contain {k} (got {a!r}..{b!r} around {v!r})")
    return row


__all__ = ["Leaderboard", "validate", "protocol_id", "table", "markdown", "page", "plot_quality_vs_nfe",
           "write_reports", "SCHEMA_VERSION", "MIGRATIONS"]
