"""Aspect-ratio buckets: sizes, assignment, the crop and size conditioning, one-bucket batches in a seeded order,
every method on them, exact resume, and the refusals."""
import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import teachers
from distill import buckets, data, digits, runs
from distill.config import DataConfig, TeacherConfig
from distill.errors import ConfigError, DistillError
from distill.trainer import encode_batch, train

# (height, width) of the mixed folder's images: squares, portraits and landscapes, none of a bucket's exact size
SHAPES = [(20, 20), (24, 24), (40, 18), (44, 20), (18, 40), (20, 44)] * 2
SIZES = [[16, 16], [32, 16], [16, 32]]


def mixed_folder(root, shapes=SHAPES):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {i % 10}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_auto_buckets_reproduce_sdxls_list_and_nearest_follows_the_aspect_ratio():
    assert buckets.auto_grid(1024 * 1024, 8) == buckets.auto_grid(1024 * 1024, 16) == 64
    assert buckets.auto_grid(16 * 16, 2) == 2
    sizes = buckets.auto_buckets(1024 * 1024, 64)
    for b in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)]:
        assert b in sizes  # Podell et al. 2023, app. I
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and max(h / w, w / h) <= 4 for h, w in sizes)
    three = [(16, 16), (32, 16), (16, 32)]
    assert [buckets.nearest(three, h, w) for h, w in [(20, 20), (40, 18), (18, 40), (100, 90)]] == [0, 1, 2, 0]
    assert buckets.nearest(three, 20, 12, upscale=False) is None  # covers none: 16 x 16 needs 16 px across
    assert buckets.nearest(three, 30, 17) == 1 and buckets.nearest(three, 30, 17, upscale=False) == 0  # 32 not <= 30
    # one shape at two scales: the largest the image covers, else the smallest (never upscaled past a fitting one)
    two = [(16, 16), (32, 32)]
    assert [buckets.nearest(two, s, s) for s in (20, 32, 40, 8)] == [0, 1, 1, 0]


def test_batches_hold_one_bucket_resume_exactly_and_ranks_split_the_global_batch():
    bucket_of = [0] * 9 + [1] * 7 + [2] * 4
    whole = buckets.BucketBatches(bucket_of, 4, 1, 0, seed=3)
    steps = [b for _, b in zip(range(12), whole)]
    assert whole.per_epoch == 2 + 1 + 1
    epoch = steps[:4]
    assert all(len({bucket_of[i] for i in b}) == 1 and len(b) == 4 for b in steps)
    assert len({i for b in epoch for i in b}) == 16  # no sample twice within an epoch
    assert steps[4:8] != epoch  # the next epoch reshuffles
    assert [b for _, b in zip(range(7), buckets.BucketBatches(bucket_of, 4, 1, 0, 3, start=5))] == steps[5:]
    ranks = [buckets.BucketBatches(bucket_of, 2, 2, r, 3) for r in range(2)]
    assert [a + b for _, a, b in zip(range(12), *ranks)] == steps  # rank r reads slice r of each global batch
    micro = [b for _, b in zip(range(24), buckets.BucketBatches(bucket_of, 2, 1, 0, 3, accumulation=2))]
    assert [a + b for a, b in zip(micro[::2], micro[1::2])] == steps  # and so do one process's micro-steps
    assert whole.starved == {} and buckets.BucketBatches(bucket_of, 8, 1, 0, 3).starved == {1: 7, 2: 4}
    with pytest.raises(DistillError, match="no bucket holds one global batch"):
        buckets.BucketBatches([0, 1, 2], 2, 1, 0, 0)


def test_a_bucket_too_small_for_one_global_batch_or_empty_is_named(tmp_path, capsys):
    ds = data.build(DataConfig(kind="images", path=str(mixed_folder(tmp_path / "imgs", SHAPES[:2] * 3 + SHAPES[2:4])),
                               buckets=SIZES), 16)
    assert [ds.bucket_of.count(b) for b in range(3)] == [6, 2, 0]
    data.batch_sampler(ds, 2, 2, 0, seed=0)
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: bucket 32 x 16 holds 2 samples, fewer than one global batch (4: data.batch_size x processes x "
        "accumulation), so it is never trained on",
        "warning: no sample went to bucket 16 x 32, so it is never trained on"]
    data.batch_sampler(ds, 2, 2, 1, seed=0)  # the other rank says nothing
    assert not capsys.readouterr().err


