"""`distill export`: what it writes loads in plain diffusers, in a fresh process, and makes the same images as
`distill generate` from the same seed (diffusers LoRA, kohya LoRA, merged pipeline; SDXL and SD3)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distill import runs
from distill.trainer import train
from teachers import tiny

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]

# Runs in a fresh interpreter: plain diffusers only, nothing of distill imported. One interpreter loads each of the
# kinds asked for (comma-separated) in turn and saves its images as <out>/<kind>.npy.
LOAD = """
import json, sys
import numpy as np, torch
import diffusers

teacher, export, kinds, out_dir = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
facts = json.load(open(f"{export}/distill_export.json"))
Pipe = getattr(diffusers, {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
                          "flux": "FluxPipeline"}[facts["family"]])
for kind in kinds:
    if kind == "merged":
        pipe = Pipe.from_pretrained(f"{export}/pipeline")
        assert type(pipe.scheduler).__name__ == facts["scheduler"]
    elif kind == "single-file":  # the teacher's folder gives the configs and tokenizers, the file every weight
        config = f"{export}/pipeline" if facts["student"] == "compressed" else teacher  # its own UNet config
        pipe = Pipe.from_single_file(f"{export}/{facts['single_file']}", config=config, local_files_only=True)
        pipe.scheduler = getattr(diffusers, facts["scheduler"]).from_config(pipe.scheduler.config,
                                                                            **facts["scheduler_config"])
    else:
        pipe = Pipe.from_pretrained(teacher)
        pipe.scheduler = getattr(diffusers, facts["scheduler"]).from_config(pipe.scheduler.config,
                                                                            **facts["scheduler_config"])
        before = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11), **KW).images
        pipe.load_lora_weights(export if kind == "lora" else f"{export}/lora_kohya.safetensors")
        backbone = pipe.unet if facts["family"] == "sdxl" else pipe.transformer
        print(kind, "lora modules", sum(bool(getattr(m, "lora_A", None)) for m in backbone.modules()))
    out = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11), **KW).images
    if kind in ("lora", "kohya"):
        assert np.abs(out - before).max() > 1e-3, "the LoRA changed nothing"
    np.save(f"{out_dir}/{kind}.npy", out)
