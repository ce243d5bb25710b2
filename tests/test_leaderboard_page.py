"""The leaderboard page as a person reads it: sample grids enlarged without smoothing, labels of off-axis values that
do not overlap, wide interval bars cut at the axis with a mark, per-seed points, columns only where some row has a
value, and a description of each table's protocol that names every field it records."""
import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from distill import leaderboard_view as view
from distill.evaluation import write_grid
from distill.leaderboard import Leaderboard

PROTOCOL = {"samples": 1000, "num_prompts": 10, "prompts": "p10", "reference": "digits", "reference_size": 1797,
            "extractor": "distill-digits", "extractor_weights": None, "resolution": 16, "eval_seeds": [0],
            "bootstrap": 200, "prompt_examples": [f"a handwritten digit {k}" for k in range(10)]}
TEACHER = "builtin:digits-sdxl"


def _row(method, steps, fid, half=0.15, adherence=0.97, **kw):
    return {"teacher": TEACHER, "method": method, "student": "-" if method == "teacher" else "lora", "steps": steps,
            "nfe": 2 * steps if method == "teacher" else steps, "fid": fid, "fid_lo": max(0.0, fid - half),
            "fid_hi": fid + half, "adherence": adherence, "adherence_lo": adherence - 0.01,
            "adherence_hi": min(1.0, adherence + 0.01), "protocol": dict(PROTOCOL), **kw}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A teacher at 50, 4 and 1 steps (the 1-step one far off the FID scale), two methods, and LADD over three
    training seeds that disagree widely; 16-px sample grids written by distill's own writer beside the file."""
    home = tmp_path_factory.mktemp("board")
    torch.manual_seed(0)
    grid = write_grid(torch.rand(10, 3, 16, 16) * 2 - 1, 1, home / "eval" / "consistency-4steps.png")
    b = Leaderboard(home / "b.sqlite")
    for steps, fid in [(50, 2.25), (4, 2.66), (1, 18.7)]:
        b.add(_row("teacher", steps, fid))
    b.add(_row("consistency", 4, 1.96, grid=str(grid)))
    b.add(_row("add", 1, 1.50))
    for seed, (fid, adh) in enumerate([(13.6, 0.43), (3.3, 0.91), (4.8, 0.94)]):
        b.add(_row("ladd", 1, fid, half=0.5, adherence=adh, seed=seed, recipe="ladd"))
    return home, grid, b.rows()


def _images(html: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(src) for alt, src in
            re.findall(r"<img alt='([^']*)'[^>]* src='data:image/png;base64,([^']+)'", html)}


def test_embedded_grids_are_enlarged_blockwise_to_at_least_64_px_a_sample(board):
    home, grid, rows = board
    html = view.page(rows, grid_roots=[home])
    (png,) = [data for alt, data in _images(html).items() if "consistency (lora), 4 steps" in alt]
    small = np.asarray(Image.open(grid).convert("RGB"))
    big = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert small.shape[0] == 16 + 4 and big.shape[:2] == (4 * small.shape[0], 4 * small.shape[1])  # 16 px -> 64
    blocks = big.reshape(small.shape[0], 4, small.shape[1], 4, 3)
    assert (blocks == small[:, None, :, None, :]).all()  # every source pixel a uniform 4x4 block of its value
    assert f"width='{big.shape[1]}' height='{big.shape[0]}'" in html  # shown at its own size, not squeezed
    assert view.upscaled(grid.read_bytes(), 64) == grid.read_bytes()  # already big enough: left as it is
    assert view.sample_side("16x32", (0, 0)) == 16 and view.sample_side(None, (20, 182)) == 16


def test_labels_of_off_axis_values_never_overlap():
    # Five values on the top edge at two NFEs a few points apart, two on the bottom edge: every box is disjoint.
    anchors = [(50, 300, 1), (50, 300, 1), (53, 300, 1), (80, 300, 1), (81, 300, 1), (50, 20, -1), (52, 20, -1)]
    sizes = [(38, 9), (30, 9), (45, 11), (38, 9), (20, 9), (38, 9), (38, 9)]
    boxes = view.place_labels(anchors, sizes)
    for i, a in enumerate(boxes):
        assert a[2] - a[0] == pytest.approx(sizes[i][0]) and a[3] - a[1] == pytest.approx(sizes[i][1])
        for b in boxes[i + 1:]:
            assert not view.overlaps(a, b), (a, b)
    assert boxes[0][3] <= 300 and boxes[5][1] >= 20  # inside the axes: below the top edge, above the bottom one
    assert view.place_labels([(0, 100, 1)], [(10, 5)]) == [(4.0, 91.0, 14.0, 96.0)]  # alone: beside its mark