def test_a_mixed_folder_is_cut_to_its_buckets_with_the_crop_recorded(tmp_path):
    folder = mixed_folder(tmp_path / "imgs")
    ds = data.build(DataConfig(kind="images", path=str(folder), buckets=SIZES), 16)
    assert ds.bucket_of == [0, 0, 1, 1, 2, 2] * 2
    for i in (3, 5):  # 44 x 20 and 20 x 44: cut 1 px off the long side
        item, (h, w) = ds[i], SHAPES[i]
        bh, bw = SIZES[ds.bucket_of[i]]
        assert item["image"].shape == (3, bh, bw) and item["original_size"].tolist() == [h, w]
        # the recorded crop is where the image was cut from the resized original
        img = Image.open(folder / f"{i}.png")
        scale = max(bh / h, bw / w)
        rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
        top, left = item["crop"].tolist()
        assert (top, left) == ((rh - bh) // 2, (rw - bw) // 2) and (top, left) != (0, 0)
        cut = np.asarray(img.resize((rw, rh), Image.BICUBIC), np.float32)[top:top + bh, left:left + bw]
        torch.testing.assert_close(item["image"], torch.from_numpy(cut / 127.5 - 1).permute(2, 0, 1))


def test_image_sizes_are_read_once_and_again_only_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    folder = mixed_folder(tmp_path / "imgs")
    cfg = DataConfig(kind="images", path=str(folder), buckets=SIZES)
    reads = []
    headers = data.ImageFolder.headers
    monkeypatch.setattr(data.ImageFolder, "headers", lambda self: reads.append(1) or headers(self))
    first = data.build(cfg, 16).bucket_of
    again = data.build(cfg, 16).bucket_of  # a resumed run, a second process, or another run on these files
    assert first == again == [0, 0, 1, 1, 2, 2] * 2 and len(reads) == 1
    Image.new("RGB", (20, 40)).save(folder / "0.png")  # 0.png turns from a square into a portrait
    assert data.build(cfg, 16).bucket_of[0] == 1 and len(reads) == 2
    indexes = sorted((tmp_path / "cache/image_sizes").glob("*.json"), key=lambda f: f.stat().st_mtime)
    assert len(indexes) == 2
    indexes[-1].write_text("{")  # a torn index is read past
    assert data.build(cfg, 16).bucket_of == [1, 0, 1, 1, 2, 2] + [0, 0, 1, 1, 2, 2] and len(reads) == 3


def test_sdxl_time_ids_carry_each_images_original_size_and_crop(tmp_path, tiny_sdxl_dir):
    import teachers
    from distill.config import TeacherConfig

    teacher = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=16))
    ds = data.build(DataConfig(kind="images", path=str(mixed_folder(tmp_path / "imgs")), buckets=SIZES), 16, teacher)
    raw = data.collate([ds[i] for i in (2, 3)])  # two portraits
    batch = encode_batch(raw, teacher, torch.Generator().manual_seed(0))
    want = [[*SHAPES[i], *ds[i]["crop"].tolist(), 32, 16] for i in (2, 3)]
    assert batch["cond"].pos["time_ids"].tolist() == want == batch["cond"].neg["time_ids"].tolist()
    assert batch["latents"].shape[-2:] == (16, 8)  # the tiny VAE's factor 2
    x = torch.randn(2, 4, 16, 8)
    plain = teacher.encode_prompts(raw["prompt"])
    assert not torch.allclose(teacher.predict(x, 500, batch["cond"])[0], teacher.predict(x, 500, plain)[0])


METHODS = {
    "denoise": {},
    "consistency": {"guidance_min": 2.0, "guidance_max": 2.0},
    "progressive": {"start_steps": 4, "end_steps": 2, "round_steps": 1},
    "add": {"student_steps": 2, "feature_net": "vit_tiny_patch16_224", "feature_size": 32},
    "ladd": {"student_steps": 2},
    "dmd2": {"student_steps": 2},
    "scm": {"guidance_min": 2.0, "guidance_max": 2.0},
    "rcm": {"warmup": 0},
}