"""


def _load_in_fresh_process(teacher, export, kind, tmp_path, steps):
    """The images plain diffusers makes from the export, as `kind` (one, or a list loaded in one interpreter: then
    {kind: images}), and what the interpreter printed."""
    # The call exactly as distill_export.json writes it, nothing added: steps, guidance, size and times.
    facts = json.loads((export / "distill_export.json").read_text())
    assert facts["pipeline_call"]["num_inference_steps"] == steps
    script = f"PROMPTS = {PROMPTS!r}\nKW = {facts['pipeline_call']!r}\n" + LOAD
    kinds = [kind] if isinstance(kind, str) else list(kind)
    proc = subprocess.run([sys.executable, "-c", script, str(teacher), str(export), ",".join(kinds), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = {k: np.load(tmp_path / f"{k}.npy") for k in kinds}
    return (images[kind] if isinstance(kind, str) else images), proc.stdout


def _same_as_generate(images, run, tmp_path, cli, steps):
    folder = tmp_path / "generated"
    if not folder.is_dir():
        cli("generate", run, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", steps, "--seed", 11,
            "--out", folder)
    for png, img in zip(sorted(folder.glob("*.png")), images):
        diff = np.abs(np.asarray(Image.open(png)).astype(int) - (img * 255).round().astype(int))
        assert diff.max() <= 1, diff.max()


def _same_as_sampled(images, run, steps):
    """The images equal distill's own sampling of the run (in this process: `distill generate`'s code path)."""
    from distill.evaluation import sample_images

    _, cfg, method, _ = runs.load_run(run)
    ours, _ = sample_images(method, PROMPTS, steps, 11, cfg.sample.guidance_scale, teacher=False)
    assert np.abs(images - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-5


def _train(tmp_path, teacher, **params):
    cfg = runs.parse_config({"teacher": {"source": str(teacher), "resolution": 32},
                        "student": {"kind": "lora", "lora_rank": 4, "lora_alpha": 8},
                        "method": {"name": "consistency", "params": {"guidance_min": 3.0, "guidance_max": 3.0}},
                        "data": {"kind": "digits", "batch_size": 2},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "learning_rate": 1e-2}},
                       [f"{k}={v}" for k, v in params.items()])
    train(cfg)
    return tmp_path / "run"


def test_sdxl_lora_kohya_merged_and_single_file_exports_load_in_diffusers(tmp_path, cli):
    # SDXL's two text encoders differ in width, which from_single_file tells them apart by: so must the tiny ones
    teacher = tiny.build("tiny-sdxl", tmp_path / "teacher", text_width_2=48)
    run = _train(tmp_path, teacher)
    export = tmp_path / "export"
    proc = cli("export", run, "--to", export, "--format", "lora", "--format", "kohya", "--format", "merged",
               "--format", "single-file", "--steps", 2, "--db", tmp_path / "none.sqlite")
    assert "pytorch_lora_weights.safetensors" in proc.stdout
    card = (export / "README.md").read_text()
    assert "LCMScheduler" in card and "consistency" in card and "![samples](samples.png)" in card
    assert (export / "samples.png").is_file() and not list(tmp_path.glob(".export*"))
    kohya = load_file(export / "lora_kohya.safetensors")
    single = load_file(export / "sdxl_consistency_2step.safetensors")
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    # Every kohya module is a module of the original layout, as the single file names it, with the right shape
    modules = {k.removesuffix(".alpha") for k in kohya if k.endswith(".alpha")}
    ldm = {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_"): v
           for k, v in single.items() if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    assert modules and all("down_blocks" not in m and "up_blocks" not in m for m in modules)
    for m in modules:
        w, down, up = ldm[m], kohya[f"{m}.lora_down.weight"], kohya[f"{m}.lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == w.shape[:2], m
    assert {"first_stage_model", "conditioner", "model"} == {k.split(".")[0] for k in single}
    loaded, stdout = _load_in_fresh_process(teacher, export, ["lora", "kohya", "merged", "single-file"], tmp_path, 2)
    assert f"kohya lora modules {len(modules)}" in stdout, stdout  # diffusers' kohya loader finds every module
    for images in loaded.values():
        _same_as_generate(images, run, tmp_path, cli, 2)


def test_sd3_lora_exports_load_in_diffusers_and_half_precision(tmp_path, tiny_sd3_dir, cli):
    # StableDiffusion3Pipeline does not hand its generator to the scheduler, so a re-noising (LCM) student
    # matches distill's samples exactly at 1 step; a deterministic (progressive, Euler) one at any step count.
    from distill.exporting import export

    lcm = _train(tmp_path / "lcm", tiny_sd3_dir)
    export(lcm, tmp_path / "lcm-export", steps=1)
    facts = json.loads((tmp_path / "lcm-export/distill_export.json").read_text())
    assert facts["scheduler"] == "FlowMatchLCMScheduler" and facts["formats"] == ["lora"]
    images, _ = _load_in_fresh_process(tiny_sd3_dir, tmp_path / "lcm-export", "lora", tmp_path, 1)
    _same_as_generate(images, lcm, tmp_path / "lcm", cli, 1)

    pd = _train(tmp_path / "pd", tiny_sd3_dir, **{"method.name": "progressive", "train.max_steps": 2,
                                                   "method.params": "{start_steps: 4, round_steps: 1, target: v}"})
    export(pd, tmp_path / "pd-export", ["lora", "merged"], steps=2)
    assert json.loads((tmp_path / "pd-export/distill_export.json").read_text())["scheduler"] == \
        "FlowMatchEulerDiscreteScheduler"
    for images in _load_in_fresh_process(tiny_sd3_dir, tmp_path / "pd-export", ["lora", "merged"], tmp_path,
                                         2)[0].values():
        _same_as_generate(images, pd, tmp_path / "pd", cli, 2)

    export(lcm, tmp_path / "half", ["merged"], "fp16")
    from diffusers import StableDiffusion3Pipeline
    for part in ("transformer", "vae", "text_encoder_3"):
        weights = load_file(next((tmp_path / "half/pipeline" / part).glob("*.safetensors")))
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}, part
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "half/pipeline", torch_dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_sdxl_dir):
    # sigma_data and timestep_scaling far from LCMScheduler's 0.5 and 10: c_skip is large at every time.
    return _train(tmp_path_factory.mktemp("full"), tiny_sdxl_dir, **{
        "student.kind": "full", "train.max_steps": 1, "sample.steps": 2,
        "method.params": "{guidance_min: 3.0, guidance_max: 3.0, sigma_data: 0.25, timestep_scaling: 0.001}"})


def test_full_student_folder_samples_as_distill_with_its_boundary_scalings(tmp_path, full_run):
    """runs/<run>/student/ of a full student carries the scheduler, with the run's own boundary scalings, and
    the call (distill_sampling.json) that sample as distill does; as written, it makes generate's images."""
    from diffusers import DiffusionPipeline

    sampling = json.loads((full_run / "student/distill_sampling.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(full_run / "student")
    assert type(pipe.scheduler).__name__ == sampling["scheduler"] == "LCMScheduler"
    theirs = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11),
                  **sampling["pipeline_call"]).images
    _same_as_sampled(theirs, full_run, 2)


