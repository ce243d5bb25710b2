"""What people read: the leaderboard's rows arranged into tables, verdicts, and the terminal, Markdown and HTML views.

Arrangement: one table per evaluation protocol (rows are ranked only against rows measured the same way), one group
per teacher inside it, the teacher's 50-step row on top, then by NFE and FID. Rows of one recipe over several
training seeds are summarised as mean ± sd with n, their per-seed rows listed beneath. A row is "better" or "worse"
than a reference only when their 95% intervals do not overlap; otherwise it is a "tie".

Row fields are data, never markup: the Markdown escapes HTML and Markdown syntax, the HTML page escapes every field,
and the page embeds a row's sample grid only when it is a PNG that distill wrote under one of the folders the caller
names (`grid_roots`; see `grid_png`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from distill.paths import write_atomic

REFERENCE_STEPS = 50  # the teacher row every other row is compared with
METRICS = ("fid", "kid", "fid_teacher", "kid_teacher", "adherence", "ms_per_image", "peak_memory_mb", "clip_score",
           "speedup", "adherence_held_out")
INTERVALS = {"fid": ("fid_lo", "fid_hi"), "fid_teacher": ("fid_teacher_lo", "fid_teacher_hi"),
             "adherence": ("adherence_lo", "adherence_hi"),
             "adherence_held_out": ("adherence_held_out_lo", "adherence_held_out_hi")}
SPREADS = {"kid": "kid_std", "kid_teacher": "kid_teacher_std"}  # shown as ± but not an interval


@dataclass
class Line:
    """One displayed line: a row, or the mean over a recipe's training seeds (`seeds` holds their rows)."""

    row: dict
    seeds: list[dict] = field(default_factory=list)
    reference: bool = False  # this teacher's 50-step row
    best: bool = False  # best FID at its NFE within its teacher group

    @property
    def n(self) -> int:
        return len(self.seeds) or 1


@dataclass
class Group:
    teacher: str
    lines: list[Line]

    @property
    def reference(self) -> dict | None:
        return self.lines[0].row if self.lines and self.lines[0].reference else None


@dataclass
class Table:
    protocol_id: str | None
    protocol: dict | None
    groups: list[Group]

    @property
    def held_out(self) -> bool:
        """Whether rows scored prompts no teacher trained on (the digit-pairs world), shown in one more column."""
        return any(ln.row.get("adherence_held_out") is not None for g in self.groups for ln in g.lines)

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS + ((HELD_OUT,) if self.held_out else ())


