"""Bad input for the leaderboard's pages and the bench, as a careless or hostile file gives it: a row that names a
file which is not a grid distill wrote embeds nothing; row fields come out as text in the terminal, the Markdown and
the HTML; a bench matrix whose names or numbers would escape `out` or mean nothing is refused in one line before any
work, leaving the disk as it was; and a resumed or edited bench adds each row exactly once."""
import base64
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from distill import bench, cli
from distill import leaderboard_view as view
from distill.config import ConfigError
from distill.evaluation import write_grid
from distill.leaderboard import Leaderboard

PROTOCOL = {"samples": 10, "num_prompts": 10, "prompts": "p10", "reference": "digits", "reference_size": 1797,
            "extractor": "distill-digits", "extractor_weights": None, "resolution": 16, "eval_seeds": [0],
            "bootstrap": 200, "teacher_reference_steps": None, "teacher_reference_guidance": None,
            "prompt_examples": [f"a handwritten digit {k}" for k in range(10)]}
GMM = {"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
       "method": {"params": {"guidance_min": 1.0, "guidance_max": 1.0}},
       "data": {"kind": "teacher", "batch_size": 8, "size": 64}, "train": {"max_steps": 2}}
SCRIPT = "<script>alert(1)</script>"


def tree_digest(folder: Path) -> str:
    """Names of every entry below `folder`, every file's bytes and every link's target (as tests/test_bad_input.py,
    plus the links)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _row(teacher="builtin:digits-sdxl", method="consistency", steps=4, **kw) -> dict:
    return {"teacher": teacher, "method": method, "student": "-" if method == "teacher" else "lora", "steps": steps,
            "fid": 3.0, "protocol": dict(PROTOCOL), **kw}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the page embeds only grids distill wrote under the leaderboard's folders ------------------------------------

@pytest.fixture
def board_world(tmp_path):
    """A leaderboard folder with a grid `distill eval` wrote beside it, and a private folder next to it."""
    home = tmp_path / "board"
    (home / "eval").mkdir(parents=True)
    private = tmp_path / "private"
    private.mkdir()
    Image.new("RGB", (8, 8), "red").save(private / "secret-4steps.png")
    (private / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for a page")
    images = torch.rand(4, 3, 8, 8)
    legit = write_grid(images, 2, home / "eval" / "consistency-4steps.png")  # distill's own writer and name
    return home, private, legit


def _bad_grid(case: str, home: Path, private: Path) -> tuple[str, bytes | None]:
    """(the row's grid field, the bytes that must not reach the page)."""
    e = home / "eval"
    if case == "a text file named like a grid":
        (e / "notes-4steps.png").write_text("private notes")
        return str(e / "notes-4steps.png"), b"private notes"
    if case == "a private key outside":
        return str(private / "id_rsa"), (private / "id_rsa").read_bytes()
    if case == "a PNG outside the leaderboard's folders":
        return str(private / "secret-4steps.png"), (private / "secret-4steps.png").read_bytes()
    if case == "a link inside that escapes":
        (e / "link-4steps.png").symlink_to(private / "secret-4steps.png")
        return str(e / "link-4steps.png"), (private / "secret-4steps.png").read_bytes()
    if case == "a folder link inside that escapes":
        (e / "out").symlink_to(private, target_is_directory=True)
        return str(e / "out" / "secret-4steps.png"), (private / "secret-4steps.png").read_bytes()
    if case == "a relative path climbing out":
        return str(e / ".." / ".." / "private" / "secret-4steps.png"), (private / "secret-4steps.png").read_bytes()
    if case == "a system file":
        return "/etc/passwd", Path("/etc/passwd").read_bytes()
    if case == "a JPEG named .png":
        Image.new("RGB", (8, 8), "blue").save(e / "photo-4steps.png", format="JPEG")
        return str(e / "photo-4steps.png"), (e / "photo-4steps.png").read_bytes()
    if case == "a PNG signature then junk":
        (e / "junk-4steps.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"secret payload" * 20)
        return str(e / "junk-4steps.png"), b"secret payload" * 20
    if case == "a PNG not named as distill names grids":
        Image.new("RGB", (8, 8), "green").save(e / "screenshot.png")
        return str(e / "screenshot.png"), (e / "screenshot.png").read_bytes()
    if case == "a grid of other steps than the row's":
        Image.new("RGB", (8, 8), "green").save(e / "other-8steps.png")
        return str(e / "other-8steps.png"), (e / "other-8steps.png").read_bytes()
    if case == "a FIFO named like a grid":
        os.mkfifo(e / "fifo-4steps.png")  # reading it would hang the page
        return str(e / "fifo-4steps.png"), None
    if case == "a folder named like a grid":
        (e / "dir-4steps.png").mkdir()
        return str(e / "dir-4steps.png"), None
    if case == "a NUL in the path":
        return str(e / "consistency-4steps.png") + "\0x", None
    if case == "not text":
        return 42, None
    raise AssertionError(case)


BAD_GRIDS = ["a text file named like a grid", "a private key outside", "a PNG outside the leaderboard's folders",
             "a link inside that escapes", "a folder link inside that escapes", "a relative path climbing out",
             "a system file", "a JPEG named .png", "a PNG signature then junk",
             "a PNG not named as distill names grids", "a grid of other steps than the row's",
             "a FIFO named like a grid", "a folder named like a grid", "a NUL in the path", "not text"]


@pytest.mark.parametrize("case", BAD_GRIDS)
def test_a_row_naming_anything_but_a_distill_grid_embeds_nothing(board_world, case):
    home, private, legit = board_world
    grid, secret = _bad_grid(case, home, private)
    board = Leaderboard(home / "b.sqlite")
    board.add(_row(method="consistency", grid=str(legit)))
    board.add(_row(method="evil", grid=grid))
    md, page = view.write_reports(board.rows(), home / "out", grid_roots=[home])
    html = page.read_text()
    assert _b64(view.upscaled(legit.read_bytes(), 16)) in html  # the real grid still embeds, enlarged ...
    if secret is not None:
        assert _b64(secret) not in html and _b64(secret)[:40] not in html  # ... the other file never does
    assert html.count("<img alt='builtin:digits-sdxl") == 1
    assert "1 row names a sample grid not shown" in html


def test_limits_on_size_and_pixels_and_no_roots(board_world, monkeypatch):
    home, _, legit = board_world
    assert view.grid_png(str(legit), 4, [home]) == legit.read_bytes()
    assert view.grid_png(str(legit), 4, []) is None  # no folder named: nothing embeds
    assert view.grid_png(str(legit), 4, [home / "elsewhere"]) is None
    monkeypatch.setattr(view, "MAX_GRID_PIXELS", 10)
    assert view.grid_png(str(legit), 4, [home]) is None
    monkeypatch.undo()
    monkeypatch.setattr(view, "MAX_GRID_BYTES", 50)
    assert view.grid_png(str(legit), 4, [home]) is None


def test_the_leaderboard_command_never_embeds_a_file_from_outside(board_world, capsys):
    home, private, _ = board_world
    board = Leaderboard(home / "b.sqlite")
    board.add(_row(grid=str(private / "secret-4steps.png")))
    board.add(_row(method="evil", grid=str(private / "id_rsa")))
    board.close()
    assert cli.main(["leaderboard", "--db", str(home / "b.sqlite"), "--out", str(home / "out")]) == 0
    html = (home / "out/leaderboard.html").read_text()
    for secret in ("secret-4steps.png", "id_rsa"):
        assert _b64((private / secret).read_bytes())[:40] not in html


# ---- row fields are text in every view ---------------------------------------------------------------------------

HOSTILE = {
    "method": {"method": SCRIPT},
    "teacher": {"teacher": SCRIPT},
    "student": {"student": SCRIPT},
    "prompt": {"protocol": {**PROTOCOL, "prompt_examples": [SCRIPT, "a digit"]}},
    "protocol field": {"protocol": {**PROTOCOL, "extractor": SCRIPT, "reference": "</li><img src=x onerror=alert(1)>"}},
    "markdown image": {"method": "![x](https://tracker.example/p.png)"},
    "markdown link": {"teacher": "[click](javascript:alert(1))"},
    "attribute breakout": {"teacher": "x' onerror='alert(1)"},
    "table pipes and lines": {"method": "a | b\n| c |\r\n# heading"},
    "terminal escapes": {"method": "\x1b[2J\x1b[31mred\x07", "student": "\u202egnp.exe"},
}


@pytest.mark.parametrize("case", HOSTILE)
def test_row_fields_are_escaped_in_markdown_html_and_terminal(board_world, case):
    home, _, legit = board_world
    board = Leaderboard(home / "b.sqlite")
    board.add(_row(method="teacher", steps=4, grid=str(legit).replace("consistency-", "teacher-")))
    (home / "eval/teacher-4steps.png").write_bytes(legit.read_bytes())
    board.add(_row(grid=str(legit), **HOSTILE[case]), new_table=True)
    rows = board.rows()
    md, page = view.write_reports(rows, home / "out", grid_roots=[home])
    md, html, text = md.read_text(), page.read_text(), view.table(rows)
    for out in (md, html):
        assert "<script" not in out.lower() and "<img src=x" not in out
    assert "![x](" not in md and "[click](" not in md  # no Markdown image or link from a field
    assert "' onerror=" not in html
    if case == "attribute breakout":
        assert "x&#x27; onerror=&#x27;alert(1)" in html  # inside the grid's alt='...', still text
    if case in ("method", "teacher", "student", "protocol field"):
        assert "&lt;script&gt;" in md and "&lt;script&gt;" in html
    if case == "prompt":
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # The Markdown table keeps its shape: every table line has as many unescaped | as the header.
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    bars = {ln.replace("\\|", "").count("|") for ln in table_lines}
    assert len(bars) == 1, table_lines
    assert not any(ch in text + md + html for ch in ("\x1b", "\x07", "\u202e", "\r"))


def test_the_timing_note_names_the_teacher_steps_the_rows_were_timed_against(tmp_path):
    board = Leaderboard(tmp_path / "b.sqlite")
    timed = {"device": "CPU", "threads": 2, "timing_repeats": 10, "timing_batch": 1, "ms_per_image": 2.0,
             "speedup": 4.0}
    board.add(_row(method="teacher", steps=50, nfe=100, **timed, speedup_reference_steps=4))
    board.add(_row(steps=1, nfe=1, **timed, speedup_reference_steps=4))
    note = view.describe(view.arrange(board.rows())[0])[-1]
    assert "the teacher's 4-step sampling" in note and "50-step" not in note
    assert "speed-up vs teacher@50: the teacher@50 row's ms over the row's" in note  # not the ratio against @4
    assert "4.0×" not in view.table(board.rows())  # the stored ratio was against teacher@4, not shown as @50
    board.add(_row(method="teacher", steps=50, nfe=100, **timed, speedup_reference_steps=50,
                   protocol={**PROTOCOL, "samples": 20}), new_table=True)
    note = view.describe(view.arrange(board.rows())[0])[-1]
    assert "the teacher's 50-step sampling" in note and "is the ratio measured in that same run" in note
    alone = Leaderboard(tmp_path / "c.sqlite")
    alone.add(_row(steps=1, nfe=1, **timed, speedup_reference_steps=4))
    assert "no teacher@50 row in this table" in view.describe(view.arrange(alone.rows())[0])[-1]


# ---- a bench matrix stays inside its folder, and its numbers make sense -------------------------------------------

@pytest.fixture
def bench_world(tmp_path):
    (tmp_path / "gmm.yaml").write_text(yaml.safe_dump(GMM))
    (tmp_path / ".hidden.yaml").write_text(yaml.safe_dump(GMM))
    outside = tmp_path / "elsewhere"
    (outside / "x").mkdir(parents=True)
    (outside / "x/mine.txt").write_text("a user's own file")
    (outside / "user.sqlite").write_bytes(b"")
    (tmp_path / "bench").mkdir()
    return tmp_path


def _escape(case: str, w: Path) -> tuple[dict, str]:
    """(matrix, the field the one-line error must name) for a matrix whose paths would leave `out`."""
    out, cfg, outside = w / "bench", str(w / "gmm.yaml"), w / "elsewhere"
    run = {"config": cfg, "steps": [1]}
    if case == "../x":
        return {"runs": [{**run, "name": "../x"}]}, "runs[0].name"
    if case == "an absolute path":
        return {"runs": [{**run, "name": str(outside / "x")}]}, "runs[0].name"
    if case == "a link out of out":
        (out / "x").symlink_to(outside / "x", target_is_directory=True)
        return {"runs": [{**run, "name": "x"}]}, "runs[0].name"
    if case == "a link made by the seed expansion":
        (out / "x-seed3").symlink_to(outside / "x", target_is_directory=True)
        return {"runs": [{**run, "name": "x", "seeds": [3]}]}, "runs[0].name"
    if case == "a hidden name from the config's file name":
        return {"runs": [{**run, "config": str(w / ".hidden.yaml")}]}, "runs[0].name"
    if case in (".", ".."):
        return {"runs": [{**run, "name": case}]}, "runs[0].name"
    if case == "a line break":
        return {"runs": [{**run, "name": "a\nb"}]}, "runs[0].name"
    if case == "a grids folder linked out":
        (out / "grids").symlink_to(outside, target_is_directory=True)
        return {"runs": [{**run, "name": "ok"}]}, "out"
    if case == "a grid file linked out":
        (out / "grids").mkdir()
        (out / "grids/ok-1steps.png").symlink_to(outside / "x/mine.txt")
        return {"runs": [{**run, "name": "ok"}]}, "out"
    if case == "a reference linked out":
        (out / "references").mkdir()
        (out / "references/0123.safetensors").symlink_to(outside / "x/mine.txt")
        return {"runs": [{**run, "name": "ok"}]}, "out"
    if case == "the default leaderboard linked out":
        (out / "leaderboard.sqlite").symlink_to(outside / "user.sqlite")
        return {"runs": [{**run, "name": "ok"}]}, "leaderboard"
    if case == "a run's grids named like a teacher's":
        return {"teachers": [{"source": "builtin:digits-sdxl", "steps": [1]}],
                "runs": [{**run, "name": "teacher-digits-sdxl"}]}, "runs[0].name"
    if case == "out is a file":
        (w / "a-file").write_text("not a folder")
        return {"out": str(w / "a-file"), "runs": [{**run, "name": "ok"}]}, "out"
    raise AssertionError(case)


ESCAPES = ["../x", "an absolute path", "a link out of out", "a link made by the seed expansion",
           "a hidden name from the config's file name", ".", "..", "a line break", "a grids folder linked out",
           "a grid file linked out", "a reference linked out", "the default leaderboard linked out",
           "a run's grids named like a teacher's", "out is a file"]


@pytest.mark.parametrize("case", ESCAPES)
def test_a_bench_path_that_leaves_out_is_refused_before_any_work(bench_world, case, capsys):
    spec, field = _escape(case, bench_world)
    matrix = bench_world / "m.yaml"
    matrix.write_text(yaml.safe_dump({"out": str(bench_world / "bench"), **spec}))
    before = tree_digest(bench_world)
    assert cli.main(["bench", str(matrix)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (f"'{field}'" in err or err.startswith(f"error: {field} ")), err
    assert tree_digest(bench_world) == before


def test_a_plain_name_passes(bench_world):
    (bench_world / "bench/ok").mkdir()  # a run folder of its own, from an earlier bench
    matrix = bench_world / "m.yaml"
    matrix.write_text(yaml.safe_dump({"out": str(bench_world / "bench"), "runs": [
        {"config": str(bench_world / "gmm.yaml"), "name": "ok", "steps": [1]},
        {"config": str(bench_world / "gmm.yaml"), "name": "lcm (rank 4), v2", "steps": [1]}]}))
    _, configs = bench.load_matrix(matrix)
    assert configs["ok"].train.output_dir == str(bench_world / "bench/ok")
    assert configs["lcm (rank 4), v2"].train.output_dir == str(bench_world / "bench/lcm (rank 4), v2")


TEACHER = {"source": "builtin:digits-sdxl"}
RUN = {"config": "no/such.yaml", "name": "r"}  # never read: range checks come first


@pytest.mark.parametrize("raw, field, allowed", [
    ({"teachers": [{**TEACHER, "guidance_scale": 0.5}]}, "teachers[0].guidance_scale", ">= 1"),
    ({"teachers": [{**TEACHER, "guidance_scale": 1e9}]}, "teachers[0].guidance_scale", "<= 100"),
    ({"teachers": [{**TEACHER, "guidance_scale": True}]}, "teachers[0].guidance_scale", "expected float"),
    ({"runs": [{**RUN, "guidance_scale": 0.5}]}, "runs[0].guidance_scale", ">= 1"),
    ({"runs": [{**RUN, "guidance_scale": -1}]}, "runs[0].guidance_scale", ">= 1"),
    ({"teachers": [{**TEACHER, "steps": [4, 1001]}]}, "teachers[0].steps[1]", "<= 1000"),
    ({"runs": [{**RUN, "steps": [2000]}]}, "runs[0].steps[0]", "<= 1000"),
    ({"teachers": [{**TEACHER, "resolution": 12}]}, "teachers[0].resolution", "a multiple of 8"),
    ({"teachers": [{**TEACHER, "resolution": 65536}]}, "teachers[0].resolution", "<= 4096"),
    ({"teachers": [{**TEACHER, "width": 20}]}, "teachers[0].width", "a multiple of 8"),
    ({"teachers": [{**TEACHER, "source": ""}]}, "teachers[0].source", "non-empty"),
    ({"num_per_prompt": 10**7}, "num_per_prompt", "<= 10000"),
    ({"seed": 2**63}, "seed", "<="),
    ({"seeds": [2**64]}, "seeds[0]", "<="),
    ({"runs": [{**RUN, "seeds": [-1]}]}, "runs[0].seeds[0]", ">= 0"),
    ({"teacher_reference_steps": 5000}, "teacher_reference_steps", "<= 1000"),
    ({"timing": {"reference_steps": 0}}, "timing.reference_steps", ">= 1"),
    ({"timing": {"reference_steps": 1001}}, "timing.reference_steps", "<= 1000"),
    ({"timing": {"batch_size": 10**6}}, "timing.batch_size", "<= 1024"),
    ({"timing": {"repeats": 10**9}}, "timing.repeats", "<= 10000"),
    ({"timing": {"warmup": 0}}, "timing.warmup", ">= 1"),
    ({"timing": {"threads": 10**6}}, "timing.threads", "<= 1024"),
    ({"out": ""}, "out", "non-empty"),
    ({"runs": [{**RUN, "name": "x" * 200}]}, "runs[0].name", "at most 150 bytes"),
])
def test_every_number_of_a_matrix_is_range_checked(tmp_path, raw, field, allowed):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"teachers": [TEACHER], **raw}))
    with pytest.raises(ConfigError) as e:
        bench.load_matrix(path)
    assert e.value.field == field and allowed in str(e.value), str(e.value)


def test_a_half_guidance_is_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "b"), "teachers": [{**TEACHER, "guidance_scale": 0.5}]}))
    before = tree_digest(tmp_path)
    assert cli.main(["bench", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'teachers[0].guidance_scale' has bad value 0.5" in err
    assert tree_digest(tmp_path) == before and not (tmp_path / "b").exists()


# ---- each row once: a resumed bench, an edited bench ----------------------------------------------------------------

def _teacher_matrix(tmp_path: Path, **changes) -> Path:
    """The smallest bench: one builtin teacher at one step, one sample per prompt, no teacher-reference FID."""
    spec = {"out": str(tmp_path / "bench"), "num_per_prompt": 1, "teacher_reference_steps": 0,
            "timing": {"repeats": 10, "batch_size": 1, "reference_steps": 1},
            "teachers": [{"source": "builtin:digits-sdxl", "steps": [1]}], **changes}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _count(db: Path) -> int:
    return sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0]


def test_a_bench_killed_between_row_and_record_resumes_without_a_second_row(tmp_path, monkeypatch):
    matrix, db = _teacher_matrix(tmp_path), tmp_path / "bench/leaderboard.sqlite"

    def killed(self, key):  # the process dies right after the row is stored, before bench_done.json records it
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(bench._Done, "add", killed)
        with pytest.raises(KeyboardInterrupt):
            bench.run(matrix, log=lambda *a, **k: None)
    assert _count(db) == 1 and not (tmp_path / "bench/bench_done.json").exists()
    said = []
    page = bench.run(matrix, log=said.append)
    assert _count(db) == 1 and not any("baselines" in s for s in said)  # found by its key: nothing redone
    grid = tmp_path / "bench/grids/teacher-digits-sdxl-1steps.png"
    assert _b64(view.upscaled(grid.read_bytes(), 16)) in page.read_text()  # the grid bench wrote embeds, enlarged

    # An edited protocol re-evaluates, as a table of its own; the same matrix again adds nothing.
    matrix = _teacher_matrix(tmp_path, num_per_prompt=2)
    bench.run(matrix, log=said.append)
    rows = Leaderboard(db).rows("id")
    assert len(rows) == 2 and len({r["protocol_id"] for r in rows}) == 2
    assert [json.loads(r["protocol"])["samples"] for r in rows] == [10, 20]
    assert json.loads(rows[1]["extra"])["speedup_reference_steps"] == 1
    bench.run(matrix, log=said.append)
    assert _count(db) == 2
    done = json.loads((tmp_path / "bench/bench_done.json").read_text())
    assert sorted(done) == sorted(json.loads(r["extra"])["row_key"] for r in rows)  # the record caught up


def test_the_leaderboard_adds_a_keyed_row_once(tmp_path):
    board = Leaderboard(tmp_path / "b.sqlite")
    first = board.add(_row(), key="k1")
    assert board.add(_row(fid=9.0), key="k1") == first and board.add(_row(), key="k2") != first
    assert _count(tmp_path / "b.sqlite") == 2 and board.keys() == {"k1", "k2"}
    board.db.execute("UPDATE rows SET extra = 'not json' WHERE id = ?", (first,))  # a damaged row has no key
    assert board.keys() == {"k2"}


@pytest.mark.parametrize("edit", [
    {"num_per_prompt": 2}, {"seed": 1}, {"teacher_reference_steps": 4}, {"prompts": "PROMPTS"},
    {"timing": {"repeats": 11, "batch_size": 1, "reference_steps": 1}},
    {"timing": {"repeats": 10, "batch_size": 1, "reference_steps": 2}},
    {"teachers": [{"source": "builtin:digits-sdxl", "steps": [1], "guidance_scale": 3.0}]},
    {"teachers": [{"source": "builtin:digits-sdxl", "steps": [1], "resolution": 24}]},
    {"bootstrap": 100}, {"sizes": [{"size": [16, 32]}]},
])
def test_the_done_key_covers_every_setting_of_a_row(tmp_path, edit):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 2\n")
    edit = {k: (str(prompts) if v == "PROMPTS" else v) for k, v in edit.items()}

    def key(**changes):
        matrix, _ = bench.load_matrix(_teacher_matrix(tmp_path, **changes))
        b = bench._Bench(matrix, log=lambda *a: None)
        t = matrix.teachers[0]
        return b.key(bench.teacher_label(t.source), bench.teacher_config(t), 1, t.guidance_scale, True, b.shapes[0])

    assert key() == key() and key() != key(**edit)