def bucketed_cfg(tmp_path, teacher_dir, method: str, out: str, steps: int = 2):
    folder = tmp_path / "imgs" if (tmp_path / "imgs").exists() else mixed_folder(tmp_path / "imgs")
    return runs.parse_config({
        "teacher": {"source": str(teacher_dir), "resolution": 16}, "student": {"kind": "lora", "lora_rank": 2},
        "method": {"name": method, "params": METHODS[method]},
        "data": {"kind": "images", "path": str(folder), "batch_size": 2, "buckets": SIZES},
        "train": {"output_dir": str(tmp_path / out), "max_steps": steps, "checkpoint_every": 2, "log_every": 1}})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_bucketed_batches(tmp_path, tiny_sdxl_dir, method):
    cfg = bucketed_cfg(tmp_path, tiny_sdxl_dir, method, "run", steps=3)
    ds = data.build(cfg.data, 16)
    first = [b for _, b in zip(range(3), data.batch_sampler(ds, 2, 1, 0, cfg.train.seed))]
    assert len({ds.bucket_of[b[0]] for b in first}) >= 2  # the three steps see more than one shape
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))


def test_sd3_trains_on_bucketed_batches(tmp_path, tiny_sd3_dir):
    method = train(bucketed_cfg(tmp_path, tiny_sd3_dir, "dmd2", "run", steps=3))
    assert (tmp_path / "run/checkpoints/step-00000003").is_dir()
    # sizes past the MMDiT's position table are refused up front, as a field, not mid-run by diffusers
    t = method.teacher
    most = t.backbone.config.pos_embed_max_size * t.size_multiple
    t.check_sizes([(16, most)], "data.buckets")
    with pytest.raises(ConfigError, match=f"position table reaches {most} px a side"):
        t.check_sizes([(16, most + t.size_multiple)], "data.buckets")


def test_a_bucketed_student_samples_at_a_trained_size(tmp_path, tiny_sdxl_dir):
    teacher = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=16))
    cfg = bucketed_cfg(tmp_path, tiny_sdxl_dir, "consistency", "run")
    assert data.sample_size(cfg, teacher) == (16, 16)  # the teacher's own size, trained
    cfg.data.buckets = [[32, 16], [16, 32], [32, 32]]
    assert data.sample_size(cfg, teacher) == (32, 32)  # not trained: the trained size of its aspect ratio
    cfg.sample.height = 16
    with pytest.raises(ConfigError, match="sample.height.*samples at one of them: 32 x 16, 16 x 32, 32 x 32"):
        data.sample_size(cfg, teacher)
    cfg.sample.height, cfg.sample.width = None, 48  # the refusal names the field that was set
    with pytest.raises(ConfigError, match="sample.width"):
        data.sample_size(cfg, teacher)
    cfg.sample.width = None
    cfg.data.buckets = None
    assert data.sample_size(cfg, teacher) == (16, 16)  # one trained size: sample.* as given


def test_resume_across_bucket_boundaries_is_bit_identical(tmp_path, tiny_sdxl_dir):
    train(bucketed_cfg(tmp_path, tiny_sdxl_dir, "dmd2", "whole", steps=6))
    cfg = bucketed_cfg(tmp_path, tiny_sdxl_dir, "dmd2", "parts", steps=6)
    train(cfg, stop_after=3)
    train(cfg, resume="latest")
    for name in ("weights.safetensors",):
        whole = load_file(tmp_path / "whole/checkpoints/step-00000006" / name)
        parts = load_file(tmp_path / "parts/checkpoints/step-00000006" / name)
        assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_bucket_refusals_are_one_line(tmp_path, tiny_sdxl_dir, cli, capsys):
    from distill import cli as command_line

    folder = mixed_folder(tmp_path / "imgs", SHAPES[:2] + [(10, 10)])
    base = ["train", "experiments/lcm_digits_sdxl.yaml", f"teacher.source={tiny_sdxl_dir}", "data.kind=images",
            f"data.path={folder}", f"train.output_dir={tmp_path / 'run'}"]
    cases = [("data.buckets=[]", "name at least one"),
             ("data.buckets=[[16,17]]", "multiples of 2 px"),
             ("data.buckets=[[16,16]] data.upscale=false", "imgs/2.png (10 x 10 px) covers no bucket"),
             ("data.buckets=[[16,16],[16,32]] sample.height=32", "samples at one of them: 16 x 16, 16 x 32"),
             ("data.buckets=[[16,16]] data.kind=digits", "needs data.kind images, shards, latents")]
    proc = cli(*base, *cases[2][0].split(), check=False)  # one in a real process; the others in this one
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and cases[2][1] in proc.stderr
    for overrides, message in cases:
        code = command_line.main(base + overrides.split())
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (overrides, err)
    assert not (tmp_path / "run").exists()


