"""`distill bench` end to end on a tiny teacher: baselines and a trained run land in a real SQLite leaderboard,
the pages carry a matplotlib plot and sample grids, and a second invocation redoes nothing. The matrix loader
range-checks every field and expands training seeds into runs of their own."""
import json
import sqlite3

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.bench import load_matrix, seedless_hash
from distill.config import ConfigError
from distill.leaderboard import Leaderboard


def _field(row: dict, name: str):
    """A row's value whether the leaderboard keeps it in a column or in the JSON `extra`."""
    return row[name] if name in row else json.loads(row.get("extra") or "{}").get(name)


def test_bench_trains_evaluates_writes_pages_and_resumes(tmp_path, tiny_sdxl_dir, cli):
    run_cfg = tmp_path / "lcm.yaml"
    run_cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "lora", "lora_rank": 4},
        "method": {"name": "consistency"}, "data": {"kind": "digits", "batch_size": 2},
        "train": {"max_steps": 2, "checkpoint_every": 1}}))
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(yaml.safe_dump({
        "out": str(tmp_path / "bench"), "num_per_prompt": 1, "teacher_reference_steps": 4, "seeds": [1],
        "timing": {"repeats": 10, "batch_size": 1, "reference_steps": 4},
        "teachers": [{"source": str(tiny_sdxl_dir), "resolution": 32, "guidance_scale": 3.0, "steps": [4, 1]}],
        "runs": [{"config": str(run_cfg), "name": "lcm", "steps": [2, 1]}]}))
    first = cli("bench", matrix)
    assert "training consistency (lora)" in first.stdout and "leaderboard.html in a browser" in first.stdout
    assert "10 interleaved rounds of batch 1" in first.stdout
    db = tmp_path / "bench/leaderboard.sqlite"
    rows = sqlite3.connect(db).execute("SELECT method, steps, nfe, fid, fid_teacher, train_steps FROM rows "
                                       "ORDER BY id").fetchall()
    assert [r[:3] for r in rows] == [("teacher", 4, 8), ("teacher", 1, 2), ("consistency", 2, 2),
                                     ("consistency", 1, 1)]
    assert all(r[3] > 0 and r[4] is not None for r in rows) and rows[-1][5] == 2
    full = sorted(Leaderboard(db).rows("id"), key=lambda r: r["id"])
    assert _field(full[0], "speedup") == 1.0  # the teacher's 4-step row is the timing reference itself
    assert all(r["ms_per_image"] > 0 and _field(r, "ms_iqr") >= 0 and _field(r, "timing_repeats") == 10
               and _field(r, "device") == "CPU" and _field(r, "threads") >= 1 for r in full)
    assert [_field(r, "seed") for r in full] == [None, None, 1, 1]  # the training seed; teachers have none
    page = (tmp_path / "bench/leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # the plot and four grids
    assert (tmp_path / "bench/quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "bench/grids").glob("*.png"))) == 4
    assert (tmp_path / "bench/lcm-seed1/student").exists()

    # The resumptions run in this process (the command line was the first call's subject): what they log is kept
    from distill import bench

    def again() -> str:
        lines = []
        bench.run(matrix, log=lines.append)
        return "\n".join(lines)

    assert "training" not in again()  # nothing left to do: no training, no new rows
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 4

    # A new step count resumes the matrix: its row compares with the teacher samples kept on disk, not new ones.
    [reference] = (tmp_path / "bench/references").glob("*.safetensors")
    made = reference.stat().st_mtime_ns
    spec = yaml.safe_load(matrix.read_text())
    spec["teachers"][0]["steps"] = [4, 2, 1]
    matrix.write_text(yaml.safe_dump(spec))
    again()
    rows = sqlite3.connect(db).execute("SELECT steps, fid_teacher FROM rows ORDER BY id").fetchall()
    assert len(rows) == 5 and rows[-1][0] == 2 and rows[-1][1] > 0
    assert list((tmp_path / "bench/references").glob("*.safetensors")) == [reference]
    assert reference.stat().st_mtime_ns == made

    # A changed recipe is trained afresh: the run folder's checkpoints (another recipe's) are moved aside, not resumed
    raw = yaml.safe_load(run_cfg.read_text())
    raw["train"]["learning_rate"] = 3e-4
    run_cfg.write_text(yaml.safe_dump(raw))
    assert "seed 1, moving aside the folder's run of another recipe" in again()
    [old] = (tmp_path / "bench").glob("lcm-seed1.old-*")
    weights = [load_file(run / "checkpoints/step-00000002/weights.safetensors")
               for run in (old, old.with_name("lcm-seed1"))]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # trained again, at the new rate
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 7


TEACHER = {"source": "builtin:digits-sdxl"}
RUN = {"config": "no/such.yaml"}  # never read: range checks come first


@pytest.mark.parametrize("raw, field, allowed", [
    ({"num_per_prompt": -3}, "num_per_prompt", ">= 1"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"teacher_reference_steps": -1}, "teacher_reference_steps", ">= 0"),
    ({"seeds": [0, 1, 1]}, "seeds", "must not repeat"),
    ({"seeds": [0, -2]}, "seeds[1]", ">= 0"),
    ({"seeds": []}, "seeds", "non-empty list"),
    ({"timing": {"repeats": 3}}, "timing.repeats", ">= 10"),
    ({"timing": {"batch_size": 0}}, "timing.batch_size", ">= 1"),
    ({"timing": {"threads": 0}}, "timing.threads", ">= 1"),
    ({"teachers": [{**TEACHER, "steps": [4, 0]}]}, "teachers[0].steps[1]", ">= 1"),
    ({"teachers": [{**TEACHER, "steps": [4, 4]}]}, "teachers[0].steps", "must not repeat"),
    ({"teachers": [{**TEACHER, "guidance_scale": float("nan")}]}, "teachers[0].guidance_scale", "finite"),
    ({"teachers": [{**TEACHER, "resolution": 0}]}, "teachers[0].resolution", ">= 8"),
    ({"runs": [{**RUN, "steps": []}]}, "runs[0].steps", "non-empty list"),
    ({"runs": [{**RUN, "guidance_scale": float("inf")}]}, "runs[0].guidance_scale", "finite"),
    ({"runs": [{**RUN, "seeds": [1.5]}]}, "runs[0].seeds[0]", "expected int"),
    ({"prompts": "no/such.txt"}, "prompts", "no such prompts file"),
    ({"sizes": [{"size": [16, 12]}]}, "sizes[0].size", "multiple of 8"),
    ({"sizes": [{"size": [16]}]}, "sizes[0].size", "[height, width]"),
    ({"sizes": [{"size": [16, 16], "reference": "cats"}]}, "sizes[0].reference", "allowed"),
    ({"sizes": [{"size": [16, 16]}, {"size": [16, 16]}]}, "sizes", "must not repeat"),
])
def test_matrix_fields_are_range_checked(tmp_path, raw, field, allowed):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"teachers": [TEACHER], **raw}))
    with pytest.raises(ConfigError, match="allowed|must|expected|no such") as e:
        load_matrix(path)
    assert e.value.field == field and allowed in str(e.value)