def _json(text, kind: type):
    """`text` parsed as JSON when it holds a `kind`, else None: a file from elsewhere may hold anything."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    return value if isinstance(value, kind) else None


def flat(row: dict) -> dict:
    """A stored row with its JSON `extra` merged in (columns win) and its protocol parsed."""
    extra = _json(row.get("extra") or "{}", dict) or {}
    out = {**extra, **{k: v for k, v in row.items() if v is not None or k not in extra}}
    if out.get("protocol") is not None:
        out["protocol"] = _json(out["protocol"], dict)
    return out


def _t975(dof: int) -> float:
    """The 97.5% quantile of Student's t (Student 1908), for the interval of a mean over a few seeds."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def _mean_row(rows: list[dict]) -> dict:
    """Mean ± sd over training seeds. The interval a verdict uses is the t-interval of the mean (the seed-to-seed
    spread), widened where needed to the rows' own sampling interval, their mean lower and upper halves: the rows
    share prompts, evaluation seeds and reference set, so that noise does not average out over seeds. Seeds that
    agree exactly (three at 100% adherence) have sd 0, yet their mean is not known to be above a teacher whose
    interval also reaches 100%."""
    out = dict(rows[0], seed=None, id=None)
    for k in METRICS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
        sd = math.sqrt(sum((v - out[k]) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        out[f"{k}_sd"] = sd
        if k in INTERVALS:
            lo, hi = INTERVALS[k]
            out[lo], out[hi] = None, None
            if sd is not None:
                half = _t975(len(vals) - 1) * sd / math.sqrt(len(vals))
                out[lo], out[hi] = out[k] - half, out[k] + half
                if all(r.get(lo) is not None and r.get(hi) is not None for r in rows):
                    out[lo] = min(out[lo], out[k] - sum(r[k] - r[lo] for r in rows) / len(rows))
                    out[hi] = max(out[hi], out[k] + sum(r[hi] - r[k] for r in rows) / len(rows))
                out[lo] = max(0.0, out[lo])
                if k.startswith("adherence"):
                    out[hi] = min(1.0, out[hi])
    return out


def _recipe(row: dict):
    """Rows that differ only in their training seed share this key (bench writes `seedless_hash`, the recipe's hash
    with the seed left out)."""
    if row.get("seed") is None:
        return ("row", row.get("id"), id(row))
    return (row.get("seedless_hash") or row.get("recipe"), row["teacher"], row["method"], row["student"],
            row["steps"], row.get("guidance"))


def _lines(rows: list[dict]) -> list[Line]:
    by_recipe: dict = {}
    for r in rows:
        by_recipe.setdefault(_recipe(r), []).append(r)
    out = []
    for members in by_recipe.values():
        if len(members) == 1:
            out.append(Line(members[0]))
        else:
            members.sort(key=lambda r: (r.get("seed") is None, r.get("seed"), r.get("id") or 0))
            out.append(Line(_mean_row(members), seeds=members))
    return out


def _order(lines: list[Line]) -> list[Line]:
    """The teacher's 50-step row first (the reference of the Δ and speed-up columns; none without one), then by
    NFE, then FID; the best FID among the rows at each NFE is marked."""
    teachers = [ln for ln in lines if ln.row["method"] == "teacher" and ln.row["steps"] == REFERENCE_STEPS]
    if teachers:
        min(teachers, key=lambda ln: _num(ln.row.get("fid"))).reference = True
    rest = sorted((ln for ln in lines if not ln.reference),
                  key=lambda ln: (_num(ln.row.get("nfe")), _num(ln.row.get("fid")), ln.row["method"]))
    ordered = [ln for ln in lines if ln.reference] + rest
    at_nfe: dict = {}
    for ln in ordered:
        if ln.row.get("fid") is not None:
            at_nfe.setdefault(ln.row.get("nfe"), []).append(ln)
    for rivals in at_nfe.values():
        if len(rivals) > 1:  # a row alone at its NFE is not "best" of anything
            min(rivals, key=lambda ln: ln.row["fid"]).best = True
    return ordered


def _num(v) -> float:
    return math.inf if v is None else v


def arrange(rows: list[dict]) -> list[Table]:
    """Tables (the newest protocol first, rows with no recorded protocol last), teacher groups in each."""
    rows = [flat(r) for r in rows]
    by_protocol: dict = {}
    for r in sorted(rows, key=lambda r: -(r.get("id") or 0)):
        by_protocol.setdefault(r.get("protocol_id"), []).append(r)
    keys = [k for k in by_protocol if k is not None] + ([None] if None in by_protocol else [])
    tables = []
    for key in keys:
        members = sorted(by_protocol[key], key=lambda r: r.get("id") or 0)
        teachers = list(dict.fromkeys(r["teacher"] for r in members))
        groups = [Group(t, _order(_lines([r for r in members if r["teacher"] == t]))) for t in teachers]
        tables.append(Table(key, members[-1].get("protocol") if key else None, groups))
    return tables


# ---- verdicts -------------------------------------------------------------------------------------------------

def interval(row: dict, metric: str) -> tuple[float, float] | None:
    lo, hi = INTERVALS[metric]
    if row.get(metric) is None or row.get(lo) is None or row.get(hi) is None:
        return None
    return row[lo], row[hi]


def verdict(row: dict, reference: dict | None, metric: str = "fid", lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the two 95% intervals separate, 'tie' when they overlap, '-' without intervals."""
    if reference is None or row is reference:
        return "-"
    a, b = interval(row, metric), interval(reference, metric)
    if a is None or b is None:
        return "-"
    if a[1] < b[0]:
        return "better" if lower_is_better else "worse"
    if a[0] > b[1]:
        return "worse" if lower_is_better else "better"
    return "tie"


def _same_steps_teacher(group: Group, row: dict) -> dict | None:
    for ln in group.lines:
        if ln.row["method"] == "teacher" and ln.row["steps"] == row["steps"]:
            return ln.row
    return None


# ---- cells ----------------------------------------------------------------------------------------------------

REFERENCE = f"teacher@{REFERENCE_STEPS}"
COLUMNS = ("method", "student", "steps", "NFE ↓", "seeds", "FID ↓", f"ΔFID vs {REFERENCE}",
           "vs teacher, same steps", "KID ↓", "FID vs teacher samples ↓", "adherence ↑ (%)", "ms / image ↓",
           f"speed-up vs {REFERENCE}", "train steps")
HELD_OUT = "held-out pairs ↑ (%)"
DECIMALS = {"fid": 2, "fid_teacher": 2, "kid": 4, "kid_teacher": 4, "adherence": 1, "adherence_held_out": 1,
            "ms_per_image": 1}


def _fixed(v: float | None, decimals: int) -> str:
    if v is None:
        return "-"
    v = round(v, decimals)
    return f"{(v if v != 0 else 0.0):.{decimals}f}"  # never "-0.00", never "-6.1e-13"


def _plus_minus(row: dict, metric: str, aggregated: bool) -> str:
    """'1.96 ± 0.12': over seeds the sd; for one row the interval's larger half (or KID's std over subsets)."""
    scale = 100 if metric.startswith("adherence") else 1
    d = DECIMALS[metric]
    v = row.get(metric)
    if v is None:
        return "-"
    if aggregated:
        spread = row.get(f"{metric}_sd")
    elif metric in SPREADS:
        spread = row.get(SPREADS[metric])
    else:
        iv = interval(row, metric) if metric in INTERVALS else None
        spread = max(v - iv[0], iv[1] - v) if iv else None
    text = _fixed(v * scale, d)
    return text if spread is None else f"{text} ± {_fixed(spread * scale, d)}"


def cells(line: Line, group: Group, seed_row: dict | None = None, held_out: bool = False) -> list[str]:
    """The COLUMNS of one line (or, with `seed_row`, of one of its per-seed rows), and with `held_out` the both-
    digits adherence on held-out pairs with its verdict against teacher@50."""
    r, agg = (seed_row, False) if seed_row is not None else (line.row, bool(line.seeds))
    ref = group.reference
    teacher = r["method"] == "teacher"
    if seed_row is not None:
        method, seeds = f"└ seed {r.get('seed')}", ""
    else:
        method = ("★ teacher" if teacher else r["method"]) + (" (reference)" if line.reference else "")
        seeds = f"n={line.n}" if agg else ("-" if r.get("seed") is None else str(r["seed"]))
    delta, same = "-", "-"
    if ref is not None and r.get("fid") is not None and ref.get("fid") is not None and not line.reference:
        word = verdict(r, ref)
        delta = f"{r['fid'] - ref['fid']:+.2f}" + ("" if word == "-" else f" ({word})")
    if not teacher:
        same = verdict(r, _same_steps_teacher(group, r))
    speedup = "-"
    timed_with_ref = r.get("speedup_reference_steps") == REFERENCE_STEPS  # timed beside the reference in one run
    if isinstance(r.get("speedup"), (int, float)) and r["speedup"] and timed_with_ref:
        speedup = f"{r['speedup']:.1f}×"
    elif ref is not None and r.get("ms_per_image") and ref.get("ms_per_image"):
        speedup = f"{ref['ms_per_image'] / r['ms_per_image']:.1f}×"
    out = [method, "-" if teacher else str(r.get("student") or "-"), str(r["steps"]), str(r.get("nfe") or "-"),
           seeds, _plus_minus(r, "fid", agg), delta, same, _plus_minus(r, "kid", agg),
           _plus_minus(r, "fid_teacher", agg), _plus_minus(r, "adherence", agg), _plus_minus(r, "ms_per_image", agg)
           if agg else _fixed(r.get("ms_per_image"), 1), speedup, str(r.get("train_steps") or 0)]
    if held_out:
        word = "-" if line.reference else verdict(r, ref, "adherence_held_out", lower_is_better=False)
        out.append(_plus_minus(r, "adherence_held_out", agg) + ("" if word == "-" else f" ({word})"))
    return out


def describe(table: Table) -> list[str]:
    """The table's note, one point a line: what FID is measured against and with how many samples, what ± means,
    how verdicts are reached, and where timings come from."""
    p = table.protocol
    if p is None:
        return ["Rows without a recorded protocol (from an older distill, or timing-only rows from "
                "`distill bench-speed`): their sample sizes and references are unknown, so they are ranked against "
                "no other table and carry no intervals or verdicts."]
    notes = [f"Measured on {_thousands(p.get('samples'))} generated samples per row ({p.get('num_prompts')} prompts, "
             f"evaluation seeds {p.get('eval_seeds')}, {p.get('resolution')} px) against "
             f"{_thousands(p.get('reference_size'))} real images of `{p.get('reference')}`, with "
             f"`{p.get('extractor')}` features."]
    refs = {(_hashable(r["protocol"].get("teacher_reference_steps")),
             _hashable(r["protocol"].get("teacher_reference_guidance")))
            for g in table.groups for ln in g.lines for r in [ln.row]
            if r.get("fid_teacher") is not None and isinstance(r.get("protocol"), dict)}
    if len(refs) == 1:
        (steps, guidance), = refs
        notes.append(f"FID vs teacher samples: against the teacher's own {steps}-step samples (guidance {guidance}) "
                     "of the same prompts and seeds.")
    elif refs:
        notes.append("FID vs teacher samples: against the teacher's own samples at the steps and guidance in each "
                     "row's protocol record, of the same prompts and seeds.")
    notes += [f"±: FID, the half-width of its 95% bootstrap interval ({p.get('bootstrap')} resamples); KID, its std "
              "over subsets; adherence (share the digits classifier reads as the prompted digit), its 95% Wilson "
              "interval. A recipe over several training seeds: mean ± sd with n, its per-seed rows beneath.",
              *(["Pairs of digits: adherence is the share with both digits read as prompted (each half by the "
                 "digits classifier); held-out pairs, the same on the 20 pairs no teacher trained on, with its "
                 f"verdict against {REFERENCE}."] if table.held_out else []),
              f"Verdicts (vs {REFERENCE}, vs the teacher at the same steps): better or worse only when the 95% "
              "intervals separate, otherwise tie.",
              _timing_note(table)]
    return notes


def _thousands(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _hashable(v):
    return v if isinstance(v, (int, float, str, type(None))) else json.dumps(v)


def _timing_note(table: Table) -> str:
    """Where the ms/image figures come from, naming the teacher steps they were timed against as the rows record
    them (`speedup_reference_steps`), and how the speed-up column against the reference row is reached."""
    timed = [r for g in table.groups for ln in g.lines for r in (ln.seeds or [ln.row]) if r.get("device")]
    where = {tuple(_hashable(r.get(k)) for k in ("device", "threads", "timing_repeats", "timing_batch"))
             for r in timed}
    against = {_hashable(r.get("speedup_reference_steps")) for r in timed}
    if against == {REFERENCE_STEPS}:
        speedup = f"speed-up vs {REFERENCE} is the ratio measured in that same run."
    elif REFERENCE_STEPS in against:
        speedup = (f"speed-up vs {REFERENCE}: the ratio measured in the same run for rows timed against it, else the "
                   f"{REFERENCE} row's ms over the row's.")
    else:
        speedup = f"speed-up vs {REFERENCE}: the {REFERENCE} row's ms over the row's."
    if not any(g.reference for g in table.groups):
        speedup = f"no {REFERENCE} row in this table, so no ΔFID or speed-up against it."
    if len(against) == 1 and None not in against:
        teacher = f"the teacher's {next(iter(against))}-step sampling"
    elif None in against:
        teacher = "the teacher's sampling (at steps that some rows do not record)"
    else:
        teacher = "the teacher's sampling at the steps each row records (speedup_reference_steps)"
    if len(where) == 1:
        (device, threads, repeats, batch), = where
        return (f"ms / image: end to end (prompt encoding to pixels), the median of {repeats} timings of a batch of "
                f"{batch} on {device} ({threads} threads), interleaved with {teacher} in the same process; "
                f"{speedup}")
    if where:
        return (f"ms / image: end to end, timed interleaved with {teacher}; each row's device, threads and repeats "
                f"are stored with it; {speedup}")
    return ("ms / image: end to end (prompt encoding to pixels), as timed by the evaluation that made the row on its "
            f"machine; {speedup}")


# ---- terminal and Markdown ------------------------------------------------------------------------------------

def _rows_of(group: Group, held_out: bool):
    """(kind, cells) per displayed line: 'ref', 'teacher', 'row' or 'seed'; best FID cells are flagged."""
    for ln in group.lines:
        kind = "ref" if ln.reference else ("teacher" if ln.row["method"] == "teacher" else "row")
        yield kind, cells(ln, group, held_out=held_out), ln.best
        for s in ln.seeds:
            yield "seed", cells(ln, group, s, held_out), False


# Row fields are data from a file that may come from anyone: no view lets them act as markup or terminal control.
_BREAKS = re.compile(r"[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # C0/C1 controls, bidi overrides
_MD_SYNTAX = re.compile(r"([\\`*_\[\]|~])")  # emphasis, code, links and images, table cells, strike-through


def _plain(text) -> str:
    """One line of printable text: line breaks become spaces, other control characters (terminal escapes, bidi
    overrides) U+FFFD."""
    return _CONTROL.sub("\ufffd", _BREAKS.sub(" ", str(text)))


def _md(text) -> str:
    """Text for a Markdown page, shown as written: HTML's & < > as entities, Markdown's syntax characters (the
    table's | included) backslash-escaped, on one line."""
    text = _plain(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SYNTAX.sub(r"\\\1", text)


def _h(text) -> str:
    """Text for the HTML page, in element content or a quoted attribute."""
    return html.escape(_plain(text), quote=True)


def table(rows: list[dict]) -> str:
    """The terminal view: one block per protocol, a header line per teacher, best FID at each NFE starred."""
    out = []
    for t in arrange(rows):
        body = [list(t.columns)]
        marks = []
        for g in t.groups:
            body.append([f"[{_plain(g.teacher)}]"] + [""] * (len(t.columns) - 1))
            marks.append(False)
            for _, c, best in _rows_of(g, t.held_out):
                c = [_plain(x) for x in c]
                body.append(c[:5] + [c[5] + (" *" if best else "")] + c[6:])
                marks.append(best)
        widths = [max(len(row[i]) for row in body) for i in range(len(t.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
        title = f"protocol {_plain(t.protocol_id)}" if t.protocol_id else "rows without a recorded protocol"
        out += [f"== {title} ==", _plain(describe(t)[0]), lines[0], "  ".join("-" * w for w in widths), *lines[1:],
                "* best FID at its NFE in its teacher group", ""]
    return "\n".join(out).rstrip()


def markdown(rows: list[dict]) -> str:
    out = ["# Leaderboard", ""]
    for t in arrange(rows):
        title = f"Protocol {t.protocol_id}" if t.protocol_id else "Rows without a recorded protocol"
        out += [f"## {_md(title)}", "", *(f"- {_md(n)}" for n in describe(t)), "",
                "| " + " | ".join(_md(c) for c in t.columns) + " |", "|" + "---|" * len(t.columns)]
        for g in t.groups:
            out.append(f"| **{_md(g.teacher)}** |" + " |" * (len(t.columns) - 1))
            for kind, c, best in _rows_of(g, t.held_out):
                c = [_md(x) for x in c]
                if best:
                    c[5] = f"**{c[5]}**"
                if kind == "ref":
                    c[0] = f"**{c[0]}**"
                out.append("| " + " | ".join(c) + " |")
        out.append("")
    return "\n".join(out)


# ---- the plot -------------------------------------------------------------------------------------------------

def _series(group: Group) -> dict[str, list[dict]]:
    """label -> the best line at each NFE, per (method, student kind)."""
    series: dict[str, dict] = {}
    for ln in group.lines:
        r = ln.row
        if not r.get("nfe"):
            continue
        label = "teacher (DDIM)" if r["method"] == "teacher" else _mpl(f"{r['method']} ({r['student']})")
        at = series.setdefault(label, {})
        if r["nfe"] not in at or _num(r.get("fid")) < _num(at[r["nfe"]].get("fid")):
            at[r["nfe"]] = r
    return {k: [v[n] for n in sorted(v)] for k, v in sorted(series.items(), key=lambda kv: kv[0] != "teacher (DDIM)")}


def _mpl(text) -> str:
    """A row field as a plot label: matplotlib would read $...$ as mathematics (and fail on a bad formula)."""
    return _plain(text).replace("$", r"\$")


def _bars(points: list[dict], metric: str, scale: float = 1.0):
    ys = [p[metric] * scale for p in points]
    lo = [(p[metric] - (interval(p, metric) or (p[metric],))[0]) * scale for p in points]
    hi = [((interval(p, metric) or (0, p[metric]))[1] - p[metric]) * scale for p in points]
    return ys, [lo, hi]


def _fid_limit(groups_points: list[float]) -> float | None:
    """A top for the FID axis that one far-off point (the 1-step teacher) does not flatten: 1.25x the largest
    value within 3x the median; points above it are drawn on the edge with their value written."""
    vals = sorted(groups_points)
    if len(vals) < 3:
        return None
    median = vals[len(vals) // 2]
    inside = [v for v in vals if v <= 3 * median]
    return 1.25 * max(inside) if len(inside) < len(vals) else None


def plot_quality_vs_nfe(rows: list[dict], table_: Table | None = None) -> bytes | None:
    """PNG: FID (top) and adherence (bottom) against NFE, one panel per teacher in the table's order, one line per
    (method, student kind), teachers dashed, 95% interval bars. None when nothing has both FID and NFE."""
    import matplotlib
    import matplotlib.lines

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t = table_ or (arrange(rows)[0] if rows else None)
    groups = [g for g in (t.groups if t else []) if any(ln.row.get("fid") is not None and ln.row.get("nfe")
                                                        for ln in g.lines)]
    if not groups:
        return None
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7.8), squeeze=False, sharex="col")
    labels = sorted({label for g in groups for label in _series(g)}, key=lambda k: (k != "teacher (DDIM)", k))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per method in every panel
    for col, g in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        series = _series(g)
        fids = [p["fid"] for pts in series.values() for p in pts if p.get("fid") is not None]
        limit = _fid_limit(fids)
        for label, points in series.items():
            style = dict(fmt="--o" if label.startswith("teacher") else "-o", capsize=3, label=label, ms=4,
                         color=colours[label])
            pts = [p for p in points if p.get("fid") is not None]
            if pts:
                ys, err = _bars(pts, "fid")
                shown = [min(y, limit) if limit else y for y in ys]
                top.errorbar([p["nfe"] for p in pts], shown, yerr=err, **style)
                for p, y in zip(pts, ys):
                    if limit and y > limit:  # off the scale: drawn on the top edge, its value written beside it
                        top.annotate(f"{y:.2f} ↑", (p["nfe"], limit), textcoords="offset points", xytext=(6, -12),
                                     fontsize=8, color=colours[label])
            pts = [p for p in points if p.get("adherence") is not None]
            if pts:
                ys, err = _bars(pts, "adherence", 100)
                bottom.errorbar([p["nfe"] for p in pts], ys, yerr=err, **style)
        top.set_ylim(0, limit)  # FID from 0, so gaps read as proportions; limit None: matplotlib's own top
        top.set(xscale="log", ylabel="FID ↓ (95% bootstrap interval)", title=_mpl(g.teacher))
        bottom.set(xscale="log", xlabel="NFE per image ↓ (a CFG step counts two)",
                   ylabel="adherence ↑ (%, 95% Wilson interval)")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
    handles = [matplotlib.lines.Line2D([], [], color=colours[k], ls="--" if k.startswith("teacher") else "-",
                                       marker="o", ms=4) for k in labels]
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---- the HTML page --------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 1em 2em;
line-height:1.45;color:#1b1f24}
img{max-width:100%;height:auto}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:0.5em 0 1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:14px}
th,td{padding:4px 9px;text-align:right;white-space:nowrap;border-bottom:1px solid #e3e6ea}
th{background:#f0f2f5;position:sticky;top:0}
th:first-child,td:first-child,td.l{text-align:left}
tbody tr:nth-child(even){background:#f8f9fb}
tr.group th{background:#2f3b4c;color:#fff;text-align:left;position:static}
tr.teacher{background:#eef4ff!important}
tr.ref{background:#dde9ff!important;font-weight:600}
tr.seed td{color:#59636e;font-size:12px}
td.best{background:#d8f3dc;font-weight:700}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318}.tie{color:#6e7781}
.note{color:#3d4752;max-width:70em}
table.grid td{text-align:center;vertical-align:middle}
table.grid img{image-rendering:pixelated;width:240px}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _td(text: str, cls: str = "") -> str:
    for word in ("better", "worse", "tie"):
        if text == word or text.endswith(f"({word})"):
            cls = (cls + " " + word).strip()
    return f"<td class='{cls}'>{_h(text)}</td>" if cls else f"<td>{_h(text)}</td>"


def _html_table(t: Table) -> str:
    head = "".join(f"<th scope='col'>{_h(c)}</th>" for c in t.columns)
    body = []
    for g in t.groups:
        body.append(f"<tr class='group'><th colspan='{len(t.columns)}' scope='rowgroup'>teacher: "
                    f"{_h(g.teacher)}</th></tr>")
        for kind, c, best in _rows_of(g, t.held_out):
            tds = "".join(_td(x, "best" if (i == 5 and best) else ("l" if i < 2 else "")) for i, x in enumerate(c))
            body.append(f"<tr class='{kind}'>{tds}</tr>")
    return (f"<div class='scroll'><table class='board'><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{chr(10).join(body)}\n</tbody></table></div>")


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


# A sample grid is a few hundred tiles at most (64 samples of up to MAX_PIXELS each side would be far more than any
# page shows); anything bigger is not a grid distill wrote.
MAX_GRID_BYTES = 32 << 20
MAX_GRID_PIXELS = 128 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID_NAME = re.compile(r".+-(\d+)steps\.png")  # how `distill eval` and `distill bench` name a row's grid


def _under(path: Path, roots: list[Path]) -> bool:
    return any(root in path.parents for root in roots)


def grid_png(grid, steps, roots) -> bytes | None:
    """The PNG bytes of a row's sample grid when the page may embed them, else None. Only what distill wrote: a
    regular file named <label>-<steps>steps.png for the row's steps that lies, links resolved, under one of `roots`
    (resolved too), at most MAX_GRID_BYTES, with a PNG signature, that PIL reads and verifies as a PNG of at most
    MAX_GRID_PIXELS. So a leaderboard file from elsewhere cannot pull another file of this machine into a page."""
    from PIL import Image

    if not roots or not isinstance(grid, str) or not grid or "\0" in grid:
        return None
    try:
        real = Path(grid).resolve(strict=True)
        folders = [Path(r).resolve() for r in roots]
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a name too long
        return None
    name = GRID_NAME.fullmatch(real.name)
    if not _under(real, folders) or not name or str(steps) != name.group(1):
        return None
    try:  # no blocking on a FIFO, no following a link swapped in since resolving
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_GRID_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            png = f.read(MAX_GRID_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(png) > MAX_GRID_BYTES or not png.startswith(PNG_SIGNATURE):
        return None
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            if im.width * im.height > MAX_GRID_PIXELS:
                return None
            im.verify()
    except Exception:  # PIL raises many kinds on a damaged or hostile file; each one means "not embedded"
        return None
    return png


def _grids(t: Table, roots: list) -> str:
    """Per teacher: methods as rows (teacher first), steps as columns, the prompts named once above. A grid cell
    holds the row's PNG only where grid_png allows it; else '-', and a note counts what was left out."""
    parts, refused = [], 0
    for g in t.groups:
        cells: dict = {}
        for ln in g.lines:
            r = ln.row
            named = [s.get("grid") for s in (ln.seeds or [r]) if s.get("grid")]
            png = next((p for p in (grid_png(x, r["steps"], roots) for x in named) if p), None)
            refused += bool(named) and png is None
            if png:
                label = "teacher" if r["method"] == "teacher" else f"{r['method']} ({r['student']})"
                cells.setdefault(label, {}).setdefault(r["steps"], (png, r))
        if not cells:
            continue
        steps = sorted({s for by in cells.values() for s in by}, reverse=True)
        labels = sorted(cells, key=lambda k: (k != "teacher", k))
        head = "<th></th>" + "".join(f"<th scope='col'>{_h(_steps(s))}</th>" for s in steps)
        trs = []
        for label in labels:
            tds = []
            for s in steps:
                if s in cells[label]:
                    png, r = cells[label][s]
                    alt = _h(f"{g.teacher}, {label}, {_steps(s)}, FID {_fixed(r.get('fid'), 2)}")
                    tds.append(f"<td><img alt='{alt}' src='{_data_uri(png)}'></td>")
                else:
                    tds.append("<td>-</td>")
            trs.append(f"<tr><th scope='row'>{_h(label)}</th>{''.join(tds)}</tr>")
        prompts = (t.protocol or {}).get("prompt_examples")
        prompts = [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else None
        named = ("Each image: the first sample of each prompt, left to right: " +
                 ", ".join(f"“{_h(p)}”" for p in prompts) + "." if prompts else
                 "Each image: the first sample of each prompt, in the order of the prompt list.")
        parts.append(f"<h3>{_h(g.teacher)}</h3><p class='note'>{named}</p><div class='scroll'>"
                     f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table></div>")
    if refused:
        rows = "row names a sample grid" if refused == 1 else "rows name sample grids"
        parts.append(f"<p class='note'>{refused} {rows} not shown: the page embeds only PNG grids that distill "
                     "wrote in the leaderboard's own folders.</p>")
    return "<h2>Samples</h2>" + "".join(parts) if parts else ""


def page(rows: list[dict], plot: bytes | None = None, grid_roots=()) -> str:
    """A static, self-contained HTML page: per protocol the table, the quality-versus-NFE plot and the sample
    grids. `plot` replaces the first table's plot (drawn here otherwise). `grid_roots`: the folders whose sample
    grids may be embedded (the leaderboard's own: the one holding its SQLite file, a bench's output folder); with
    none, no grid is embedded."""
    sections = []
    for i, t in enumerate(arrange(rows)):
        title = f"Protocol {t.protocol_id}" if t.protocol_id else "Rows without a recorded protocol"
        if i == 0:
            figure = plot if plot is not None else plot_quality_vs_nfe(rows, t)
        else:  # rows of unknown protocols are not plotted against each other, except when they are all there is
            figure = plot_quality_vs_nfe(rows, t) if t.protocol_id else None
        img = (f"<h3>Quality against cost</h3><img alt='FID and adherence against NFE, one panel per teacher' "
               f"src='{_data_uri(figure)}'>" if figure else "")
        notes = "".join(f"<li>{_h(n)}</li>" for n in describe(t))
        sections.append(f"<section><h2>{_h(title)}</h2><ul class='note'>{notes}</ul>"
                        f"{_html_table(t)}<p class='note'>★ teacher rows; the reference row ({REFERENCE}) heads each "
                        "group; green: the best FID of the rows at its NFE in its group. Headers say which way is "
                        f"better (↓ lower, ↑ higher).</p>{img}{_grids(t, list(grid_roots))}</section>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>distill leaderboard</title><style>{STYLE}</style></head><body><h1>distill leaderboard</h1>"
            f"{''.join(sections)}</body></html>\n")


def write_reports(rows: list[dict], out: Path, grid_roots=()) -> tuple[Path, Path]:
    """leaderboard.md, leaderboard.html and, when there is something to plot, quality_vs_nfe.png (the first
    table's plot). `grid_roots`: as for `page`."""
    out = Path(out)
    tables = arrange(rows)
    plot = plot_quality_vs_nfe(rows, tables[0]) if tables else None
    if plot:
        write_atomic(out / "quality_vs_nfe.png", plot)
    return write_atomic(out / "leaderboard.md", markdown(rows)), write_atomic(out / "leaderboard.html",
                                                                             page(rows, plot, grid_roots))
