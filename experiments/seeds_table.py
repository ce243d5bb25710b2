"""Each recipe of a bench leaderboard as the mean over its training seeds with the interval the leaderboard's verdicts
use (the t-interval over seeds, widened to the rows' own sampling interval), and each student's verdict against a
reference method's line at the same step count (its several-seed line where it has one), metric by metric: better /
worse only where the intervals separate. One table per protocol and teacher.

    python experiments/seeds_table.py runs/bench-pairs-rcm/leaderboard.sqlite dmd2
"""
import re
import sys

from distill.leaderboard import Leaderboard
from distill.leaderboard_view import arrange, verdict, with_interval

METRICS = [("fid", True), ("recall", False), ("diversity", False), ("adherence", False), ("precision", False)]
HEADERS = ["FID", "recall (%)", "diversity", "adherence (%)", "precision (%)"]


def label(line) -> str:
    """The method, and the matrix's run name (its seed left out where the line is a mean over seeds)."""
    r = (line.seeds or [line.row])[0]
    m = re.search(r"([^/]+?)(-seed[0-9]+)?/checkpoints/", r.get("run") or "")
    if r["method"] == "teacher" or not m:
        return r["method"]
    return f"{r['method']} ({m[1] if line.seeds else m[1] + (m[2] or '')})"


def main(db: str, reference: str) -> None:
    for table in arrange(Leaderboard(db).rows("id")):
        for group in table.groups:
            lines = sorted(group.lines, key=lambda ln: (ln.row["method"] == "teacher", -ln.row["steps"],
                                                        ln.row["method"]))
            ref = {}
            for ln in lines:  # the reference method's line at each step count, its several-seed one first
                if ln.row["method"] == reference and ln.n > getattr(ref.get(ln.row["steps"]), "n", 0):
                    ref[ln.row["steps"]] = ln
            print(f"\n{group.teacher}, protocol {table.protocol_id}\n")
            print("| method | seeds | steps | " + " | ".join(HEADERS) + f" | against {reference} |")
            print("|---|---|---|" + "---|" * len(METRICS) + "---|")
            for ln in lines:
                against = ref.get(ln.row["steps"])
                said = "-" if against is None or against is ln or ln.row["method"] == "teacher" else ", ".join(
                    f"{m} {verdict(ln.row, against.row, m, lower)}" for m, lower in METRICS)
                print(f"| {label(ln)} | {ln.n} | {ln.row['steps']} | "
                      + " | ".join(with_interval(ln.row, m) for m, _ in METRICS) + f" | {said} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