def test_training_seeds_give_runs_of_their_own(tmp_path):
    run_cfg = tmp_path / "lcm.yaml"
    run_cfg.write_text(yaml.safe_dump({"teacher": {"source": "builtin:digits-sdxl"}, "method": {"name": "consistency"},
                                       "data": {"kind": "digits"}, "train": {"seed": 7}}))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "b"), "seeds": [0, 2], "runs": [
        {"config": str(run_cfg), "name": "a"}, {"config": str(run_cfg), "name": "b", "seeds": [5]}]}))
    matrix, configs = load_matrix(path)
    assert [r.name for r in matrix.runs] == ["a-seed0", "a-seed2", "b-seed5"]
    assert {n: c.train.seed for n, c in configs.items()} == {"a-seed0": 0, "a-seed2": 2, "b-seed5": 5}
    assert configs["a-seed2"].train.output_dir == str(tmp_path / "b/a-seed2")
    assert len({c.hash() for c in configs.values()}) == 3  # one recipe hash per seed ...
    assert len({seedless_hash(c) for c in configs.values()}) == 1  # ... and one recipe without it
    path.write_text(yaml.safe_dump({"runs": [{"config": str(run_cfg)}]}))
    assert {c.train.seed for c in load_matrix(path)[1].values()} == {7}  # no seeds: the config's own