def test_export_refuses_bad_requests_and_writes_nothing(tmp_path, full_run, cli):
    # Unknown formats and dtypes, and --overwrite of what is not an export, are rows of test_bad_input's table.
    for fmt in ("lora", "kohya"):
        proc = cli("export", full_run, "--to", tmp_path / "out", "--format", fmt, check=False)
        assert proc.returncode == 2 and "full student" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/distill_export.json").write_text("{}")  # an earlier export: --overwrite replaces it
    (tmp_path / "busy/stale.txt").write_text("from the earlier export")
    from distill.exporting import export

    export(full_run, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy/pipeline/model_index.json").is_file() and not (tmp_path / "busy/stale.txt").exists()


def test_sd3_single_file_loads_in_diffusers_and_kohya_is_refused(tmp_path, cli):
    # As in SD3's own file: CLIP-G's width differs from CLIP-L's, and CLIP-L's projection is the identity
    teacher = tiny.build("tiny-sd3", tmp_path / "teacher", text_width_2=24, identity_projection=True)
    from distill.errors import DistillError
    from distill.exporting import export as write

    run = _train(tmp_path, teacher, **{"train.max_steps": 2})
    with pytest.raises(DistillError, match="no kohya LoRA layout is known for the sd3 family"):
        write(run, tmp_path / "out", ["kohya"])
    assert not (tmp_path / "out").exists()
    export = write(run, tmp_path / "export", ["single-file"], steps=1)
    single = load_file(export / "sd3_consistency_1step.safetensors")
    assert {k.split(".")[0] for k in single} == {"model", "first_stage_model", "text_encoders"}
    images, _ = _load_in_fresh_process(teacher, export, "single-file", tmp_path, 1)
    _same_as_generate(images, run, tmp_path, cli, 1)  # a re-noising SD3 student matches exactly at 1 step


@pytest.mark.parametrize("shape", ["tiny-sd35-medium", "tiny-sd35-large"])
def test_sd35_shapes_train_and_export_whole(tmp_path, shape):
    """SD3.5 medium's MMDiT-X (dual attention, RMS-normed q and k) and large's shape train through the SD3 family;
    the diffusers LoRA loads whole into plain StableDiffusion3Pipeline and the single file rebuilds the student:
    both sample as distill.load's pipeline does."""
    import diffusers

    import distill

    # text encoders as the original single file has them (as in the SD3 test above)
    teacher = tiny.build(shape, tmp_path / "teacher", text_width_2=24, identity_projection=True)
    run = _train(tmp_path, teacher, **{"train.max_steps": 2})
    export = distill.export(run, tmp_path / "export", formats=["lora", "single-file"], steps=1, db=tmp_path / "x.db")
    facts = json.loads((export / "distill_export.json").read_text())
    ours = distill.load(run, steps=1)(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11)).images
    file_modules = sum(k.endswith("lora_A.weight") for k in load_file(export / "pytorch_lora_weights.safetensors"))
    for kind in ("lora", "single-file"):
        if kind == "lora":
            pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(teacher)
            pipe.load_lora_weights(export)
            assert sum(bool(getattr(m, "lora_A", None)) for m in pipe.transformer.modules()) == file_modules > 0
        else:
            pipe = diffusers.StableDiffusion3Pipeline.from_single_file(export / facts["single_file"], config=str(teacher),
                                                                       local_files_only=True)
        pipe.scheduler = getattr(diffusers, facts["scheduler"]).from_config(pipe.scheduler.config,
                                                                            **facts["scheduler_config"])
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(PROMPTS, output_type="np", generator=torch.Generator().manual_seed(11),
                      **facts["pipeline_call"]).images
        assert np.abs(theirs - ours).max() <= 1 / 255, (kind, np.abs(theirs - ours).max())  # as _same_as_generate


