"""The per-shape table of experiments/bench_shapes_<family>.yaml: at each shape, each method's 4-step student trained
on the three shapes at once ("mixed") against the one trained on that shape only, FID and adherence with their 95%
intervals and the verdict of mixed against one-shape (better / worse only where the intervals separate), and the
teacher's rows at that shape. Then, where either side has several training seeds, the recipes as their means over
seeds, with the interval the leaderboard's verdicts use (the t-interval over seeds, widened to the rows' own
sampling interval).

    python experiments/shapes_table.py runs/bench-shapes-sdxl/leaderboard.sqlite
"""
import json
import re
import sys

from distill.leaderboard import Leaderboard
from distill.leaderboard_view import arrange, verdict, with_interval as cell

SHAPES = {"16": "singles", "16x32": "pairs", "32x16": "stacks"}
NAME = re.compile(r"/\w+?_(mixed3x|mixed|singles|pairs|stacks)_\w+?-seed(\d+)/")  # the matrix's run names
MIXED = {"mixed": "", "mixed3x": " (mixed: 3x steps)"}


def main(db: str) -> None:
    rows = [{**r, **json.loads(r["extra"] or "{}")} for r in Leaderboard(db).rows("id")]
    table: dict[tuple, dict] = {}
    teacher: dict[tuple, dict] = {}
    for r in rows:
        shape = shape_of(json.loads(r["protocol"]))
        if r["method"] == "teacher":
            teacher[shape, r["steps"]] = r
            continue
        m = NAME.search(r.get("run") or "")
        if m:
            table[r["method"], m[1], shape, int(m[2])] = r
    methods = list(dict.fromkeys(k[0] for k in table))
    print("| shape | model | FID mixed | FID one-shape | verdict | adherence mixed (%) | adherence one-shape (%) "
          "| verdict | held-out pairs mixed (%) | held-out pairs one-shape (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES.values():
        for steps in (25, 4):
            t = teacher.get((shape, steps))
            if t:
                print(f"| {shape} | teacher, {steps} steps | {cell(t, 'fid')} | | | {cell(t, 'adherence')} | | | "
                      f"{cell(t, 'adherence_held_out')} | |")
        for method, kind, _, seed in [k for m in methods for k in table if k[0] == m and k[1] in MIXED
                                      and k[2] == shape]:
            # against the one-shape student of the same training seed, else of seed 0
            mixed, one = table[method, kind, shape, seed], table.get((method, shape, shape, seed))
            one = one or table.get((method, shape, shape, 0))
            label = f"{method}{MIXED[kind]}{f', seed {seed}' if seed else ''}"
            print(f"| {shape} | {label}, 4 steps | {compared(mixed, one)} | {cell(mixed, 'adherence_held_out')} | "
                  f"{cell(one, 'adherence_held_out')} |")
    recipes(rows)


def recipes(rows: list[dict]) -> None:
    """Mixed against one-shape as means over training seeds, at each shape where either side has several."""
    lines = {}
    for t in arrange(rows):
        shape = shape_of(t.protocol or {})
        for line in (ln for g in t.groups for ln in g.lines):
            m = NAME.search(line.row.get("run") or "")  # a mean's row is its first seed's, run name included
            if m:
                key = line.row["method"], m[1], shape
                if key in lines:
                    raise SystemExit(f"two recipes of {key} (another teacher or config under one run name)")
                lines[key] = line
    print("\n| shape | method | seeds mixed / one-shape | FID mixed | FID one-shape | verdict | adherence mixed (%) "
          "| adherence one-shape (%) | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    methods = list(dict.fromkeys(k[0] for k in lines))
    for shape in SHAPES.values():
        for method in methods:
            mixed, one = lines.get((method, "mixed", shape)), lines.get((method, shape, shape))
            if mixed and one and mixed.n + one.n > 2:
                print(f"| {shape} | {method} | {mixed.n} / {one.n} | {compared(mixed.row, one.row)} |")


def shape_of(protocol: dict) -> str | None:
    return SHAPES.get(str(protocol.get("resolution")))


def compared(mixed: dict | None, one: dict | None) -> str:
    """FID and adherence cells of a mixed row and a one-shape row, each with the verdict of mixed against one-shape."""
    said = mixed and one
    return (f"{cell(mixed, 'fid')} | {cell(one, 'fid')} | {verdict(mixed, one) if said else '-'} | "
            f"{cell(mixed, 'adherence')} | {cell(one, 'adherence')} | "
            f"{verdict(mixed, one, 'adherence', lower_is_better=False) if said else '-'}")


if __name__ == "__main__":
    main(sys.argv[1])
