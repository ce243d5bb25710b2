"""The leaderboard: one SQLite row per evaluated model, safe under many concurrent writers.

SQLite in WAL mode gives each reader a consistent snapshot while writers append, and every insert
is one transaction, so no row is half-written or lost. The schema carries a version
(`PRAGMA user_version`); an older file is migrated forward in place, never dropped. Reports
(Markdown, HTML) are written to a temporary file and renamed into place.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import sqlite3
import time
from pathlib import Path

from distill.errors import DistillError

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
]
SCHEMA_VERSION = len(MIGRATIONS)
REQUIRED = ("teacher", "method", "student", "steps")
SHOWN = ("teacher", "method", "student", "steps", "nfe", "fid", "kid", "fid_teacher", "adherence", "ms_per_image",
         "train_steps", "config_hash")


class Leaderboard:
    def __init__(self, path: str | Path, timeout: float = 60.0, target_version: int = SCHEMA_VERSION):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self._migrate(target_version)
        except sqlite3.DatabaseError as e:
            raise DistillError(f"leaderboard {self.path} cannot be used ({e}); it is left untouched: move it "
                               "aside or point --db at another file") from e

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
            self.db.execute(f"PRAGMA user_version = {max(version, target)}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def columns(self) -> list[str]:
        return [r[1] for r in self.db.execute("PRAGMA table_info(rows)")]

    def add(self, row: dict) -> int:
        missing = [k for k in REQUIRED if row.get(k) is None]
        if missing:
            raise DistillError(f"a leaderboard row needs {', '.join(missing)}")
        known = set(self.columns())
        extra = {k: v for k, v in row.items() if k not in known}
        values = {k: v for k, v in row.items() if k in known and k != "id"}
        values.setdefault("created", time.time())
        if extra and "extra" not in known:
            raise DistillError(f"leaderboard {self.path} has no columns {', '.join(extra)}")
        if extra:
            values["extra"] = json.dumps({**json.loads(values.get("extra") or "{}"), **extra}, sort_keys=True)
        names = ", ".join(values)
        cur = self.db.execute(f"INSERT INTO rows ({names}) VALUES ({', '.join('?' * len(values))})",
                              list(values.values()))
        return cur.lastrowid

    def rows(self, sort: str = "fid") -> list[dict]:
        if sort not in self.columns():
            raise DistillError(f"cannot sort by '{sort}'; columns: {', '.join(self.columns())}")
        cur = self.db.execute(f"SELECT * FROM rows ORDER BY {sort} IS NULL, {sort}, id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.db.close()


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    cells = [list(SHOWN)] + [[_fmt(r.get(c)) for c in SHOWN] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(SHOWN))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(SHOWN) + " |\n|" + "---|" * len(SHOWN) + "\n"
    return "# Leaderboard\n\n" + head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in SHOWN) + " |\n"
                                                 for r in rows)


def _extra(row: dict) -> dict:
    return json.loads(row.get("extra") or "{}")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def plot_quality_vs_nfe(rows: list[dict]) -> bytes | None:
    """PNG of FID against NFE (log x axis), one line per (teacher, method, student kind), one panel per teacher:
    the Pareto view of cost against quality. None when no row has both."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in rows if r.get("fid") is not None and r.get("nfe")]
    if not rows:
        return None
    teachers = sorted({r["teacher"] for r in rows})
    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4.5), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        lines: dict[str, list] = {}
        for r in rows:
            if r["teacher"] == teacher:
                label = "teacher (DDIM)" if r["method"] == "teacher" else f"{r['method']} ({r['student']})"
                lines.setdefault(label, []).append((r["nfe"], r["fid"]))
        for label, points in sorted(lines.items()):
            best = {}
            for n, fid in points:  # the best row at each NFE
                best[n] = min(fid, best.get(n, fid))
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], "--o" if label.startswith("teacher") else "-o", label=label)
        ax.set(xscale="log", xlabel="NFE per image (CFG counted)", ylabel="FID (lower is better)",
               title=teacher)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def page(rows: list[dict], plot: bytes | None = None) -> str:
    """A static, self-contained HTML page: the table, the quality-versus-NFE plot, and sample grids."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SHOWN)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in SHOWN) + "</tr>\n"
                   for r in rows)
    figure = f"<h2>Quality against cost</h2><img alt='FID against NFE' src='{_data_uri(plot)}'>" if plot else ""
    grids = []
    for r in rows:
        grid = _extra(r).get("grid")
        if grid and Path(grid).is_file():
            title = html.escape(f"{r['teacher']} · {r['method']} ({r['student']}) · {r['steps']} steps · FID "
                                f"{_fmt(r.get('fid'))}")
            grids.append(f"<figure><img alt='{title}' src='{_data_uri(Path(grid).read_bytes())}' "
                         f"style='image-rendering:pixelated;width:480px'><figcaption>{title}</figcaption></figure>")
    samples = "<h2>Samples (first seed of each prompt)</h2>" + "".join(grids) if grids else ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>distill leaderboard</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style></head><body>"
            f"<h1>distill leaderboard</h1><table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"
            f"{figure}{samples}</body></html>\n")


def write_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_reports(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """leaderboard.md, leaderboard.html and, when there is something to plot, quality_vs_nfe.png."""
    out = Path(out)
    plot = plot_quality_vs_nfe(rows)
    if plot:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".quality_vs_nfe.{os.getpid()}.tmp"
        tmp.write_bytes(plot)
        os.replace(tmp, out / "quality_vs_nfe.png")
    return write_atomic(out / "leaderboard.md", markdown(rows)), write_atomic(out / "leaderboard.html",
                                                                             page(rows, plot))
