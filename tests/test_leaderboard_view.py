"""What people read: verdicts from intervals, seeds summarised as mean ± sd, and the page's structure (groups,
reference rows, headers, notes, grids, narrow-screen rules), all from a real SQLite file."""
from html.parser import HTMLParser

import pytest
from PIL import Image

from distill import leaderboard_view as view
from distill.leaderboard import Leaderboard

PROTOCOL = {"samples": 1000, "num_prompts": 10, "prompts": "p10", "reference": "digits", "reference_size": 1797,
            "extractor": "distill-digits", "extractor_weights": None, "resolution": 16, "eval_seeds": [0],
            "bootstrap": 200, "teacher_reference_steps": 50, "teacher_reference_guidance": 5.0,
            "prompt_examples": [f"a handwritten digit {k}" for k in range(10)]}


def _row(teacher, method, steps, nfe, fid, half=0.12, adherence=0.95, ms=10.0, **kw):
    row = {"teacher": teacher, "method": method, "student": "-" if method == "teacher" else "lora", "steps": steps,
           "nfe": nfe, "fid": fid, "fid_lo": max(0.0, fid - half), "fid_hi": fid + half, "kid": fid / 1000,
           "kid_std": 1e-4, "adherence": adherence, "adherence_lo": adherence - 0.01,
           "adherence_hi": min(1.0, adherence + 0.01), "ms_per_image": ms, "fid_teacher": fid / 2,
           "protocol": dict(PROTOCOL, guidance=5.0 if method == "teacher" else 1.0, sampler=method)}
    return {**row, **kw}


@pytest.fixture
def rows(tmp_path):
    def grid(label, steps):  # named and placed as distill eval writes them, beside the leaderboard
        path = tmp_path / "eval" / f"{label}-{steps}steps.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 4), "white").save(path)
        return str(path)

    board = Leaderboard(tmp_path / "b.sqlite")
    sdxl, sd3 = "builtin:digits-sdxl", "builtin:digits-sd3"
    for steps, fid in [(1, 9.41), (4, 2.66), (50, 2.26)]:
        board.add(_row(sdxl, "teacher", steps, 2 * steps, fid, ms=2.0 * steps, grid=grid("teacher", steps),
                       fid_teacher=-6.1e-13 if steps == 50 else fid / 2))
    for seed, fid in [(0, 1.0), (1, 2.0), (2, 3.0)]:  # mean 2, sd 1
        board.add(_row(sdxl, "consistency", 4, 4, fid, seed=seed, recipe="lcm", ms=8.0,
                       grid=grid("consistency", 4)))
    board.add(_row(sdxl, "add", 1, 1, 1.50, ms=2.5, grid=grid("add", 1)))  # separates from teacher@50: better
    board.add(_row(sdxl, "ladd", 1, 1, 2.30, ms=2.5))  # overlaps teacher@50: tie
    board.add(_row(sd3, "teacher", 50, 100, 3.28, ms=90.0))
    board.add(_row(sd3, "ladd", 4, 4, 7.72, half=0.3, ms=9.0))  # worse
    return board.rows()


def test_verdicts_need_separated_intervals():
    ref = {"fid": 2.0, "fid_lo": 1.9, "fid_hi": 2.1}
    assert view.verdict({"fid": 1.5, "fid_lo": 1.4, "fid_hi": 1.6}, ref) == "better"
    assert view.verdict({"fid": 2.5, "fid_lo": 2.4, "fid_hi": 2.6}, ref) == "worse"
    assert view.verdict({"fid": 1.85, "fid_lo": 1.7, "fid_hi": 1.95}, ref) == "tie"  # 0.15 apart, still a tie
    assert view.verdict({"fid": 1.5}, ref) == "-"  # no interval: no claim
    high = {"adherence": 0.99, "adherence_lo": 0.98, "adherence_hi": 1.0}
    low = {"adherence": 0.9, "adherence_lo": 0.88, "adherence_hi": 0.92}
    assert view.verdict(high, low, "adherence", lower_is_better=False) == "better"
    # the same intervals as the results pages print them: shares in percent, each metric at the tables' decimals
    assert view.with_interval(high, "adherence") == "99.0 [98.0, 100.0]"
    assert view.with_interval(ref, "fid") == "2.00 [1.90, 2.10]"
    assert view.with_interval({"fid": 1.5}, "fid") == "1.50" and view.with_interval(None, "fid") == "-"


