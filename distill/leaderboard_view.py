"""What people read: the leaderboard's rows arranged into tables, verdicts, and the terminal, Markdown and HTML views.

Arrangement: one table per evaluation protocol (rows are ranked only against rows measured the same way), one group
per teacher inside it, the teacher's 50-step row on top, then by NFE and FID. Rows of one recipe over several
training seeds are summarised as mean ± sd with n, their per-seed rows listed beneath. A row is "better" or "worse"
than a reference only when their 95% intervals do not overlap; otherwise it is a "tie".

Each table says what was measured (`protocol_facts`: every field its protocol records) and shows only the columns
some row has a value for, grouped as quality, coverage, prompt and cost. The plot draws a recipe's per-seed values
beside their mean and cuts interval bars at the axis with an arrowhead; values off the axis are written on its edge in
labels placed so none overlaps another (`place_labels`).

Row fields are data, never markup: the Markdown escapes HTML and Markdown syntax, the HTML page escapes every field,
and the page embeds a row's sample grid only when it is a PNG that distill wrote under one of the folders the caller
names (`grid_roots`; see `grid_png`), enlarged in memory without smoothing (`upscaled`) so a 16-px sample is seen.
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
           "speedup", "adherence_held_out", "precision", "recall", "diversity")
# 95% intervals: FID and diversity by bootstrap, adherence, precision and recall by Wilson, CLIP score mean ± 1.96 se.
INTERVALS = {"fid": ("fid_lo", "fid_hi"), "fid_teacher": ("fid_teacher_lo", "fid_teacher_hi"),
             "adherence": ("adherence_lo", "adherence_hi"),
             "adherence_held_out": ("adherence_held_out_lo", "adherence_held_out_hi"),
             "precision": ("precision_lo", "precision_hi"), "recall": ("recall_lo", "recall_hi"),
             "diversity": ("diversity_lo", "diversity_hi"), "clip_score": ("clip_score_lo", "clip_score_hi")}
SPREADS = {"kid": "kid_std", "kid_teacher": "kid_teacher_std"}  # shown as ± but not an interval
SHARES = ("adherence", "adherence_held_out", "precision", "recall")  # in [0, 1], shown in percent


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
    def rows(self) -> list[dict]:
        """Every displayed row: the lines and the per-seed rows beneath them."""
        return [r for g in self.groups for ln in g.lines for r in [ln.row, *ln.seeds]]

    @property
    def held_out(self) -> bool:
        """Whether rows scored prompts no teacher trained on (the digit-pairs world), shown in one more column."""
        return any(r.get("adherence_held_out") is not None for r in self.rows)

    @property
    def columns(self) -> tuple[str, ...]:
        """The headers of COLUMNS that some row of the table has a value for (identity columns always)."""
        return tuple(c.header for c in self.shown)

    @property
    def shown(self) -> list[Column]:
        rows = self.rows
        return [c for c in COLUMNS if not c.needs or any(r.get(k) is not None for k in c.needs for r in rows)]


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
            if sd is not None and len(vals) == len(rows):
                half = _t975(len(vals) - 1) * sd / math.sqrt(len(vals))
                out[lo], out[hi] = out[k] - half, out[k] + half
                if all(r.get(lo) is not None and r.get(hi) is not None for r in rows):
                    out[lo] = min(out[lo], out[k] - sum(r[k] - r[lo] for r in rows) / len(rows))
                    out[hi] = max(out[hi], out[k] + sum(r[hi] - r[k] for r in rows) / len(rows))
                out[lo] = max(0.0, out[lo])
                if k in SHARES:
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


@dataclass(frozen=True)
class Column:
    header: str
    group: str  # the page's header row above the headers: what kind of figure this is
    needs: tuple[str, ...] = ()  # shown only when some row has one of these fields; () always


FID = "FID ↓"
HELD_OUT = "held-out pairs ↑ (%)"
COLUMNS = (
    Column("method", ""), Column("student", ""), Column("steps", ""), Column("NFE ↓", ""), Column("seeds", ""),
    Column(FID, "quality", ("fid",)), Column(f"ΔFID vs {REFERENCE}", "quality", ("fid",)),
    Column("vs teacher, same steps", "quality", ("fid",)), Column("KID ↓", "quality", ("kid",)),
    Column("precision ↑ (%)", "quality", ("precision",)),
    Column("FID vs teacher samples ↓", "quality", ("fid_teacher",)),
    Column("recall ↑ (%)", "coverage", ("recall",)), Column("diversity ↑", "coverage", ("diversity",)),
    Column("adherence ↑ (%)", "prompt", ("adherence",)), Column(HELD_OUT, "prompt", ("adherence_held_out",)),
    Column("CLIP score ↑", "prompt", ("clip_score",)),
    Column("ms / image ↓", "cost", ("ms_per_image",)),
    Column(f"speed-up vs {REFERENCE}", "cost", ("ms_per_image", "speedup")), Column("train steps", "cost"))
DECIMALS = {"fid": 2, "fid_teacher": 2, "kid": 4, "kid_teacher": 4, "adherence": 1, "adherence_held_out": 1,
            "ms_per_image": 1, "precision": 1, "recall": 1, "diversity": 3, "clip_score": 2}


def _fixed(v: float | None, decimals: int) -> str:
    if v is None:
        return "-"
    v = round(v, decimals)
    return f"{(v if v != 0 else 0.0):.{decimals}f}"  # never "-0.00", never "-6.1e-13"


def with_interval(row: dict | None, metric: str) -> str:
    """'1.23 [1.01, 1.45]': a metric and its 95% interval as the tables print them (shares in percent)."""
    if row is None or row.get(metric) is None:
        return "-"
    k, d = (100 if metric in SHARES else 1), DECIMALS[metric]
    iv = interval(row, metric) if metric in INTERVALS else None
    text = _fixed(k * row[metric], d)
    return text if iv is None else f"{text} [{_fixed(k * iv[0], d)}, {_fixed(k * iv[1], d)}]"


def _plus_minus(row: dict, metric: str, aggregated: bool) -> str:
    """'1.96 ± 0.12': over seeds the sd; for one row the interval's larger half (or KID's std over subsets)."""
    scale = 100 if metric in SHARES else 1
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


def cells(line: Line, group: Group, seed_row: dict | None = None) -> dict[str, str]:
    """Every column's text for one line (or, with `seed_row`, one of its per-seed rows), by header; a table shows
    those of its `columns`. Held-out adherence carries its verdict against teacher@50."""
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
    word = "-" if line.reference else verdict(r, ref, "adherence_held_out", lower_is_better=False)
    texts = [method, "-" if teacher else str(r.get("student") or "-"), str(r["steps"]), str(r.get("nfe") or "-"),
             seeds, _plus_minus(r, "fid", agg), delta, same, _plus_minus(r, "kid", agg),
             _plus_minus(r, "precision", agg), _plus_minus(r, "fid_teacher", agg), _plus_minus(r, "recall", agg),
             _plus_minus(r, "diversity", agg), _plus_minus(r, "adherence", agg),
             _plus_minus(r, "adherence_held_out", agg) + ("" if word == "-" else f" ({word})"),
             _plus_minus(r, "clip_score", agg),
             _plus_minus(r, "ms_per_image", agg) if agg else _fixed(r.get("ms_per_image"), 1), speedup,
             str(r.get("train_steps") or 0)]
    return dict(zip((c.header for c in COLUMNS), texts, strict=True))


def describe(table: Table) -> list[str]:
    """The table's note, one point a line: what FID is measured against and with how many samples, what ± means,
    how verdicts are reached, and where timings come from."""
    p = table.protocol
    if p is None:
        return ["Rows without a recorded protocol (from an older distill, or timing-only rows from "
                "`distill bench-speed`): their sample sizes and references are unknown, so they are ranked against "
                "no other table and carry no intervals or verdicts."]
    notes = [_summary(p)]
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
    notes += [_plus_minus_note(table),
              *(["Pairs of digits: adherence is the share with both digits read as prompted (each half by the "
                 "digits classifier); held-out pairs, the same on the 20 pairs no teacher trained on, with its "
                 f"verdict against {REFERENCE}."] if table.held_out else []),
              f"Verdicts (vs {REFERENCE}, vs the teacher at the same steps): better or worse only when the 95% "
              "intervals separate, otherwise tie.",
              _timing_note(table)]
    return notes


# What ± means for each figure (the half-width of its 95% interval unless said), for the columns a table shows.
MEANINGS = (
    ("fid", "FID (Heusel et al. 2017), its bootstrap interval over the generated samples{bootstrap}"),
    ("kid", "KID (Binkowski et al. 2018), its std over subsets"),
    ("precision", "precision and recall (Kynkäänniemi et al. 2019), their Wilson intervals over the samples"),
    ("diversity", "diversity (mean cosine distance between two samples of one prompt), its bootstrap interval over "
                  "prompts"),
    ("adherence", "adherence (the share the digits classifier reads as the prompted digit), its Wilson interval"),
    ("clip_score", "CLIP score (Hessel et al. 2021, eq. 1, w = 100), mean ± 1.96 standard errors"),
)


def _plus_minus_note(table: Table) -> str:
    rows = table.rows
    p = table.protocol or {}
    resamples = f" ({p['bootstrap']} resamples)" if p.get("bootstrap") is not None else ""
    said = [text.format(bootstrap=resamples) for k, text in MEANINGS
            if any(r.get(k) is not None or (k == "precision" and r.get("recall") is not None) for r in rows)]
    return ("±: the half-width of the 95% interval: " + "; ".join(said) + ". A recipe over several training seeds: "
            "mean ± sd with n, its per-seed rows beneath.")


def _summary(p: dict) -> str:
    """One sentence: how many samples, against which reference, with which features (parts an old row lacks are
    left out)."""
    g = p.get
    what = f"{_thousands(g('samples'))} generated samples per row" if g("samples") is not None else "generated samples"
    how = [f"{g('num_prompts')} prompts" if g("num_prompts") is not None else None,
           f"evaluation seeds {g('eval_seeds')}" if g("eval_seeds") is not None else None,
           f"{_size(g('resolution'))} px" if g("resolution") is not None else None]
    how = ", ".join(x for x in how if x)
    size = f"{_thousands(g('reference_size'))} " if g("reference_size") is not None else ""
    against = f" against {size}real images of `{g('reference')}`" if g("reference") is not None else ""
    features = f", with `{g('extractor')}` features" if g("extractor") is not None else ""
    return f"Measured on {what}{f' ({how})' if how else ''}{against}{features}."


def _weights(v) -> str:
    """A weights record: {"name", "sha256"} as distill writes it now, a bare file name in older rows."""
    if isinstance(v, dict):
        name, digest = v.get("name"), v.get("sha256")
        return f"{name} (sha256 {digest})" if digest else str(name)
    return str(v)


def _size(v) -> str:
    return "x".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _preprocessing(v) -> str:
    if not isinstance(v, dict):
        return str(v)
    known = {"resize", "size", "center_crop"}
    crop = "cropped to the central square, then " if v.get("center_crop") else ""
    text = f"{crop}resized to {_size(v.get('size'))} px ({v.get('resize')})" if "size" in v else ""
    rest = ", ".join(f"{k} {json.dumps(x)}" for k, x in v.items() if k not in known)
    return "; ".join(t for t in (text, rest) if t) or json.dumps(v)


# Fields of a protocol that describe one row (its own guidance and sampler), not the table: left out of the facts.
PER_ROW = ("guidance", "sampler")


def protocol_facts(p: dict | None) -> list[tuple[str, str, list[str]]]:
    """What was measured, as (label, text, examples): every field the table's protocol records, in words, so the
    measurement can be repeated; fields an older row lacks are left out, and fields this version does not know
    are listed as they are stored. `examples`: the recorded example prompts (for a list the page can fold)."""
    if not isinstance(p, dict):
        return []
    facts, used = [], set(PER_ROW)

    def add(label: str, keys: tuple[str, ...], text: str, examples: list[str] | None = None) -> None:
        if any(p.get(k) is not None for k in keys):
            facts.append((label, text, examples or []))
        used.update(keys)

    g = p.get
    add("samples", ("samples",), f"{_thousands(g('samples'))} generated images per row")
    prompts = [f"{_thousands(g('num_prompts'))} distinct prompts"] if g("num_prompts") is not None else []
    if g("prompts") is not None:
        prompts.append(f"hash {g('prompts')} (sha256 of the per-sample prompt list joined by newlines, first 12 "
                       "hex digits)")
    subset = g("prompt_subset")
    if isinstance(subset, dict):
        prompts.append(f"a seeded draw of {subset.get('num_prompts')} prompts (seed {subset.get('prompt_seed')})")
    elif subset is not None:
        prompts.append(f"subset {json.dumps(subset)}")
    add("prompts", ("num_prompts", "prompts", "prompt_subset"), "; ".join(prompts))
    examples = g("prompt_examples")
    examples = [str(x) for x in examples] if isinstance(examples, list) else [str(examples)]
    add("prompt examples", ("prompt_examples",), f"{len(examples)} recorded, in order (each cut at 60 characters)",
        examples)
    seeds = g("eval_seeds")
    add("evaluation seeds", ("eval_seeds",), ", ".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds))
    add("resolution", ("resolution",), f"{_size(g('resolution'))} px")
    ref = [f"`{g('reference')}`"] if g("reference") is not None else []
    ref += [f"{_thousands(g('reference_size'))} images"] if g("reference_size") is not None else []
    ref += [f"from {g('reference_path')}"] if g("reference_path") is not None else []
    ref += [f"digest {g('reference_digest')} (sha256 of the images' names and bytes)"] \
        if g("reference_digest") is not None else []
    add("reference", ("reference", "reference_size", "reference_path", "reference_digest"), ", ".join(ref))
    weights = g("extractor_weights")
    add("features", ("extractor", "extractor_weights"),
        f"`{g('extractor')}`" + (f", weights {_weights(weights)}" if weights is not None else ""))
    add("preprocessing", ("preprocessing",), _preprocessing(g("preprocessing")))
    add("CLIP model", ("clip",), f"{_weights(g('clip'))} (CLIP score, Hessel et al. 2021)")
    add("precision / recall", ("prc_neighbours",), f"k = {g('prc_neighbours')} nearest neighbours "
        "(Kynkäänniemi et al. 2019), on the features above")
    add("diversity", ("diversity_features",), f"mean cosine distance between samples of one prompt, on "
        f"{g('diversity_features')} features")
    add("bootstrap", ("bootstrap",), f"{g('bootstrap')} resamples for the FID and diversity intervals")
    if g("teacher_reference_steps") is not None:
        add("teacher reference", ("teacher_reference_steps", "teacher_reference_guidance"),
            f"the teacher's own {g('teacher_reference_steps')}-step samples (guidance "
            f"{g('teacher_reference_guidance')}), for FID vs teacher samples")
    used.update(("teacher_reference_steps", "teacher_reference_guidance"))
    for k, v in p.items():  # recorded by a newer distill: shown as stored, so nothing measured goes unsaid
        if k not in used and v is not None:
            facts.append((k, json.dumps(v, sort_keys=True, ensure_ascii=False), []))
    return facts


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

def _rows_of(t: Table, group: Group):
    """(kind, cells in the table's columns, best) per displayed line: kind 'ref', 'teacher', 'row' or 'seed'; best:
    its FID is the best at its NFE."""
    headers = t.columns
    for ln in group.lines:
        kind = "ref" if ln.reference else ("teacher" if ln.row["method"] == "teacher" else "row")
        c = cells(ln, group)
        yield kind, [c[h] for h in headers], ln.best
        for s in ln.seeds:
            c = cells(ln, group, s)
            yield "seed", [c[h] for h in headers], False


def _fid_at(t: Table) -> int | None:
    return t.columns.index(FID) if FID in t.columns else None


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
        at = _fid_at(t)
        for g in t.groups:
            body.append([f"[{_plain(g.teacher)}]"] + [""] * (len(t.columns) - 1))
            for _, c, best in _rows_of(t, g):
                c = [_plain(x) for x in c]
                if best:
                    c[at] += " *"
                body.append(c)
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
        out += [f"## {_md(title)}", "", *(f"- {_md(n)}" for n in describe(t))]
        facts = protocol_facts(t.protocol)
        if facts:
            out.append("- What was measured (the table's protocol):")
            for label, text, examples in facts:
                shown = "; ".join(f"“{x}”" for x in examples[:MD_EXAMPLES])
                more = f" … and {len(examples) - MD_EXAMPLES} more" if len(examples) > MD_EXAMPLES else ""
                out.append(f"  - **{_md(label)}**: {_md(text)}" + (f": {_md(shown + more)}" if examples else ""))
        groups = [c.group for c in t.shown]
        spans = [f"{g} ({', '.join(c.header for c in t.shown if c.group == g)})" for g in dict.fromkeys(groups) if g]
        out += ["", _md("Columns by kind: " + "; ".join(spans) + "."), "",
                "| " + " | ".join(_md(c) for c in t.columns) + " |", "|" + "---|" * len(t.columns)]
        at = _fid_at(t)
        for g in t.groups:
            out.append(f"| **{_md(g.teacher)}** |" + " |" * (len(t.columns) - 1))
            for kind, c, best in _rows_of(t, g):
                c = [_md(x) for x in c]
                if best:
                    c[at] = f"**{c[at]}**"
                if kind == "ref":
                    c[0] = f"**{c[0]}**"
                out.append("| " + " | ".join(c) + " |")
        out.append("")
    return "\n".join(out)


MD_EXAMPLES = 10  # example prompts the Markdown lists; the page folds the whole recorded list


# ---- the plot -------------------------------------------------------------------------------------------------

def _series(group: Group) -> dict[str, list[Line]]:
    """label -> the best line at each NFE, per (method, student kind), teacher first."""
    series: dict[str, dict] = {}
    for ln in group.lines:
        r = ln.row
        if not r.get("nfe"):
            continue
        label = "teacher (DDIM)" if r["method"] == "teacher" else _mpl(f"{r['method']} ({r['student']})")
        at = series.setdefault(label, {})
        if r["nfe"] not in at or _num(r.get("fid")) < _num(at[r["nfe"]].row.get("fid")):
            at[r["nfe"]] = ln
    return {k: [v[n] for n in sorted(v)] for k, v in sorted(series.items(), key=lambda kv: kv[0] != "teacher (DDIM)")}


def _mpl(text) -> str:
    """A row field as a plot label: matplotlib would read $...$ as mathematics (and fail on a bad formula)."""
    return _plain(text).replace("$", r"\$")


@dataclass
class Point:
    """One drawn value. `y` is where it is drawn, on the edge when its `value` lies off the axis (`off`: 1 above,
    -1 below); `lo`..`hi` its interval bar cut at the axis, `clipped` the ends that continue beyond it (each drawn
    with an arrowhead on the edge)."""

    x: float
    value: float
    y: float
    lo: float
    hi: float
    off: int = 0
    clipped: tuple[str, ...] = ()


@dataclass
class Panel:
    """What one panel draws: the axis limits, per series its points (the line) and its per-seed points."""

    limits: tuple[float, float]
    lines: dict[str, list[Point]]
    seeds: dict[str, list[Point]]

    def off_chart(self) -> list[tuple[str, Point, bool]]:
        """(series, point, whether it is one seed's) of every value drawn on an edge: they carry a written value."""
        return [(k, p, d is self.seeds) for d in (self.lines, self.seeds) for k, pts in d.items() for p in pts
                if p.off]


def outlier_cut(values: list[float]) -> float:
    """FID above this is off the scale, so that one far-off point (the 1-step teacher) does not flatten the rest:
    the value below the first jump of 2x or more between neighbouring sorted values that lands above 3x the median
    (with three values or more). inf when there is no such jump."""
    vals = sorted(values)
    if len(vals) < 3:
        return math.inf
    median = vals[len(vals) // 2]
    for below, v in zip(vals, vals[1:]):
        if v > 3 * median and v >= 2 * below:
            return below
    return math.inf


def axis_limits(values: list[float], ends: list[float], zero: bool, ceiling: float | None = None,
                reach: float = 0.3, typical: float = 0.0) -> tuple[float, float]:
    """Limits that show every value in `values` with a margin, and the interval `ends` as far as `reach` times the
    values' span beyond them (or twice the `typical` half-width of a bar, when more): a bar wider than that is cut at
    the axis (and marked) rather than squeezing the values into a strip. `zero`: the axis starts at 0 (FID, so gaps
    read as proportions); `ceiling`: no value can pass it (100%)."""
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) or 1.0
    pad, beyond = 0.06 * span, max(reach * span, 2 * typical)
    top = min(hi + beyond, max([hi + pad, *ends]))
    bottom = 0.0 if zero else max(lo - beyond, min([lo - pad, *ends]))
    if ceiling is not None:
        top = min(top, max(ceiling, hi) + pad)
    return bottom, top


def _point(x: float, value: float, iv: tuple[float, float] | None, limits: tuple[float, float]) -> Point:
    lo, hi = limits
    off = 1 if value > hi else (-1 if value < lo else 0)
    y = min(max(value, lo), hi)
    if off or iv is None:
        return Point(x, value, y, y, y, off)
    clipped = tuple(name for name, cut in (("lo", iv[0] < lo), ("hi", iv[1] > hi)) if cut)
    return Point(x, value, y, max(iv[0], lo), min(iv[1], hi), 0, clipped)


SEED_SPREAD = 1.07  # per-seed points sit side by side around their NFE, this factor apart (the NFE axis is log)


def panel(group: Group, metric: str, scale: float = 1.0, zero: bool = False, ceiling: float | None = None,
          outliers: bool = False) -> Panel | None:
    """The plotting data of one metric for one teacher group: each series' line through its best line per NFE
    (a recipe over seeds: their mean), that line's per-seed values as points of their own, and axis limits from
    the values (not from the bars: see axis_limits). With `outliers`, values above `outlier_cut` are drawn on the
    top edge. None when no line has the metric."""
    def value(r: dict) -> float | None:
        return None if r.get(metric) is None else r[metric] * scale

    def iv(r: dict):
        got = interval(r, metric) if metric in INTERVALS else None
        return None if got is None else (got[0] * scale, got[1] * scale)

    series = {k: [ln for ln in lines if value(ln.row) is not None] for k, lines in _series(group).items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    means = [value(ln.row) for lines in series.values() for ln in lines]
    cut = outlier_cut(means) if outliers else math.inf
    seeds = [value(s) for lines in series.values() for ln in lines for s in ln.seeds if value(s) is not None]
    shown = [v for v in means + seeds if v <= cut]
    ends = [e for lines in series.values() for ln in lines if value(ln.row) <= cut and iv(ln.row)
            for e in iv(ln.row)]
    halves = sorted((b - a) / 2 for lines in series.values() for ln in lines if iv(ln.row) for a, b in [iv(ln.row)])
    limits = axis_limits(shown or means, ends, zero, ceiling, typical=halves[len(halves) // 2] if halves else 0.0)
    lines = {k: [_point(ln.row["nfe"], value(ln.row), iv(ln.row), limits) for ln in v] for k, v in series.items()}
    spread = {}
    for k, v in series.items():
        for ln in v:
            vals = [value(s) for s in ln.seeds if value(s) is not None]
            spread.setdefault(k, []).extend(
                _point(ln.row["nfe"] * SEED_SPREAD ** (i - (len(vals) - 1) / 2), y, None, limits)
                for i, y in enumerate(vals))
    return Panel(limits, lines, {k: v for k, v in spread.items() if v})


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(anchors: list[tuple[float, float, int]], sizes: list[tuple[float, float]], gap: float = 1.5,
                 offset: float = 4.0) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1), in points, for labels of values drawn on an axis edge, none overlapping another.
    `anchors`: (x, y, side) of each value's mark, side 1 on the top edge (its label goes below it) or -1 on the
    bottom edge (above it); `sizes`: each label's (width, height). Left to right, each label starts just right of
    its mark; one that would overlap a label already placed moves a line further into the axes until it overlaps
    none (it always ends: each move passes one more placed box, and there are finitely many)."""
    boxes: list = [None] * len(anchors)
    placed: list = []
    for i in sorted(range(len(anchors)), key=lambda i: (anchors[i][0], anchors[i][1])):
        (x, y, side), (w, h) = anchors[i], sizes[i]
        y0 = y - offset - h if side > 0 else y + offset
        box = (x + offset, y0, x + offset + w, y0 + h)
        while any(overlaps(box, b) for b in placed):
            step = -(h + gap) if side > 0 else h + gap
            box = (box[0], box[1] + step, box[2], box[3] + step)
        boxes[i] = box
        placed.append(box)
    return boxes


def _draw(ax, pn: Panel, colours: dict[str, str]) -> None:
    """Lines with their cut interval bars, an arrowhead where a bar continues past the axis, per-seed points hollow,
    values off the axis as an arrowhead on the edge."""
    lo, hi = pn.limits
    for label, pts in pn.lines.items():
        c = colours[label]
        _, caps, bars = ax.errorbar([p.x for p in pts], [p.y for p in pts],
                                    yerr=[[p.y - p.lo for p in pts], [p.hi - p.y for p in pts]],
                                    fmt="--o" if label.startswith("teacher") else "-o", capsize=3, ms=4, color=c,
                                    label=label)
        for artist in (*caps, *bars):
            artist.set_alpha(0.55)  # bars behind the values: a wide one does not hide the points it crosses
        for p in pts:
            for end in p.clipped:
                ax.plot([p.x], [hi if end == "hi" else lo], marker="^" if end == "hi" else "v", ms=7, color=c,
                        clip_on=False, zorder=4)
    for label, pts in pn.seeds.items():
        ax.scatter([p.x for p in pts], [p.y for p in pts], s=22, facecolors="white", edgecolors=colours[label],
                   linewidths=1.2, zorder=3, clip_on=False)
    for label, p, _ in pn.off_chart():
        ax.plot([p.x], [p.y], marker="^" if p.off > 0 else "v", ms=7, color=colours[label], clip_on=False, zorder=4)
    ax.set_ylim(lo, hi)


def _label_off_chart(fig, ax, pn: Panel, colours: dict[str, str], fontsize: float = 8) -> None:
    """Write each off-axis value beside its mark, placed by place_labels (in points, so the saved dpi does not
    matter); a label moved away from its mark is tied to it by a thin line."""
    marks = sorted(pn.off_chart(), key=lambda m: (m[1].x, -m[1].value))
    if not marks:
        return
    renderer = fig.canvas.get_renderer()
    to_points = 72.0 / fig.dpi
    texts = [f"{p.value:.2f} {'↑' if p.off > 0 else '↓'}{' (a seed)' if seed else ''}" for _, p, seed in marks]
    sizes = []
    for text in texts:
        t = ax.text(0, 0, text, fontsize=fontsize)
        box = t.get_window_extent(renderer)
        sizes.append((box.width * to_points, box.height * to_points))
        t.remove()
    anchors = []
    for _, p, _ in marks:
        x, y = ax.transData.transform((p.x, p.y))
        anchors.append((x * to_points, y * to_points, p.off))
    for (label, p, _), text, a, size, box in zip(marks, texts, anchors, sizes, place_labels(anchors, sizes)):
        moved = box != place_labels([a], [size])[0]  # not where it would sit alone
        ax.annotate(text, (p.x, p.y), xytext=(box[0] - a[0], box[1] - a[1]), textcoords="offset points",
                    fontsize=fontsize, color=colours[label], ha="left", va="bottom", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", lw=0.6, color=colours[label], shrinkA=0, shrinkB=3)
                    if moved else None)


def plot_quality_vs_nfe(rows: list[dict], table_: Table | None = None) -> bytes | None:
    """PNG: FID (top) and adherence (bottom) against NFE, one panel per teacher in the table's order, one line per
    (method, student kind), teachers dashed, 95% interval bars cut at the axis with an arrowhead, a recipe's
    per-seed values as hollow points. None when nothing has both FID and NFE."""
    import matplotlib
    import matplotlib.lines

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t = table_ or (arrange(rows)[0] if rows else None)
    panels = [(g, panel(g, "fid", zero=True, outliers=True), panel(g, "adherence", 100, ceiling=100.0))
              for g in (t.groups if t else [])]
    panels = [x for x in panels if x[1] is not None]
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(max(5.5 * len(panels), 9.0), 7.8), squeeze=False,
                             sharex="col")
    labels = sorted({label for _, top, _ in panels for label in top.lines}, key=lambda k: (k != "teacher (DDIM)", k))
    labels += sorted({label for _, _, bottom in panels if bottom for label in bottom.lines} - set(labels))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per method in every panel
    for col, (g, top, bottom) in enumerate(panels):
        _draw(axes[0][col], top, colours)
        axes[0][col].set(xscale="log", ylabel="FID ↓ (95% bootstrap interval)", title=_mpl(g.teacher))
        if bottom:
            _draw(axes[1][col], bottom, colours)
        axes[1][col].set(xscale="log", xlabel="NFE per image ↓ (a CFG step counts two)",
                         ylabel="adherence ↑ (%, 95% Wilson interval)")
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
    handles = [matplotlib.lines.Line2D([], [], color=colours[k], ls="--" if k.startswith("teacher") else "-",
                                       marker="o", ms=4) for k in labels]
    keys = list(labels)
    if any(pn and pn.seeds for _, *pair in panels for pn in pair):
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="o", ms=5, mfc="white", color="0.35"))
        keys.append("one training seed (the line: their mean)")
    if any(pn and (pn.off_chart() or any(p.clipped for v in pn.lines.values() for p in v))
           for _, *pair in panels for pn in pair):
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="^", ms=6, color="0.35"))
        keys.append("bar or value continues past the axis")
    fig.legend(handles, keys, loc="upper center", ncol=min(len(keys), 4), fontsize=9, frameon=False)
    rows_of_legend = math.ceil(len(keys) / min(len(keys), 4))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * rows_of_legend))
    for col, (_, top, bottom) in enumerate(panels):
        for ax, pn in ((axes[0][col], top), (axes[1][col], bottom)):
            if pn:
                _label_off_chart(fig, ax, pn, colours)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---- the HTML page --------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 1em 2em;
line-height:1.45;color:#1b1f24}
img{max-width:100%;height:auto}
code{font-size:0.92em;overflow-wrap:anywhere}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:0.5em 0 1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:12.5px}
th,td{padding:3px 4px;text-align:right;white-space:nowrap;border-bottom:1px solid #e3e6ea}
thead th{background:#f0f2f5;white-space:normal;min-width:3em;max-width:6.5em;vertical-align:bottom;line-height:1.25}
thead tr.kinds th{text-align:center;font-weight:600;color:#3d4752;background:#e6e9ee;border-left:2px solid #fff}
th:first-child,td:first-child,td.l{text-align:left}
tbody tr{background:#fff}
tbody tr:nth-child(even){background:#f8f9fb}
table.board tbody tr>:first-child,table.board thead tr:last-child>:first-child{position:sticky;left:0;
background:inherit;z-index:1}
table.board thead tr:last-child>:first-child{background:#f0f2f5}
tr.group th{background:#2f3b4c!important;color:#fff;text-align:left}
tr.teacher{background:#eef4ff!important}
tr.ref{background:#dde9ff!important;font-weight:600}
tr.seed td{color:#59636e;font-size:12px}
td.best{background:#d8f3dc;font-weight:700}
.pm{color:#6e7781;font-size:0.88em}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318}.tie{color:#6e7781}
.note{color:#3d4752;max-width:70em}
ul.note{padding-left:1.3em}
img.plot{min-width:560px}
table.facts{font-size:13.5px;margin:0.3em 0 0.8em}
table.facts th{text-align:left;vertical-align:top;background:none;font-weight:600;padding-right:1em}
table.facts td{text-align:left;white-space:normal;overflow-wrap:anywhere}
table.facts tr{background:none!important}
table.grid th,table.grid td{text-align:left;vertical-align:middle}
table.grid img{image-rendering:pixelated;max-width:none}
tr.steps th{background:#f0f2f5;font-weight:600}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


PLUS_MINUS = re.compile(r"^(.*?)( ± [^ ]+)(.*)$")


def _td(text: str, cls: str = "") -> str:
    """A cell; its ± part smaller and grey, a verdict word coloured by its class."""
    for word in ("better", "worse", "tie"):
        if text == word or text.endswith(f"({word})"):
            cls = (cls + " " + word).strip()
    m = PLUS_MINUS.match(text)
    inner = f"{_h(m[1])}<span class='pm'>{_h(m[2])}</span>{_h(m[3])}" if m else _h(text)
    return f"<td class='{cls}'>{inner}</td>" if cls else f"<td>{inner}</td>"


def _html_table(t: Table) -> str:
    """The board: a header row naming each block of columns (quality, coverage, prompt, cost), then the headers;
    the first column stays in view while the table scrolls sideways."""
    shown = t.shown
    kinds = []
    for c in shown:
        if kinds and kinds[-1][0] == c.group:
            kinds[-1][1] += 1
        else:
            kinds.append([c.group, 1])
    top = "".join(f"<th colspan='{n}' scope='colgroup'>{_h(k)}</th>" for k, n in kinds)
    head = "".join(f"<th scope='col'>{_h(c)}</th>" for c in t.columns)
    at = _fid_at(t)
    body = []
    for g in t.groups:
        body.append(f"<tr class='group'><th colspan='{len(t.columns)}' scope='rowgroup'>teacher: "
                    f"{_h(g.teacher)}</th></tr>")
        for kind, c, best in _rows_of(t, g):
            tds = "".join(_td(x, "best" if (i == at and best) else ("l" if i < 2 else "")) for i, x in enumerate(c))
            body.append(f"<tr class='{kind}'>{tds}</tr>")
    return (f"<div class='scroll'><table class='board'><thead><tr class='kinds'>{top}</tr><tr>{head}</tr></thead>"
            f"<tbody>\n{chr(10).join(body)}\n</tbody></table></div>")


def _facts_html(t: Table) -> str:
    """The protocol as a two-column table; the example prompts folded."""
    trs = []
    for label, text, examples in protocol_facts(t.protocol):
        more = ""
        if examples:
            items = "".join(f"<li>{_h(x)}</li>" for x in examples)
            more = f"<details><summary>show them</summary><ol>{items}</ol></details>"
        trs.append(f"<tr><th scope='row'>{_h(label)}</th><td>{_code(text)}{more}</td></tr>")
    return (f"<h3>What was measured</h3><table class='facts'><tbody>{''.join(trs)}</tbody></table>" if trs else "")


def _code(text: str) -> str:
    """Escaped text with its `quoted` names as code."""
    parts = _h(text).split("`")
    return "".join(f"<code>{x}</code>" if i % 2 else x for i, x in enumerate(parts))


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


LEAST_SAMPLE_PX = 64  # a sample on the page is at least this many pixels on its shorter side


def sample_side(resolution, grid_size: tuple[int, int]) -> int:
    """A sample's shorter side in pixels: from the protocol's resolution (16, or "16x32"), else a bound from the
    grid (one row of samples with make_grid's 2-pixel padding)."""
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0:
        return resolution
    if isinstance(resolution, str) and re.fullmatch(r"\d+(x\d+)?", resolution):
        return min(int(x) for x in resolution.split("x")) or 1
    return max(1, min(grid_size) - 4)


def upscaled(png: bytes, side: int, least: int = LEAST_SAMPLE_PX) -> bytes:
    """`png` (a grid grid_png has checked) enlarged by a whole factor with nearest-neighbour, so that a `side`-pixel
    sample is at least `least` pixels and each source pixel becomes a uniform block; as it is when already that
    big, or when the enlarged grid would pass MAX_GRID_PIXELS. Done in memory; nothing is written."""
    from PIL import Image

    factor = math.ceil(least / side) if side < least else 1
    with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
        if factor == 1 or im.width * im.height * factor ** 2 > MAX_GRID_PIXELS:
            return png
        big = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR's width and height


def _grids(t: Table, roots: list) -> str:
    """Per teacher, one grid a row, grouped by steps: the reference (teacher@50) first, then from the fewest steps
    up, the teacher at those steps above the methods, so samples of one cost lie one above the other. A grid holds
    the row's PNG only where grid_png allows it, enlarged by `upscaled`; a note counts what was left out."""
    parts, refused = [], 0
    for g in t.groups:
        found: dict = {}
        for ln in g.lines:
            r = ln.row
            named = [s.get("grid") for s in (ln.seeds or [r]) if s.get("grid")]
            png = next((p for p in (grid_png(x, r["steps"], roots) for x in named) if p), None)
            refused += bool(named) and png is None
            if png:
                label = "teacher" if r["method"] == "teacher" else f"{r['method']} ({r['student']})"
                found.setdefault((r["steps"], label), (png, r, ln.reference))
        if not found:
            continue
        order = sorted(found, key=lambda k: (not found[k][2], k[0], k[1] != "teacher", k[1]))
        trs, last = [], None
        for steps, label in order:
            png, r, ref = found[(steps, label)]
            if (steps, ref) != last:
                trs.append(f"<tr class='steps'><th colspan='2' scope='rowgroup'>{_h(_steps(steps))}"
                           f"{' (reference)' if ref else ''}</th></tr>")
                last = (steps, ref)
            png = upscaled(png, sample_side((r.get("protocol") or {}).get("resolution"), _png_size(png)))
            w, h = _png_size(png)
            alt = _h(f"{g.teacher}, {label}, {_steps(steps)}, FID {_fixed(r.get('fid'), 2)}")
            trs.append(f"<tr><th scope='row'>{_h(label)}<br><span class='pm'>FID {_h(_fixed(r.get('fid'), 2))}"
                       f"</span></th><td><img alt='{alt}' width='{w}' height='{h}' src='{_data_uri(png)}'></td></tr>")
        prompts = (t.protocol or {}).get("prompt_examples")
        prompts = [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else None
        named = ("Each image: the first sample of each prompt, left to right: " +
                 ", ".join(f"“{_h(p)}”" for p in prompts) + "." if prompts else
                 "Each image: the first sample of each prompt, in the order of the prompt list.")
        parts.append(f"<h3>{_h(g.teacher)}</h3><p class='note'>{named} Enlarged without smoothing (each pixel a "
                     f"square block) to at least {LEAST_SAMPLE_PX} px a sample.</p><div class='scroll'>"
                     f"<table class='grid'><tbody>{''.join(trs)}</tbody></table></div>")
    if refused:
        rows = "row names a sample grid" if refused == 1 else "rows name sample grids"
        parts.append(f"<p class='note'>{refused} {rows} not shown: the page embeds only PNG grids that distill "
                     "wrote in the leaderboard's own folders.</p>")
    return "<h2>Samples</h2>" + "".join(parts) if parts else ""


def page(rows: list[dict], plot: bytes | None = None, grid_roots=()) -> str:
    """A static, self-contained HTML page: per protocol what was measured, the table, the quality-versus-NFE plot
    and the sample grids. `plot` replaces the first table's plot (drawn here otherwise). `grid_roots`: the folders
    whose sample grids may be embedded (the leaderboard's own: the one holding its SQLite file, a bench's output
    folder); with none, no grid is embedded."""
    sections = []
    for i, t in enumerate(arrange(rows)):
        title = f"Protocol {t.protocol_id}" if t.protocol_id else "Rows without a recorded protocol"
        if i == 0:
            figure = plot if plot is not None else plot_quality_vs_nfe(rows, t)
        else:  # rows of unknown protocols are not plotted against each other, except when they are all there is
            figure = plot_quality_vs_nfe(rows, t) if t.protocol_id else None
        img = (f"<h3>Quality against cost</h3><div class='scroll'><img class='plot' alt='FID and adherence against "
               f"NFE, one panel per teacher' src='{_data_uri(figure)}'></div>" if figure else "")
        notes = "".join(f"<li>{_code(n)}</li>" for n in describe(t))
        sections.append(f"<section><h2>{_h(title)}</h2><ul class='note'>{notes}</ul>{_facts_html(t)}"
                        f"{_html_table(t)}<p class='note'>★ teacher rows; the reference row ({REFERENCE}) heads each "
                        "group; green: the best FID of the rows at its NFE in its group. Headers say which way is "
                        f"better (↓ lower, ↑ higher); ± as the notes above say.</p>{img}"
                        f"{_grids(t, list(grid_roots))}</section>")
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
