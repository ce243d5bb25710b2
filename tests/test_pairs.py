"""The digit-pairs world: its images and prompts, the per-half metrics on real pairs, and the shipped pairs teachers."""
import pytest
import torch

from distill import data, digits, metrics
from distill.config import DataConfig
from distill.errors import DistillError
from distill.evaluation import adherence, reference_images


@pytest.fixture(scope="module")
def real_pairs():
    """Real pairs of every kind (the reference set) with their prompts."""
    ds = digits.DigitPairs(16, size=600, seed=1, held_out=True)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), [it["prompt"] for it in items]


def test_pair_images_show_the_prompted_digits_and_never_a_held_out_pair():
    ds = digits.DigitPairs(16)
    assert len(digits.PAIR_PROMPTS) == 100 and len(digits.HELD_OUT_PAIRS) == 20
    for side in (0, 1):  # every digit is held out twice on each side
        assert sorted(p[side] for p in digits.HELD_OUT_PAIRS) == sorted(list(range(10)) * 2)
    singles, seen = digits.Digits(16), set()
    for i in range(400):
        item = ds[i]
        a, b = ds.pick(i)
        left, right = int(singles.labels[a]), int(singles.labels[b])
        assert item["prompt"] == digits.pair_prompt(left, right) == f"a {left} on the left and a {right} on the right"
        assert item["image"].shape == (3, 16, 32)
        assert torch.equal(item["image"][:, :, :16], singles[a]["image"])
        assert torch.equal(item["image"][:, :, 16:], singles[b]["image"])
        seen.add((left, right))
    assert not seen & digits.HELD_OUT_PAIRS and len(seen) > 70  # 80 pairs are allowed
    assert torch.equal(ds[7]["image"], digits.DigitPairs(16)[7]["image"])  # the same sample on every read


def test_digit_pairs_data_needs_a_teacher_twice_as_wide():
    ds = data.build(DataConfig(kind="digit_pairs"), (16, 32))
    assert ds[0]["image"].shape == (3, 16, 32)
    with pytest.raises(DistillError, match="teacher.width=32"):
        data.build(DataConfig(kind="digit_pairs"), 16)
    with pytest.raises(DistillError, match="leave teacher.width unset"):
        data.build(DataConfig(kind="digits"), (16, 32))


def test_per_half_adherence_on_real_pairs(real_pairs):
    images, prompts = real_pairs
    scores = adherence(images, prompts)
    assert scores["adherence"] >= 0.95  # both digits read right
    assert scores["adherence_left"] >= 0.97 and scores["adherence_right"] >= 0.97
    assert scores["adherence_lo"] < scores["adherence"] < scores["adherence_hi"]
    held = sum(digits.PAIR.search(p).groups() in {tuple(map(str, q)) for q in digits.HELD_OUT_PAIRS} for p in prompts)
    assert 60 < held < 180 and scores["adherence_held_out"] >= 0.9 and scores["adherence_seen"] >= 0.95
    # The same images under their prompts with left and right swapped: only the pairs of one digit twice stay right.
    swapped = [digits.pair_prompt(*map(int, digits.PAIR.search(p).groups()[::-1])) for p in prompts]
    same = sum(a == b for a, b in (digits.PAIR.search(p).groups() for p in prompts)) / len(prompts)
    assert adherence(images, swapped)["adherence"] < same + 0.05 < 0.2


def test_pair_features_are_each_half_s_digit_features_side_by_side(real_pairs):
    images = real_pairs[0][:40]
    both = metrics.features(images, metrics.PAIRS_EXTRACTOR)
    left, right = (metrics.features(half, metrics.DIGITS_EXTRACTOR) for half in metrics.halves(images, 2))
    assert both.shape == (40, 128)
    torch.testing.assert_close(both, torch.cat([left, right], 1), rtol=1e-5, atol=1e-6)
    # FID on pair features: two draws of real pairs are close; real pairs against pairs of one repeated digit are far.
    ref = reference_images("digit_pairs", 16, 400)
    doubled = torch.cat([images[:, :, :, :16]] * 2, dim=3)
    real = metrics.fid_kid(real_pairs[0][:200], ref, metrics.PAIRS_EXTRACTOR, resamples=0)["fid"]
    far = metrics.fid_kid(doubled.repeat(5, 1, 1, 1), ref, metrics.PAIRS_EXTRACTOR, resamples=0)["fid"]
    assert far > 5 * real


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, tiny_sdxl_dir):
    """Two LCM-LoRA steps on the tiny SDXL teacher at 16 x 32 px, on digit pairs."""
    from distill import runs
    from distill.trainer import train

    tmp = tmp_path_factory.mktemp("pairs")
    cfg = runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 16, "width": 32},
                             "student": {"kind": "lora", "lora_rank": 4},
                             "data": {"kind": "digit_pairs", "batch_size": 2},
                             "train": {"output_dir": str(tmp / "run"), "max_steps": 2}})
    train(cfg)
    return tmp / "run"