def test_wide_seed_intervals_are_cut_at_the_axis_and_each_seed_is_drawn(board):
    _, _, rows = board
    (t,) = view.arrange(rows)
    fid = view.panel(t.groups[0], "fid", zero=True, outliers=True)
    ladd = fid.lines["ladd (lora)"][0]
    assert [p.value for p in fid.seeds["ladd (lora)"]] == pytest.approx([13.6, 3.3, 4.8])  # one point per seed
    assert [p.x for p in fid.seeds["ladd (lora)"]] == sorted(p.x for p in fid.seeds["ladd (lora)"])
    lo, hi = fid.limits
    assert lo == 0 and hi < 18.7 and ladd.clipped == ("hi",) and ladd.hi == hi  # the mean's bar continues above
    off = {(label, p.value) for label, p, _ in fid.off_chart()}
    assert ("teacher (DDIM)", 18.7) in off and ("ladd (lora)", 13.6) in off  # drawn on the edge, value written
    add = fid.lines["add (lora)"][0]
    assert add.clipped == () and (add.lo, add.hi) == pytest.approx((1.35, 1.65))  # a narrow bar is whole
    adherence = view.panel(t.groups[0], "adherence", 100, ceiling=100.0)
    ladd = adherence.lines["ladd (lora)"][0]
    assert "lo" in ladd.clipped and ladd.lo == adherence.limits[0] > 0  # the t-interval of 3 seeds reaches below 0
    assert min(p.y for p in adherence.seeds["ladd (lora)"]) == pytest.approx(43.0)  # every seed still in view
    assert view.plot_quality_vs_nfe(rows, t)[:8] == b"\x89PNG\r\n\x1a\n"


NEW = {"precision": (0.775, 0.749, 0.801), "recall": (0.692, 0.67, 0.714), "diversity": (0.316, 0.304, 0.328),
       "clip_score": (27.4, 27.1, 27.7)}


def test_columns_show_only_where_a_row_has_the_figure_with_its_interval():
    base = [_row("teacher", 50, 2.25, id=1, protocol_id="p"), _row("consistency", 4, 1.96, id=2, protocol_id="p")]
    headers = view.arrange(base)[0].columns
    assert not {"precision ↑ (%)", "recall ↑ (%)", "diversity ↑", "CLIP score ↑", "KID ↓", "ms / image ↓",
                view.HELD_OUT} & set(headers)
    assert {"FID ↓", "adherence ↑ (%)", "train steps"} <= set(headers)
    some = {k: v for k, (v, lo, hi) in NEW.items()} | {f"{k}_{e}": x for k, t in NEW.items()
                                                       for e, x in zip(("lo", "hi"), t[1:])}
    rows = [base[0], {**base[1], **some}]
    (t,) = view.arrange(rows)
    assert {"precision ↑ (%)", "recall ↑ (%)", "diversity ↑", "CLIP score ↑"} <= set(t.columns)
    text = view.table(rows)
    assert "77.5 ± 2.6" in text and "69.2 ± 2.2" in text and "0.316 ± 0.012" in text and "27.40 ± 0.30" in text
    html = view.page(rows)
    assert "<th colspan='2' scope='colgroup'>coverage</th>" in html  # recall and diversity under one heading
    assert "Kynkäänniemi et al. 2019" in html and "Hessel et al. 2021" in html  # their intervals are said
    # The same figures kept in a row's JSON `extra` (a file from before the columns existed) show the same.
    (old,) = view.arrange([base[0], {**base[1], "extra": json.dumps(some)}])
    assert old.columns == t.columns


FULL = {**PROTOCOL, "reference": "images", "reference_path": "data/real-digits", "reference_size": 1000,
        "reference_digest": "d" * 64, "extractor": "inception-v3-compat",
        "extractor_weights": {"name": "pt_inception.safetensors", "sha256": "a" * 64},
        "preprocessing": {"resize": "PIL bicubic", "size": [299, 299], "center_crop": True},
        "clip": {"name": "clip-tiny", "sha256": "c" * 64}, "prompt_subset": {"num_prompts": 50, "prompt_seed": 7},
        "diversity_features": "clip image", "prc_neighbours": 3, "teacher_reference_steps": 50,
        "teacher_reference_guidance": 5.0, "eval_seeds": [0, 1], "future_field": {"kept": "as stored"}}


def test_each_table_says_what_was_measured_naming_every_recorded_field():
    rows = [{**_row("teacher", 50, 2.25, id=1), "protocol_id": "full", "protocol": FULL},
            {**_row("teacher", 50, 2.5, id=2), "protocol_id": "old", "protocol": {"samples": 200}}]
    facts = {label: text for label, text, _ in view.protocol_facts(FULL)}
    html, md = view.page(rows), view.markdown(rows)
    named = ["1,000 generated images", "p10", "50 prompts (seed 7)", "0, 1", "16 px", "`images`", "1,000 images",
             "data/real-digits", "d" * 64, "inception-v3-compat", "pt_inception.safetensors (sha256 " + "a" * 64,
             "resized to 299x299 px (PIL bicubic)", "cropped to the central square", "clip-tiny (sha256 " + "c" * 64,
             "k = 3", "clip image features", "200 resamples", "50-step samples (guidance 5.0)",
             '{"kept": "as stored"}']
    for value in named:
        assert any(value in text for text in facts.values()), value
        assert view._h(value).replace("`", "") in html.replace("<code>", "").replace("</code>", ""), value
        assert view._md(value) in md, value
    assert all(f"<li>{view._h(p)}</li>" in html for p in FULL["prompt_examples"])  # every example, folded
    assert "guidance" not in facts and "sampler" not in facts  # a row's own, not the table's
    assert [label for label, _, _ in view.protocol_facts({"samples": 200})] == ["samples"]  # an old record
    old = md[md.index("## Protocol old"):]
    assert "None" not in old and "Measured on 200 generated samples per row." in old
