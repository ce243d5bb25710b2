"""Exports sample exactly as distill does: the pipeline call in distill_export.json, run as written with nothing
added, makes distill's images at the trained resolution and at step counts that do not divide 1000; LCM's
boundary scalings are carried; what diffusers' schedulers cannot hold is refused. (tests/test_export.py loads
each format in a fresh process and checks a full student's student/ folder.)"""
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import teachers
from distill import config, runs
from distill.errors import DistillError
from distill.evaluation import sample_images
from distill.runs import load_run
from distill.exporting import export
from distill.sampling import diffusers_sampling
from distill.solvers import consistency_scalings
from distill.trainer import train

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]
SIZE = 24  # not the tiny teachers' default (16 px), so a call without height and width shows


def _denoise_run(tmp_path, teacher):
    """A deterministic (DDIM) student: a denoising LoRA after one step."""
    cfg = runs.parse_config({"teacher": {"source": str(teacher), "resolution": SIZE},
                        "student": {"kind": "lora", "lora_rank": 4}, "method": {"name": "denoise"},
                        "data": {"kind": "digits", "batch_size": 1},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "learning_rate": 1e-2}})
    train(cfg)
    return tmp_path / "run"


def _as_written(pipe, sampling: dict):
    """The pipeline called with the written call, only the prompts and a seeded generator added."""
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(11), output_type="np",
                **sampling["pipeline_call"]).images


def _distill(method, cfg, steps):
    """distill's own images (`distill generate`'s before rounding to 8 bits) for the same prompts and seed."""
    images, _ = sample_images(method, PROMPTS, steps, 11, cfg.sample.guidance_scale, teacher=False)
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_ddim_students_sample_as_distill_at_3_and_16_steps_at_the_trained_size(tmp_path, tiny_sdxl_dir):
    # DDIMScheduler steps from t to t - 1000 // n, off distill's grid at n = 3 and 16: for this student that
    # moved pixels by up to 0.08 (of 1); Euler at the given timesteps stays within 1e-5.
    run = _denoise_run(tmp_path, tiny_sdxl_dir)
    three = export(run, tmp_path / "export", ["lora", "merged"], steps=3, prompts=PROMPTS[:1])
    facts = json.loads((three / "distill_export.json").read_text())
    assert facts["pipeline_call"]["height"] == facts["pipeline_call"]["width"] == SIZE
    assert json.loads((three / "pipeline/unet/config.json").read_text())["sample_size"] == SIZE // 2
    merged = DiffusionPipeline.from_pretrained(three / "pipeline")
    _, cfg, method, _ = load_run(run)
    ours = _distill(method, cfg, 3)
    assert np.abs(_as_written(merged, facts) - ours).max() < 1e-5

    lora = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    lora.scheduler = type(merged.scheduler).from_config(lora.scheduler.config, **facts["scheduler_config"])
    lora.load_lora_weights(three)
    assert np.abs(_as_written(lora, facts) - ours).max() < 1e-5

    # What a 16-step export writes (its scheduler into pipeline/, its facts into distill_export.json); and at 2
    # steps, which divide 1000, DDIM on its own trailing grid.
    for steps, scheduler in ((16, "EulerDiscreteScheduler"), (2, "DDIMScheduler")):
        merged.scheduler, facts = diffusers_sampling(method, cfg, steps)
        assert facts["scheduler"] == scheduler
        assert np.abs(_as_written(merged, facts) - _distill(method, cfg, steps)).max() < 1e-5


@pytest.fixture(scope="module")
def tiny_teachers(tiny_sdxl_dir, tiny_sd3_dir):
    return {family: teachers.load(config.TeacherConfig(source=str(folder), resolution=SIZE))
            for family, folder in (("sdxl", tiny_sdxl_dir), ("sd3", tiny_sd3_dir))}


def test_lcm_scheduler_carries_any_boundary_scalings(tiny_teachers):
    t = torch.tensor([999, 499, 259, 19])
    for boundary in ((0.5, 10.0), (0.25, 0.001), (2.0, 3.0)):
        sched, _ = tiny_teachers["sdxl"].scheduler_for(True, t.tolist(), boundary=boundary)
        theirs = torch.stack([torch.as_tensor(c) for c in sched.get_scalings_for_boundary_condition_discrete(t)])
        assert torch.allclose(theirs, torch.stack(consistency_scalings(t, *boundary)), rtol=1e-5, atol=0)
    # A progressive student that outputs x is read as x.
    sched, _ = tiny_teachers["sdxl"].scheduler_for(False, t.tolist(), prediction_type="sample")
    assert sched.config.prediction_type == "sample"
    # ADD and LADD students use x0 as it is: no c_skip, c_out = 1.
    sched, _ = tiny_teachers["sdxl"].scheduler_for(True, t.tolist())
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
    assert float(c_skip.max()) < 1e-12 and torch.equal(c_out, torch.ones_like(c_out))


def test_flow_lcm_export_refuses_what_diffusers_cannot_sample(tiny_teachers):
    sd3 = tiny_teachers["sd3"]
    times = sd3.student_timesteps(4).tolist()
    sched, call = sd3.scheduler_for(True, times, boundary=(0.5, 10.0))  # c_skip < 1e-3: leaving it out is fine
    assert type(sched).__name__ == "FlowMatchLCMScheduler" and len(call["sigmas"]) == 4
    with pytest.raises(DistillError, match="applies no boundary scalings.*timestep_scaling=0.01"):
        sd3.scheduler_for(True, times, boundary=(0.5, 0.01))
    with pytest.raises(DistillError, match="outputs 'sample'"):
        sd3.scheduler_for(False, times, prediction_type="sample")