def test_a_non_square_run_trains_evaluates_and_ranks_on_pairs(pairs_run, tmp_path, cli):
    import json
    import sqlite3

    from PIL import Image

    db = tmp_path / "board.sqlite"
    wrong = cli("eval", pairs_run, "--steps", "1", "--db", db, check=False)  # the digits reference: 16 x 16
    assert wrong.returncode == 2 and "--reference digits, digit_pairs or digit_stacks" in wrong.stderr
    out = cli("eval", pairs_run, "--steps", "2", "--num-per-prompt", "1", "--reference", "digit_pairs", "--db", db,
              "--reference-size", "300", "--out", tmp_path / "grids")
    assert "added row 1" in out.stdout
    extra, protocol = sqlite3.connect(db).execute("SELECT extra, protocol FROM rows").fetchone()
    extra, protocol = json.loads(extra), json.loads(protocol)
    assert protocol["resolution"] == "16x32" and protocol["extractor"] == "distill-digit-pairs"
    assert protocol["samples"] == 100 and protocol["reference"] == "digit_pairs" and protocol["reference_size"] == 300
    for part in ("adherence_left", "adherence_right", "adherence_held_out", "adherence_seen"):
        assert 0 <= extra[f"{part}_lo"] <= extra[part] <= extra[f"{part}_hi"] <= 1
    assert Image.open(tmp_path / "grids/consistency-2steps.png").size == (10 * 34 + 2, 7 * 18 + 2)  # 64 tiles 16x32
    cli("leaderboard", "--db", db, "--out", tmp_path / "pages")
    page = (tmp_path / "pages/leaderboard.md").read_text()
    assert "held-out pairs ↑ (%)" in page and "16x32 px" in page
    images = cli("generate", pairs_run, "--prompt", "a 3 on the left and a 7 on the right", "--out", tmp_path / "gen")
    assert "wrote 1 images" in images.stdout
    (png,) = (tmp_path / "gen").glob("*.png")
    assert Image.open(png).size == (32, 16)


def test_an_sd3_teacher_takes_non_square_latents(tiny_sd3_dir):
    import teachers
    from distill.config import TeacherConfig

    teacher = teachers.load(TeacherConfig(source=str(tiny_sd3_dir), resolution=16, width=32)).eval()
    x, cond = teacher.probe()
    assert x.shape[-1] == 2 * x.shape[-2]
    with torch.no_grad():
        x0, _ = teacher.predict(torch.randn_like(x), 500.0, cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()


# How plain diffusers calls a shipped teacher of each family: its pipeline class and call arguments. SD3's T5 padding
# length changes its joint attention: the teachers were trained with 77 tokens (teacher.max_text_length); at
# diffusers' default of 256 the pairs teacher draws 30% of the pairs right.
PLAIN_DIFFUSERS = {"sdxl": ("StableDiffusionXLPipeline", {"guidance_scale": 5.0}),
                   "sd3": ("StableDiffusion3Pipeline", {"guidance_scale": 3.0, "max_sequence_length": 77})}


def _plain_pipeline(name: str):
    """The shipped teacher `name` (teachers.ZOO) in its family's diffusers pipeline, and the call arguments to use."""
    import diffusers

    import teachers

    pipeline, call = PLAIN_DIFFUSERS[name.rsplit("-", 1)[1]]
    pipe = getattr(diffusers, pipeline).from_pretrained(teachers.ZOO[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


@pytest.mark.parametrize("name", ["pairs-sdxl", "pairs-sd3"])
def test_shipped_pairs_teacher_draws_both_prompted_digits_with_plain_diffusers(name):
    pipe, call = _plain_pipeline(name)
    pairs = [(a, (a + k) % 10) for a in range(10) for k in (1, 3)]  # 10 seen pairs and 10 held-out ones
    prompts = [digits.pair_prompt(a, b) for a, b in pairs]
    images = pipe(prompts, height=16, width=32, num_inference_steps=30, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **call).images * 2 - 1
    assert images.shape == (20, 3, 16, 32)
    scores = adherence(images, prompts)
    print(name, {k: round(v, 3) for k, v in scores.items() if not k.endswith(("_lo", "_hi"))})
    assert scores["adherence"] >= 0.8 and scores["adherence_seen"] >= 0.8


# The SD3 teacher draws the bottom digit of a stack right 84% of the time (shapes_teachers.md), and here 8 of these
# 10: its stacks are held to their top digit.
@pytest.mark.parametrize("name,stacked", [("shapes-sdxl", "adherence"), ("shapes-sd3", "adherence_top")])
def test_shipped_shapes_teacher_draws_each_shape_with_plain_diffusers(name, stacked):
    """A shapes teacher in diffusers' own pipeline, which conditions on the size it is asked for (SDXL's
    micro-conditioning, SD3's token grid): singles at 16 x 16, pairs side by side at 16 x 32 and stacked at 32 x 16,
    the prompted digits read back from each."""
    pipe, call = _plain_pipeline(name)
    seen = [(a, (a + 5) % 10) for a in range(10)]  # none of them held out
    for size, prompts in (((16, 16), [f"a handwritten digit {a}" for a, _ in seen]),
                          ((16, 32), [digits.pair_prompt(a, b) for a, b in seen]),
                          ((32, 16), [digits.stack_prompt(a, b) for a, b in seen])):
        images = pipe(prompts, height=size[0], width=size[1], num_inference_steps=10, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **call).images * 2 - 1
        assert images.shape == (10, 3, *size)
        assert adherence(images, prompts)[stacked if size == (32, 16) else "adherence"] >= 0.8, size