def test_training_seeds_show_as_mean_sd_with_n_and_their_rows_beneath(rows):
    (table, *_) = view.arrange(rows)
    sdxl = table.groups[0]
    (line,) = [ln for ln in sdxl.lines if ln.seeds]
    assert line.n == 3 and line.row["fid"] == pytest.approx(2.0) and line.row["fid_sd"] == pytest.approx(1.0)
    # The verdict interval of a mean over 3 seeds: mean ± t(0.975, 2) sd / sqrt(3).
    assert line.row["fid_hi"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    text = view.table(rows)
    assert "n=3" in text and "2.00 ± 1.00" in text
    assert all(f"└ seed {s}" in text for s in range(3)) and "1.00 ± 0.12" in text


def test_seeds_that_agree_keep_their_sampling_noise(tmp_path):
    """Three seeds at 100% adherence (sd 0) are not 'better' than a teacher at 100%: the mean's interval is at least
    the rows' own (their mean halves; the rows share evaluation seeds, so that noise does not average out)."""
    board = Leaderboard(tmp_path / "b.sqlite")
    top = {"adherence": 1.0, "adherence_lo": 0.996, "adherence_hi": 0.9999999999999999}
    board.add(_row("builtin:digits-sdxl", "teacher", 50, 100, 2.26, **top))
    for seed in range(3):
        board.add(_row("builtin:digits-sdxl", "progressive", 4, 4, 2.0 + seed / 100, seed=seed, recipe="p", **top))
    (table, *_) = view.arrange(board.rows())
    (line,) = [ln for ln in table.groups[0].lines if ln.seeds]
    assert line.row["adherence_sd"] == 0 and line.row["adherence_hi"] == 1.0
    assert line.row["adherence_lo"] == pytest.approx(0.996)
    teacher = next(ln.row for ln in table.groups[0].lines if ln.row["method"] == "teacher")
    assert view.verdict(line.row, teacher, "adherence", lower_is_better=False) == "tie"
    # where the seeds disagree, the t-interval is the wider one and stands (the test above)


def test_terminal_and_markdown_views(rows):
    text = view.table(rows)
    lines = text.splitlines()
    assert lines[1].startswith("Measured on 1,000 generated samples per row") and "1,797 real images" in lines[1]
    assert "FID ↓" in lines[2] and "adherence ↑ (%)" in lines[2] and "ms / image ↓" in lines[2]
    sdxl_at = lines.index("[builtin:digits-sdxl]")
    assert lines[sdxl_at + 1].startswith("★ teacher (reference)")  # teacher@50 heads its group
    assert "2.26 ± 0.12" in lines[sdxl_at + 1] and "0.00" in lines[sdxl_at + 1] and "e-13" not in text
    assert "1.50 ± 0.12 *" in text and "-0.76 (better)" in text and "(tie)" in text and "(worse)" in text
    md = view.markdown(rows)
    assert "**1.50 ± 0.12**" in md and "1,797 real images" in md and "1,000 generated samples" in md


class Page(HTMLParser):
    """The parts of the page a test checks: tags with their classes, table cells by row, images."""

    def __init__(self):
        super().__init__()
        self.meta, self.rows, self.headers, self.imgs, self.scroll_tables, self.stack = [], [], [], [], 0, []
        self.cell, self.in_head = None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.in_head = self.in_head or tag == "thead"
        if tag == "meta":
            self.meta.append(a)
        if tag == "table" and self.stack and "scroll" in self.stack[-1][1]:
            self.scroll_tables += 1
        if tag == "tr":
            self.rows.append((a.get("class", ""), []))
        if tag in ("td", "th"):
            self.cell = [a.get("class", ""), ""]
        if tag == "img":
            self.imgs.append(a)
        if tag not in ("meta", "img", "br"):
            self.stack.append((tag, a.get("class", "")))

    def handle_endtag(self, tag):
        self.in_head = self.in_head and tag != "thead"
        if tag in ("td", "th") and self.cell is not None:
            (self.headers if self.in_head else self.rows[-1][1]).append(tuple(self.cell))
            self.cell = None
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data


def test_page_structure(rows, tmp_path):
    html = view.page(rows, grid_roots=[tmp_path])  # the folder that holds the leaderboard's SQLite file
    p = Page()
    p.feed(html)
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in p.meta
    assert "img{max-width:100%" in html and ".scroll{overflow-x:auto" in html
    assert p.scroll_tables >= 2  # the leaderboard table and the sample grids scroll sideways on a phone
    heads = [text for _, text in p.headers]
    for h in ("FID ↓", "adherence ↑ (%)", "ms / image ↓", "ΔFID vs teacher@50", "speed-up vs teacher@50",
              "NFE ↓"):
        assert h in heads
    board = [(cls, [text for _, text in cells]) for cls, cells in p.rows if cls in ("group", "ref", "teacher", "row",
                                                                                     "seed")]
    groups = [i for i, (cls, _) in enumerate(board) if cls == "group"]
    assert [board[i][1][0] for i in groups] == ["teacher: builtin:digits-sdxl", "teacher: builtin:digits-sd3"]
    assert all(board[i + 1][0] == "ref" and board[i + 1][1][0] == "★ teacher (reference)" for i in groups)
    sdxl = board[groups[0] + 1:groups[1]]
    nfes = [int(cells[3]) for cls, cells in sdxl if cls != "seed"]
    assert nfes[0] == 100 and nfes[1:] == sorted(nfes[1:])  # reference first, then by NFE
    ref = sdxl[0][1]
    assert ref[9] == "0.00" and ref[12] == "1.0×"  # fid_teacher of the reference itself; its own speed-up
    add = next(cells for cls, cells in sdxl if cells[0] == "add")
    assert add[6] == "-0.76 (better)" and add[12] == "40.0×"
    assert any(cls == "seed" and cells[0] == "└ seed 1" for cls, cells in sdxl)
    best = [text for cls, cells in p.rows for c, text in cells if "best" in c]
    assert best == ["1.50 ± 0.12"]  # the better of the two rows at NFE 1; a row alone at its NFE is not marked
    assert any("worse" in c for cls, cells in p.rows for c, _ in cells)  # verdicts are coloured by class
    assert "Protocol " in html and "1,000 generated samples" in html and "1,797 real images" in html
    assert "ms / image: end to end" in html
    # Sample grids: grouped by steps, the reference first, then from the fewest steps up, the teacher above the
    # methods at each; "1 step" in the singular; the prompts named once above them.
    steps = [cells[0][1] for cls, cells in p.rows if cls == "steps"]
    assert steps == ["50 steps (reference)", "1 step", "4 steps"] and "1 steps" not in html
    labels = [(cls, cells[0][1]) for cls, cells in p.rows if cls in ("", "steps") and cells and
              cells[0][1].split("FID")[0] in ("teacher", "consistency (lora)", "add (lora)") or cls == "steps"]
    at_4 = [text.split("FID")[0] for _, text in labels[labels.index(("steps", "4 steps")) + 1:]]
    assert at_4 == ["teacher", "consistency (lora)"]
    grids = html[html.index("<h2>Samples</h2>"):]
    assert grids.count("a handwritten digit 7") == 1
    assert sum(img["src"].startswith("data:image/png") for img in p.imgs) == 1 + 5  # the plot, five grid cells


def test_reports_are_written_with_a_two_row_plot(rows, tmp_path):
    md, page = view.write_reports(rows, tmp_path / "out")
    png = Image.open(tmp_path / "out/quality_vs_nfe.png")
    assert png.height > 0.6 * png.width  # FID panels above adherence panels, one column per teacher
    assert md.read_text().startswith("# Leaderboard") and page.read_text().startswith("<!doctype html>")