def test_train_only_trains_its_shard_of_the_runs_and_evaluates_nothing(tmp_path, tiny_sdxl_dir, monkeypatch):
    """N processes can train a matrix together (`--train-only --shard K/N`): shard 1/2 trains runs 1, 3, ... and
    adds no row; a run another process is training (its folder locked) is skipped; `eval_only` evaluates what is
    trained and trains nothing; a bad shard is refused in one line."""
    from distill import bench, paths, speed

    monkeypatch.setattr(speed, "MIN_REPEATS", 1)  # the timed pass is not what this test is about
    run_cfg = tmp_path / "denoise.yaml"
    run_cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "lora", "lora_rank": 4},
        "method": {"name": "denoise"}, "data": {"kind": "digits", "batch_size": 2}, "train": {"max_steps": 1}}))
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(yaml.safe_dump({"out": str(tmp_path / "bench"), "seeds": [0, 1, 2], "num_per_prompt": 1,
                                      "teacher_reference_steps": 0, "timing": {"reference_steps": 1, "repeats": 1},
                                      "runs": [{"config": str(run_cfg), "name": "d", "steps": [1]}]}))
    assert bench.run(matrix, train_only=True, shard=(1, 2)) is None
    trained = sorted(p.name for p in (tmp_path / "bench").iterdir() if (p / "student").exists())
    assert trained == ["d-seed1"]
    logs = []
    with paths.lock(tmp_path / "bench/d-seed0", "train.output_dir"):  # as a trainer beside this bench holds it
        bench.run(matrix, log=logs.append, train_only=True, shard=(0, 2))
    assert "[1/3] d-seed0: skipped, another process is training it in" in logs[0]
    trained = sorted(p.name for p in (tmp_path / "bench").iterdir() if (p / "student").exists())
    assert trained == ["d-seed1", "d-seed2"] and not paths.in_use(tmp_path / "bench/d-seed0")
    assert not (tmp_path / "bench/references").exists() and not list((tmp_path / "bench").glob("grids"))
    assert not (tmp_path / "bench/leaderboard.sqlite").exists()  # trainers never open it
    logs = []
    bench.run(matrix, log=logs.append, eval_only=True)  # what is trained is evaluated; d-seed0 stays untrained
    assert "[1/3] d-seed0: not trained yet, skipped (--eval-only)" in logs
    assert not (tmp_path / "bench/d-seed0/student").exists()
    rows = Leaderboard(tmp_path / "bench/leaderboard.sqlite").rows("id")
    assert sorted(_field(r, "seed") for r in rows) == [1, 2]
    for bad in ("2/2", "1", "-1/2", "a/b"):
        with pytest.raises(ConfigError, match="K/N"):
            bench.parse_shard(bad)