# Plain diffusers in a fresh interpreter: the exported LoRA, the export's own call, at each trained size.
SIZED = """
import json, sys
import numpy as np, torch
import diffusers

teacher, export, out_dir = sys.argv[1:4]
facts = json.load(open(f"{export}/distill_export.json"))
pipe = diffusers.DiffusionPipeline.from_pretrained(teacher)
pipe.scheduler = getattr(diffusers, facts["scheduler"]).from_config(pipe.scheduler.config, **facts["scheduler_config"])
pipe.load_lora_weights(export)
step = pipe.scheduler.step
for h, w in facts["sizes"]:
    call = {**facts["pipeline_call"], "height": h, "width": w}
    g = torch.Generator().manual_seed(11)  # FluxPipeline leaves it out of the step's noise; distill.load passes it
    pipe.scheduler.step = lambda *a, **k: step(*a, **{"generator": g, **k})
    out = pipe(PROMPTS, output_type="np", generator=g, **call).images
    np.save(f"{out_dir}/{h}x{w}.npy", out)
"""


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from teachers import tiny

    return tiny.build("tiny-flux", tmp_path_factory.mktemp("teachers") / "tiny-flux")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_bucketed_export_samples_at_each_trained_size_as_distill_does(tmp_path, family, request):
    """SDXL conditions on each size; FLUX.1 shifts its times by each size's token count, in training and in the
    pipeline's call alike, so one export's sigmas serve every size."""
    import subprocess
    import sys

    from distill.evaluation import sample_images
    from distill.exporting import export

    teacher_dir = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = bucketed_cfg(tmp_path, teacher_dir, "consistency", "run", steps=2)
    train(runs.parse_config(cfg.to_dict(), ["train.learning_rate=1e-2", "sample.steps=2"]))
    out = export(tmp_path / "run", tmp_path / "export", ["lora"])
    facts = json.loads((out / "distill_export.json").read_text())
    assert facts["sizes"] == SIZES and "height x width 16 x 16, 32 x 16, 16 x 32" in (out / "README.md").read_text()
    assert "original_size" not in facts["pipeline_call"]  # the pipeline's own size conditioning is the student's
    prompts = ["a handwritten digit 3", "a handwritten digit 8"]
    proc = subprocess.run([sys.executable, "-c", f"PROMPTS = {prompts!r}\n" + SIZED, str(teacher_dir), str(out),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run_cfg, method, _ = runs.load_run(tmp_path / "run")
    for h, w in SIZES:
        ours, _ = sample_images(method, prompts, 2, 11, run_cfg.sample.guidance_scale, teacher=False, size=(h, w),
                                sized=True)
        theirs = np.load(tmp_path / f"{h}x{w}.npy")
        assert theirs.shape == (2, h, w, 3)
        assert np.abs(theirs - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-5, (h, w)
    if family == "flux":  # a 32 x 16 batch trains on the grid its own token count shifts, not 16 x 16's
        teacher, seen = method.teacher, []
        predict = teacher.predict
        teacher.predict = lambda x, t, *a, **k: seen.append(torch.as_tensor(t).tolist()) or predict(x, t, *a, **k)
        wide = teacher.latent_shape(32, 16)
        method.loss({"latents": torch.zeros(8, *wide), "cond": teacher.encode_prompts(prompts * 4),
                     "generator": torch.Generator().manual_seed(0)}, "student")
        assert set(seen[0]) <= set(method.grid(wide).tolist()) and set(seen[0]) - set(method.grid().tolist())


def test_a_bucketed_cache_keeps_each_bucket_and_its_size_conditioning_and_trains(tmp_path, tiny_sdxl_dir,
                                                                                 tiny_sd3_dir, cli, capsys):
    from distill import cli as command_line

    cfg = bucketed_cfg(tmp_path, tiny_sdxl_dir, "dmd2", "run", steps=2)
    cfg_file = tmp_path / "c.yaml"
    cfg.dump(cfg_file)
    cache = tmp_path / "cache.safetensors"
    assert "cached 12 samples" in cli("cache", cfg_file, "--out", cache).stdout
    images = data.build(cfg.data, 16)
    ds = data.build(runs.parse_config(cfg.to_dict(), ["data.kind=latents", f"data.path={cache}"]).data, 16)
    assert sorted(ds.bucket_of) == sorted(images.bucket_of) and ds.dataset.sizes == [tuple(s) for s in SIZES]
    for i, b in enumerate(ds.bucket_of):
        assert ds[i]["latents"].shape == (4, SIZES[b][0] // 2, SIZES[b][1] // 2)
        assert ds[i]["cond.pos.time_ids"][-2:].tolist() == SIZES[b]  # the bucket is the target size
    originals = sorted(tuple(ds[i]["cond.pos.time_ids"][:2].tolist()) for i in range(len(ds)))
    assert originals == sorted(SHAPES)  # each image's own original size
    train(runs.parse_config(cfg.to_dict(), ["data.kind=latents", f"data.path={cache}"]))
    assert (tmp_path / "run/checkpoints/step-00000002").is_dir()
    squares = mixed_folder(tmp_path / "squares", [(20, 20)] * 4)  # buckets 1 and 2 stay empty
    cli("cache", cfg_file, f"data.path={squares}", "--out", tmp_path / "squares.safetensors")
    only = data.build(runs.parse_config(cfg.to_dict(), ["data.kind=latents",
                                                        f"data.path={tmp_path / 'squares.safetensors'}"]).data, 16)
    assert only.bucket_of == [0] * 4 and only.dataset.sizes == [tuple(s) for s in SIZES]
    for overrides, message in [(["data.buckets=[[16,16]]"], "holds the buckets [[16, 16], [32, 16], [16, 32]], "
                                 "data.buckets names [[16, 16]]"),
                               ([f"teacher.source={tiny_sd3_dir}"], "was made by another teacher or at another size")]:
        argv = ["train", str(cfg_file), "data.kind=latents", f"data.path={cache}", *overrides,
                f"train.output_dir={tmp_path / 'refused'}"]
        assert command_line.main(argv) == 2 and message in capsys.readouterr().err


def test_eval_measures_each_size_as_its_own_row_with_the_same_prompts_and_seeds(tmp_path, tiny_sdxl_dir, cli,
                                                                                capsys):
    import sqlite3

    train(bucketed_cfg(tmp_path, tiny_sdxl_dir, "consistency", "run", steps=1))
    db, prompts = tmp_path / "board.sqlite", tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 8\n")
    proc = cli("eval", tmp_path / "run", "--steps", "1", "--sizes", "16x16,32x16", "--reference", tmp_path / "imgs",
               "--prompts", prompts, "--extractor", "distill-digits", "--num-per-prompt", "3", "--bootstrap", "5",
               "--db", db)
    assert proc.stdout.count("added row") == 2
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM rows ORDER BY id")]
    protocols = [json.loads(r["protocol"]) for r in rows]
    assert [p["resolution"] for p in protocols] == [16, "32x16"] and rows[0]["protocol_id"] != rows[1]["protocol_id"]
    assert all(protocols[0][k] == protocols[1][k] for k in ("prompts", "samples", "eval_seeds"))
    grids = tmp_path / "run/checkpoints/step-00000001/eval"
    sizes = [Image.open(grids / f"consistency-1steps-{size}.png").size for size in ("16x16", "32x16")]
    assert sizes[0] != sizes[1]
    from distill import cli as command_line

    # in a leaderboard of that size alone, the teacher at it joins its table; other settings are still refused
    same = ["--reference", str(tmp_path / "imgs"), "--prompts", str(prompts), "--extractor", "distill-digits",
            "--bootstrap", "5", "--db", str(tmp_path / "one-size.sqlite"), "--steps", "1", "--sizes", "32x16"]
    for extra in (["--num-per-prompt", "3"], ["--teacher", "--num-per-prompt", "3"]):
        assert command_line.main(["eval", str(tmp_path / "run"), *extra, *same]) == 0
    assert command_line.main(["eval", str(tmp_path / "run"), "--num-per-prompt", "2", *same]) == 2
    assert "samples 6 -> 4" in capsys.readouterr().err
    # without a size, a student not trained at its teacher's size is measured at its trained size nearest it
    import distill

    cfg = bucketed_cfg(tmp_path, tiny_sdxl_dir, "consistency", "square", steps=1)
    cfg.data.buckets = [[32, 32], [32, 16]]
    train(cfg)
    result = distill.evaluate(tmp_path / "square", steps=1, prompts=str(prompts), num_per_prompt=2, bootstrap=5,
                              reference=str(tmp_path / "imgs"), extractor="distill-digits",
                              db=tmp_path / "square.sqlite")
    assert result.grid.name == "consistency-1steps-32x32.png" and tuple(result.images.shape[-2:]) == (32, 32)
    con = sqlite3.connect(tmp_path / "square.sqlite")
    assert json.loads(con.execute("SELECT protocol FROM rows WHERE id = ?", (result.row_id,)).fetchone()[0])[
        "resolution"] == 32  # a square size is one number, as the teacher's 16 is
    for sizes, message in [("16x17", "multiples of 2 px"), ("16by16", "is not HxW")]:
        with pytest.raises(SystemExit) if "by" in sizes else contextlib.nullcontext():
            assert command_line.main(["eval", str(tmp_path / "run"), "--steps", "1", "--sizes", sizes]) == 2
        assert message in capsys.readouterr().err


def test_the_shaped_digits_world_trains_in_three_buckets_and_scores_stacks(tmp_path, tiny_sdxl_dir):
    import distill
    from distill import evaluation

    stacks = digits.DigitStacks(16)
    item = stacks[3]
    a, b = digits.STACK.search(item["prompt"]).groups()
    assert item["image"].shape == (3, 32, 16) and item["prompt"] == f"a {a} above a {b}"
    torch.testing.assert_close(item["image"][:, :16], stacks.digits[stacks.pick(3)[0]]["image"])
    real = evaluation.reference_images("digit_stacks", 16, 300)
    prompts = [evaluation._reference_set("digit_stacks", 16)[i]["prompt"] for i in range(300)]
    scores = evaluation.adherence(real, prompts)  # the classifier reads each half of a real stack
    assert scores["adherence"] > 0.85 and {"adherence_top", "adherence_bottom"} <= scores.keys()

    shapes = [[16, 16], [32, 16], [16, 32]]
    cfg = runs.parse_config({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 16}, "student": {"kind": "lora", "lora_rank": 2},
        "method": {"name": "consistency"}, "data": {"kind": "digit_shapes", "batch_size": 2, "buckets": shapes},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "checkpoint_every": 3}})
    ds = data.build(cfg.data, 16)
    assert [tuple(ds[i]["image"].shape[1:]) for i in range(3)] == [tuple(s) for s in shapes]
    assert ds.bucket_of[:6] == [0, 1, 2, 0, 1, 2] and ds[2]["original_size"].tolist() == [16, 32]
    train(cfg)
    row = distill.evaluate(tmp_path / "run", 1, reference="digit_stacks", num_per_prompt=1, size=(32, 16),
                           bootstrap=5, out=tmp_path / "grids").row
    assert row["protocol"]["resolution"] == "32x16" and row["samples"] == 100
    assert np.isfinite(row["fid"]) and 0 <= row["adherence_top"] <= 1
    with pytest.raises(DistillError, match="digit_shapes trains its three shapes"):
        data.build(runs.parse_config(cfg.to_dict(), ["data.buckets=[[16,16],[16,32]]"]).data, 16)


def test_plan_sizes_a_bucketed_step_at_its_largest_bucket(tmp_path):
    from distill import plan

    raw = {"teacher": {"source": "builtin:tiny-sdxl", "resolution": 16}, "method": {"name": "consistency"},
           "data": {"kind": "images", "path": str(tmp_path), "batch_size": 2}, "train": {"output_dir": "unused"}}
    one = plan.plan(runs.parse_config(raw, for_training=False))
    raw["data"]["buckets"] = [[16, 16], [32, 32]]
    mixed = plan.plan(runs.parse_config(raw, for_training=False))
    raw["data"].pop("buckets")
    raw["teacher"]["resolution"] = 32
    large = plan.plan(runs.parse_config(raw, for_training=False))
    assert mixed["flops"] == large["flops"] > one["flops"]