def test_compressed_student_exports_merged_and_single_file_and_samples_as_generate(tmp_path):
    """A compressed student (the tiny UNet without its mid block) exports as a whole pipeline whose UNet config
    is the student's, and as one file in the original layout with the student's block counts (read with that
    folder's config): plain diffusers loads both and makes `distill generate`'s images. A LoRA of it, or a single
    file of a compressed transformer, is refused in one line."""
    from distill.errors import DistillError
    from distill.exporting import export

    teacher = tiny.build("tiny-sdxl", tmp_path / "teacher", text_width_2=48)  # as from_single_file needs
    run = _train(tmp_path, teacher, **{"student.kind": "compressed", "train.max_steps": 1, "sample.steps": 2})
    with pytest.raises(DistillError, match="compressed student: it has no LoRA"):
        export(run, tmp_path / "lora", ["lora"])
    out = export(run, tmp_path / "export", ["single-file"])
    assert json.loads((out / "distill_export.json").read_text())["formats"] == ["single-file", "merged"]
    config = json.loads((out / "pipeline/unet/config.json").read_text())
    assert config["mid_block_type"] is None and config["layers_per_block"] == 1
    single = load_file(out / "sdxl_consistency_2step.safetensors")
    assert not any(".middle_block." in k for k in single) and "model.diffusion_model.output_blocks.3.0.in_layers.0" \
        ".weight" in single and "model.diffusion_model.output_blocks.4.0.in_layers.0.weight" not in single
    assert "removal plan" in (out / "README.md").read_text()
    images, _ = _load_in_fresh_process(teacher, out, ["merged", "single-file"], tmp_path, 2)
    for kind in images.values():
        _same_as_sampled(kind, run, 2)



def test_single_file_of_a_compressed_transformer_is_refused(tiny_sd3_dir):
    import students
    import teachers
    from distill.config import StudentConfig, TeacherConfig
    from distill.errors import DistillError
    from distill.exporting import _check

    teacher = teachers.load(TeacherConfig(source=str(tiny_sd3_dir), resolution=32))
    student = students.build(teacher, StudentConfig(kind="compressed"))
    with pytest.raises(DistillError, match="same layer count in every stage"):
        _check(student, teacher, ["single-file"])


def test_phased_consistency_lora_samples_in_plain_diffusers_as_generate(tmp_path, tiny_sdxl_dir):
    """A 2-phase consistency student (PCM) samples deterministically edge to edge: its export names a
    deterministic scheduler (DDIM on the trailing grid) and plain diffusers makes `distill generate`'s images."""
    run = _train(tmp_path, tiny_sdxl_dir, **{"method.params": "{guidance_min: 3.0, guidance_max: 3.0, phases: 2}",
                                             "sample.steps": 2, "train.max_steps": 2})
    from distill.exporting import export

    out = export(run, tmp_path / "export", ["lora"])
    assert json.loads((out / "distill_export.json").read_text())["scheduler"] == "DDIMScheduler"
    images, _ = _load_in_fresh_process(tiny_sdxl_dir, out, "lora", tmp_path, 2)
    _same_as_sampled(images, run, 2)


@pytest.mark.parametrize("method", ["scm", pytest.param("rcm", marks=pytest.mark.slow)])  # rCM: sCM's sampler
def test_continuous_time_consistency_lora_samples_in_plain_diffusers_as_generate(tmp_path, tiny_sdxl_dir, method,
                                                                                cli):
    """sCM's and rCM's students re-noise between steps on the family's few-step times: the export names the
    re-noising scheduler with those times, and plain diffusers makes `distill generate`'s images at 2 steps."""
    params = "{guidance_min: 3.0, guidance_max: 3.0, warmup: 1" + (", real_guidance: 3.0, student_steps: 2}"
                                                                    if method == "rcm" else "}")
    run = _train(tmp_path, tiny_sdxl_dir, **{"method.name": method, "method.params": params, "sample.steps": 2,
                                             "train.max_steps": 2})
    from distill.exporting import export

    out = export(run, tmp_path / "export", ["lora"])
    assert json.loads((out / "distill_export.json").read_text())["scheduler"] == "LCMScheduler"
    images, _ = _load_in_fresh_process(tiny_sdxl_dir, out, "lora", tmp_path, 2)
    _same_as_generate(images, run, tmp_path, cli, 2)