def test_a_matrix_with_sizes_measures_each_run_at_the_sizes_it_was_trained_at(tmp_path, tiny_sdxl_dir, monkeypatch):
    """`sizes`: every size is a table of its own with its own reference and prompts; the teacher is measured at each,
    conditioned on the size it makes; a run trained on buckets at each of its buckets (a progressive one with the
    checkpoint of each step count), a one-shape run at its one."""
    from distill import bench, speed
    from teachers.sdxl import SDXLTeacher

    monkeypatch.setattr(speed, "MIN_REPEATS", 1)  # the timed pass is not what this test is about
    targets = []
    sizes_of = SDXLTeacher.with_sizes
    monkeypatch.setattr(SDXLTeacher, "with_sizes", lambda self, cond, original, crop, target: (
        targets.append(tuple(target)), sizes_of(self, cond, original, crop, target))[1])
    base = {"teacher": {"source": str(tiny_sdxl_dir), "resolution": 16}, "student": {"kind": "lora", "lora_rank": 2},
            "method": {"name": "denoise"}, "train": {"max_steps": 1}}
    mixed, pairs = tmp_path / "mixed.yaml", tmp_path / "pairs.yaml"
    mixed.write_text(yaml.safe_dump({
        **base, "method": {"name": "progressive", "params": {"start_steps": 4, "end_steps": 1, "round_steps": 1}},
        "train": {"max_steps": 2}, "data": {"kind": "digit_shapes", "batch_size": 3,
                                            "buckets": [[16, 16], [16, 32], [32, 16]]}}))
    pairs.write_text(yaml.safe_dump({**base, "teacher": {**base["teacher"], "width": 32},
                                     "data": {"kind": "digit_pairs", "batch_size": 2}}))
    spec = {"out": str(tmp_path / "bench"), "teacher_reference_steps": 0, "bootstrap": 5, "num_per_prompt": 1,
            "timing": {"repeats": 1, "batch_size": 1, "reference_steps": 1},
            "sizes": [{"size": [16, 32], "reference": "digit_pairs"}, {"size": [32, 16], "reference": "digit_stacks"}],
            "teachers": [{"source": str(tiny_sdxl_dir), "steps": [1]}],
            "runs": [{"config": str(mixed), "name": "mixed", "steps": [2, 4]},
                     {"config": str(pairs), "name": "pairs", "steps": [1]}]}
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(yaml.safe_dump(spec))
    bench.run(matrix, log=lambda line: None)
    rows = Leaderboard(tmp_path / "bench/leaderboard.sqlite").rows("id")
    measured = sorted((r["method"], json.loads(r["protocol"])["resolution"], r["steps"], r["train_steps"])
                      for r in rows)
    assert measured == [("denoise", "16x32", 1, 1), ("progressive", "16x32", 2, 1), ("progressive", "16x32", 4, 2),
                        ("progressive", "32x16", 2, 1), ("progressive", "32x16", 4, 2), ("teacher", "16x32", 1, 0),
                        ("teacher", "32x16", 1, 0)]  # 2 steps: the first round's checkpoint; 4: the final student
    assert all(_field(r, "samples") == 100 for r in rows)  # each size's own prompts
    assert len({r["protocol_id"] for r in rows}) == 2  # a table per size, shared by everyone measured at it
    assert {(16, 32), (32, 16)} <= set(targets)  # the teacher and the mixed student read each size's conditioning
    grids = sorted(p.name for p in (tmp_path / "bench/grids").iterdir())
    assert "pairs-1steps-16x32.png" in grids and "mixed-4steps-32x16.png" in grids and len(grids) == 7
    bench.run(matrix, log=lambda line: None)  # resumed: nothing left
    assert len(Leaderboard(tmp_path / "bench/leaderboard.sqlite").rows("id")) == 7

    spec["sizes"] = spec["sizes"][1:]
    matrix.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="none of the sizes run pairs trains at \\(16x32\\)") as e:
        load_matrix(matrix)
    assert e.value.field == "sizes"
    # without sizes, every row is measured at its teacher's size: a bucketed run must have trained at it
    del spec["sizes"]
    spec["runs"] = spec["runs"][:1]
    matrix.write_text(yaml.safe_dump(spec))
    load_matrix(matrix)  # 16 x 16 is one of its buckets
    recipe = yaml.safe_load(mixed.read_text())
    recipe["data"]["buckets"] = [[16, 32], [32, 16]]
    mixed.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="is needed for run mixed: its buckets may not hold its teacher's size") as e:
        load_matrix(matrix)
    assert e.value.field == "sizes"
