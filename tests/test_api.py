"""The Python API (distill.train, load, evaluate, export) on real runs, and examples/quickstart.py run as a user
runs it: in a fresh process."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distill
from distill import leaderboard, runs
from distill.errors import ConfigError, DistillError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The tour through the API on the built-in digits teacher, shortened: 2 training steps, 2 samples a digit."""
    out = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(out),
                           "--max-steps", "2", "--num-per-prompt", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quickstart_trains_samples_evaluates_exports_and_writes_the_page(quickstart):
    out, stdout = quickstart
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step-00000002"
    assert len(list((out / "samples").glob("*.png"))) == 10
    row, = leaderboard.Leaderboard(out / "leaderboard.sqlite", readonly=True).rows("fid")
    assert (row["method"], row["steps"], row["train_steps"]) == ("consistency", 4, 2) and row["fid"] >= 0
    assert json.loads(row["protocol"])["samples"] == 20
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"} <= {
        f.name for f in (out / "export").iterdir()}
    assert "| consistency |" in (out / "export" / "README.md").read_text()  # the card holds the evaluated row
    assert (out / "leaderboard" / "leaderboard.html").is_file() and "open " in stdout


def test_load_makes_generates_images_for_the_same_seed(quickstart, tmp_path, cli):
    run = quickstart[0] / "run"
    cli("generate", run, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", 2, "--seed", 11,
        "--out", tmp_path / "generated")
    pipe = distill.load(run, steps=2)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.distill_call["num_inference_steps"] == 2
    ours = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11)).images
    for png, img in zip(sorted((tmp_path / "generated").glob("*.png")), ours):
        theirs = np.asarray(Image.open(png)).astype(int)
        assert np.abs(theirs - (img * 255).round().astype(int).reshape(theirs.shape)).max() <= 1
    other = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(12)).images
    assert np.abs(other - ours).max() > 0.05  # the seed matters: the comparison above could fail
    with pytest.raises(DistillError, match=r"samples at the 2 steps .* distill.load\(run, steps=4\)"):
        pipe(PROMPTS, num_inference_steps=4)


def test_evaluate_without_a_leaderboard_returns_the_row_and_writes_only_the_grid(quickstart, tmp_path):
    run = quickstart[0] / "run"
    result = distill.evaluate(run, steps=1, prompts=PROMPTS, num_per_prompt=3, out=tmp_path / "grid")
    assert result.row_id is None and result.images.shape[0] == 6
    assert result.row["steps"] == 1 and result.row["nfe"] == 1 and result.row["samples"] == 6
    assert result.row["fid_lo"] <= result.row["fid"] <= result.row["fid_hi"]
    assert [p.name for p in (tmp_path / "grid").iterdir()] == ["consistency-1steps.png"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    again = distill.evaluate(run, steps=1, prompts=prompts, num_per_prompt=3, out=tmp_path / "grid2")
    assert torch.equal(again.images, result.images)  # a prompts file is read as the list was given


def test_train_takes_a_config_object_and_overrides_as_dict_or_list(tmp_path, tiny_sdxl_dir):
    raw = {"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "lora", "lora_rank": 4},
           "method": {"name": "consistency"}, "data": {"kind": "digits", "batch_size": 2},
           "train": {"output_dir": str(tmp_path / "a"), "max_steps": 1}}
    cfg = runs.parse_config(raw)
    run = distill.train(cfg, {"train.output_dir": tmp_path / "b", "method.params": {"guidance_min": 3.0,
                                                                                   "guidance_max": 3.0}})
    assert run == tmp_path / "b" and not (tmp_path / "a").exists()
    saved = (run / "checkpoints" / "step-00000001" / "config.yaml").read_text()
    assert "guidance_min: 3.0" in saved and "guidance_max: 3.0" in saved
    run = distill.train(cfg, ["train.output_dir=" + str(tmp_path / "c"), "train.max_steps=2"], stop_after=1)
    assert (run / "checkpoints" / "latest").read_text() == "step-00000001"
    distill.train(cfg, {"train.output_dir": str(run), "train.max_steps": 2}, resume="latest")
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    weights = load_file(run / "checkpoints" / "step-00000002" / "weights.safetensors")
    assert any(k.startswith("student.lora.") for k in weights)


def test_api_refuses_what_the_command_line_refuses(tmp_path, tiny_sdxl_dir):
    with pytest.raises(ConfigError, match="train.max_step"):
        distill.train(ROOT / "experiments" / "lcm_digits_sdxl.yaml", {"train.max_step": 3})
    with pytest.raises(DistillError, match="not the string"):
        distill.train(ROOT / "experiments" / "lcm_digits_sdxl.yaml", "train.max_steps=3")
    with pytest.raises(DistillError, match="give one"):
        distill.train(ROOT / "experiments" / "lcm_digits_sdxl.yaml", {"train.output_dir": str(tmp_path / "r")},
                      resume="latest", restart=True)
    assert not (tmp_path / "r").exists()
    with pytest.raises(DistillError, match="not a distill checkpoint"):
        distill.load(tmp_path / "missing")


def test_load_refuses_a_teacher_without_a_pipeline(tmp_path):
    run = distill.train(ROOT / "experiments" / "lcm_gmm.yaml", {"train.output_dir": str(tmp_path / "gmm"),
                                                                 "train.max_steps": 1})
    with pytest.raises(DistillError, match="no diffusers pipeline"):
        distill.load(run)


def test_load_seeds_the_renoising_noise_where_the_pipeline_does_not(tmp_path):
    """SD3's pipeline does not hand its generator to the scheduler's step, whose LCM re-noising then draws from the
    global RNG; distill.load's call hands it over, so a 2-step SD3 consistency student matches distill's images."""
    from distill.evaluation import sample_images

    run = distill.train(ROOT / "experiments" / "lcm_digits_sd3.yaml", {
        "train.max_steps": 1, "train.output_dir": str(tmp_path / "sd3"), "data.batch_size": 2})
    pipe = distill.load(run, steps=2)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    torch.manual_seed(0)  # the global RNG differs between the two calls: the images must not depend on it
    ours = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11)).images
    _, cfg, method, _ = runs.load_run(run)
    theirs, _ = sample_images(method, PROMPTS, 2, 11, cfg.sample.guidance_scale, teacher=False)
    assert np.abs(ours - (theirs / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-4
    assert "step" not in pipe.scheduler.__dict__  # the call leaves the scheduler as it was
