"""Consistency distillation on tiny SDXL and SD3 through the real trainer, resume, generate, LCM equivalence."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

import teachers
from distill import runs
from distill.config import TeacherConfig
from distill.errors import ConfigError
from distill.runs import build_method
from distill.trainer import train


def tiny_cfg(tmp_path, source, **over):
    raw = {"teacher": {"source": str(source), "resolution": 32},
           "student": {"kind": "lora", "lora_rank": 4},
           "method": {"name": "consistency", "params": {"guidance_min": 2.0, "guidance_max": 6.0}},
           "data": {"kind": "digits", "batch_size": 2},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "learning_rate": 1e-3,
                     "checkpoint_every": 2, "log_every": 1}}
    return runs.parse_config(raw, [f"{k}={v}" for k, v in over.items()])


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["student/loss"] for r in rows]


@pytest.mark.parametrize("teacher_fixture,over", [
    ("tiny_sdxl_dir", {}),
    ("tiny_sdxl_dir", {"teacher.prediction_type": "v_prediction", "student.kind": "full",
                       "student.guidance_embedding": "true"}),
    ("tiny_sd3_dir", {}),
    ("tiny_sd3_dir", {"student.kind": "full"}),
    ("tiny_sdxl_dir", {"method.name": "ladd", "method.params": "{student_steps: 2}"}),
    ("tiny_sd3_dir", {"method.name": "ladd", "student.kind": "full", "method.params": "{distill_weight: 1.0}"}),
    ("tiny_sdxl_dir", {"method.name": "add", "method.params": "{feature_net: vit_tiny_patch16_224, feature_size: 32}"}),
    ("tiny_sd3_dir", {"method.name": "add", "student.kind": "full",
                      "method.params": "{feature_net: vit_tiny_patch16_224, feature_size: 32, r1_gamma: 0.1}"}),
    ("tiny_sdxl_dir", {"method.name": "progressive", "student.kind": "full",
                       "method.params": "{start_steps: 4, round_steps: 2}"}),
    ("tiny_sd3_dir", {"method.name": "progressive", "method.params": "{start_steps: 4, round_steps: 2, target: v}"}),
])
def test_consistency_trains_only_the_student(request, tmp_path, teacher_fixture, over):
    folder = request.getfixturevalue(teacher_fixture)
    cfg = tiny_cfg(tmp_path, folder, **over)
    method = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for turn in method.turns:
        losses = [r[f"{turn}/loss"] for r in rows]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(0 <= r["time/data_s"] < r["time/step_s"] for r in rows)

    fresh = teachers.load(TeacherConfig(source=str(folder), resolution=32))
    init = build_method(cfg, "cpu")  # same seed: the student as it was at step 0
    frozen = {n.replace(".base_layer", ""): p for n, p in method.teacher.backbone.named_parameters()
              if "lora_" not in n}
    for name, p in fresh.backbone.named_parameters():
        assert torch.equal(frozen[name], p), f"teacher weight {name} changed"
    for part in ("text_encoder", "vae"):
        for a, b in zip(getattr(method.teacher, part).parameters(), getattr(fresh, part).parameters()):
            assert torch.equal(a, b)
    changed = [not torch.equal(a, b) for a, b in zip(method.student.trainable_parameters(),
                                                       init.student.trainable_parameters())]
    assert sum(changed) > 0.5 * len(changed)
    if hasattr(method, "discriminator"):
        heads = [not torch.equal(a, b) for a, b in zip(method.discriminator.parameters(),
                                                         init.discriminator.parameters())]
        assert sum(heads) > 0.5 * len(heads)
    # a full student has an EMA only where the method reads it (consistency's target network)
    assert (method.student.ema is not None) == (cfg.student.kind == "full" and cfg.method.name == "consistency")
    if method.student.ema is not None:
        ema = [not torch.equal(a, b) for a, b in zip(method.student.ema.parameters(), init.student.ema.parameters())]
        assert any(ema)
    assert (tmp_path / "run" / "student").is_dir()


def test_resume_latest_matches_an_uninterrupted_run(tmp_path, tiny_sdxl_dir, cli):
    run_cli = cli
    cfg_file = tmp_path / "cfg.yaml"
    cfg = tiny_cfg(tmp_path, tiny_sdxl_dir, **{"train.max_steps": 5, "train.lr_scheduler": "cosine",
                                               "train.warmup_steps": 2, "train.gradient_accumulation_steps": 2})
    cfg.dump(cfg_file)
    train(runs.load_config(cfg_file, [f"train.output_dir={tmp_path / 'whole'}"]))  # the uninterrupted run, in-process
    first = run_cli("train", cfg_file, f"train.output_dir={tmp_path / 'split'}", "--stop-after-steps", "3")
    assert "stopped at step 3 of 5" in first.stdout  # an early stop says where, not "run saved"
    assert (tmp_path / "split/checkpoints/latest").read_text() == "step-00000003"
    assert not (tmp_path / "split/student").exists()  # stopped early: no final export yet
    run_cli("train", cfg_file, f"train.output_dir={tmp_path / 'split'}", "--resume", "latest")
    for name in ("weights.safetensors", "optim-student.safetensors"):
        whole = load_file(tmp_path / "whole/checkpoints/step-00000005" / name)
        split = load_file(tmp_path / "split/checkpoints/step-00000005" / name)
        assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole), name
    assert _losses(tmp_path / "whole")[3:] == _losses(tmp_path / "split")[3:]
    whole_meta = json.loads((tmp_path / "whole/checkpoints/step-00000005/trainer.json").read_text())
    split_meta = json.loads((tmp_path / "split/checkpoints/step-00000005/trainer.json").read_text())
    first_meta = json.loads((tmp_path / "split/checkpoints/step-00000003/trainer.json").read_text())
    untimed = [{k: v for k, v in meta.items() if k != "seconds"} for meta in (whole_meta, split_meta)]
    assert untimed[0] == untimed[1]
    # the training time goes on from the stopped run's: the resumed run's file counts all steps
    assert split_meta["seconds"] > first_meta["seconds"] > 0 and split_meta["timed_from"] == 0
    seconds, rest = (tmp_path / "split/train_time.txt").read_text().split(" ", 1)
    assert float(seconds) + 0.05 >= split_meta["seconds"] and rest == "s for steps 0..5\n"  # written to 0.1 s
    # a finished run resumed trains nothing, and leaves its time alone (a checkpoint from before the seconds were
    # kept would have counted 0 s for steps 5..5)
    (tmp_path / "split/train_time.txt").write_text("123.4 s for steps 0..5\n")
    train(runs.load_config(cfg_file, [f"train.output_dir={tmp_path / 'split'}"]), resume="latest")
    assert (tmp_path / "split/train_time.txt").read_text() == "123.4 s for steps 0..5\n"

    changed = tmp_path / "changed.yaml"
    raw = yaml.safe_load(cfg_file.read_text())
    raw["student"]["kind"] = "full"
    changed.write_text(yaml.safe_dump(raw))
    bad = run_cli("train", changed, f"train.output_dir={tmp_path / 'split'}", "--resume", "latest", check=False)
    assert bad.returncode == 2 and "cannot resume" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory, tiny_sdxl_dir):
    tmp = tmp_path_factory.mktemp("lcm")
    cfg = tiny_cfg(tmp, tiny_sdxl_dir, **{"train.max_steps": 3, "train.learning_rate": 1e-2})
    train(cfg)
    return tmp / "run"


def test_generate_from_a_checkpoint_writes_repeatable_pngs(lcm_run, tmp_path, cli):
    run_cli = cli
    args = ["generate", lcm_run, "--prompt", "a handwritten digit 1", "--prompt", "a handwritten digit 2",
            "--steps", "2", "--seed", "3"]
    proc = run_cli(*args, "--out", tmp_path / "a")
    assert "wrote 2 images" in proc.stdout
    run_cli(*args, "--out", tmp_path / "b")
    run_cli("generate", lcm_run / "checkpoints/step-00000002", "--prompt", "a handwritten digit 1", "--steps", "1",
            "--out", tmp_path / "c")
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == ["0000-a-handwritten-digit-1.png", "0001-a-handwritten-digit-2.png"]
    for p in pngs:
        img = np.asarray(Image.open(p))
        assert img.shape == (32, 32, 3) and img.std() > 0
        assert np.array_equal(img, np.asarray(Image.open(tmp_path / "b" / p.name)))
    assert len(list((tmp_path / "c").glob("*.png"))) == 1


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_plain_diffusers_lcm_scheduler_reproduces_the_student(lcm_run, tiny_sdxl_dir, tmp_path, steps, cli):
    run_cli = cli
    cfg = runs.load_config(lcm_run / "config.yaml", for_training=False)
    method = build_method(cfg, "cpu")
    from distill import checkpoint
    method.load_saved(checkpoint.load(checkpoint.find(lcm_run, "latest"))[0])
    prompts = ["a handwritten digit 4", "a handwritten digit 9"]
    cond = method.teacher.encode_prompts(prompts)
    ours = method.sample(cond, steps, torch.Generator().manual_seed(11), method.teacher.latent_shape(32, 32))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    pipe.load_lora_weights(lcm_run / "student")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, guidance_scale=1.0, height=32, width=32)
    ref = pipe(prompts, output_type="latent", generator=torch.Generator().manual_seed(11), **kw).images
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, scheduler=pipe.scheduler)
    plain.set_progress_bar_config(disable=True)
    no_lora = plain(prompts, output_type="latent", generator=torch.Generator().manual_seed(11), **kw).images
    assert (no_lora - ours).abs().max() > 1e-3  # the LoRA really changed the samples
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()

    if steps != 2:  # distill generate's PNGs: once, at 2 steps, is enough to tie them to the pipeline
        return
    run_cli("generate", lcm_run, "--prompt", prompts[0], "--prompt", prompts[1], "--steps", steps, "--seed", 11,
            "--out", tmp_path)
    images = pipe(prompts, output_type="np", generator=torch.Generator().manual_seed(11), **kw).images
    for png, img in zip(sorted(tmp_path.glob("*.png")), images):
        diff = np.abs(np.asarray(Image.open(png)).astype(int) - (img * 255).round().astype(int))
        assert diff.max() <= 1


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_sdxl_dir):
    runs = {}
    for gc in ("false", "true"):
        cfg = tiny_cfg(tmp_path / gc, tiny_sdxl_dir, **{"student.kind": "full", "train.max_steps": 2,
                                                       "student.gradient_checkpointing": gc})
        runs[gc] = train(cfg).student
    assert runs["true"].backbone.is_gradient_checkpointing and not runs["false"].backbone.is_gradient_checkpointing
    for a, b in zip(runs["true"].backbone.parameters(), runs["false"].backbone.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_mixed_precision_and_seeds(tmp_path, tiny_sdxl_dir):
    method = train(tiny_cfg(tmp_path / "bf16", tiny_sdxl_dir, **{"train.mixed_precision": "bf16"}))
    assert all(math.isfinite(v) for v in _losses(tmp_path / "bf16/run"))
    assert all(p.dtype == torch.float32 for p in method.student.trainable_parameters())
    a = train(tiny_cfg(tmp_path / "a", tiny_sdxl_dir, **{"train.max_steps": 2})).student.trainable_parameters()
    b = train(tiny_cfg(tmp_path / "b", tiny_sdxl_dir, **{"train.max_steps": 2})).student.trainable_parameters()
    c = train(tiny_cfg(tmp_path / "c", tiny_sdxl_dir, **{"train.max_steps": 2, "train.seed": 1}))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same run
    assert not all(torch.equal(x, y) for x, y in zip(a, c.student.trainable_parameters()))


@pytest.mark.parametrize("method,params", [("ladd", "{}"),
                                           ("add", "{feature_net: vit_tiny_patch16_224, feature_size: 32}")])
def test_each_turn_reaches_only_its_own_parameters(tiny_sd3_dir, tmp_path, method, params):
    from distill.trainer import encode_batch, select_turn, step_generator

    cfg = tiny_cfg(tmp_path, tiny_sd3_dir, **{"method.name": method, "method.params": params})
    method = build_method(cfg, "cpu")
    turn_params = {turn: method.parameters_for(turn) for turn in method.turns}
    from distill import data
    raw = data.collate([data.build(cfg.data, 32)[i] for i in range(2)])
    for turn in method.turns:
        select_turn(turn_params, turn)
        method.zero_grad(set_to_none=True)
        method.loss(encode_batch(raw, method.teacher, step_generator(0, 0, 0, 0)), turn).loss.backward()
        for other, params in turn_params.items():
            grads = [p.grad is not None and p.grad.abs().sum() > 0 for p in params]
            assert (any(grads) if other == turn else not any(grads)), (turn, other)
        assert all(p.grad is None for p in method.teacher.parameters() if not p.requires_grad)
        assert all(p.grad is None for p in getattr(method, "feature_net", torch.nn.Linear(1, 1)).parameters()
                   if not p.requires_grad)


def test_ladd_on_teacher_samples_needs_no_images(tiny_sd3_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a red square\na blue circle\n")
    cfg = tiny_cfg(tmp_path, tiny_sd3_dir, **{"method.name": "ladd", "data.kind": "prompts",
                                              "data.path": str(tmp_path / "p.txt"), "train.max_steps": 2,
                                              "method.params": "{real: teacher, teacher_steps: 3}"})
    train(cfg)
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run"))


def test_guidance_distillation_then_progressive_from_it(tiny_sdxl_dir, tmp_path):
    from distill.trainer import encode_batch, step_generator

    cfg = tiny_cfg(tmp_path / "g", tiny_sdxl_dir, **{
        "method.name": "guidance", "method.params": "{guidance_min: 2.0, guidance_max: 6.0}",
        "student.kind": "full", "student.guidance_embedding": "true", "train.max_steps": 60,
        "train.checkpoint_every": 60, "train.learning_rate": 3e-4, "data.batch_size": 4})
    init, trained = build_method(cfg, "cpu"), train(cfg)
    from distill import data
    raw = data.collate([data.build(cfg.data, 32)[i] for i in (100, 200, 300, 400)])
    batch = encode_batch(raw, trained.teacher, step_generator(7, 0, 0, 0))
    x_t = trained.teacher.add_noise(batch["latents"], torch.randn_like(batch["latents"]), 600.0)
    w = torch.tensor([2.5, 3.5, 4.5, 5.5])
    want = trained.teacher.predict(x_t, 600.0, batch["cond"], guidance=w)[1]
    with torch.no_grad():
        err = {name: (m.teacher.predict(x_t, 600.0, batch["cond"], backbone=m.student.backbone,
                                        guidance_cond=w)[1] - want).pow(2).mean().item()
               for name, m in (("init", init), ("trained", trained))}
    assert err["trained"] < 0.5 * err["init"], err  # one pass now gives what took the teacher two

    prog = tiny_cfg(tmp_path / "p", tiny_sdxl_dir, **{
        "method.name": "progressive", "student.kind": "full", "student.guidance_embedding": "true",
        "student.init_from": str(tmp_path / "g/run"), "train.max_steps": 4,
        "method.params": "{start_steps: 4, round_steps: 2, guidance_min: 2.0, guidance_max: 6.0, "
                         "teacher_from_student: true}"})
    method = build_method(prog, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(method.student.backbone.parameters(),
                                                  trained.student.backbone.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(method.previous.parameters(), trained.student.backbone.parameters()))
    train(prog)
    assert all(math.isfinite(v) for v in _losses(tmp_path / "p/run"))
    with pytest.raises(ConfigError, match="guidance distillation needs student.kind=full"):
        tiny_cfg(tmp_path / "b", tiny_sdxl_dir, **{"method.name": "guidance", "method.params": "{}"})


@pytest.mark.parametrize("teacher_fixture", ["tiny_sdxl_dir", "tiny_sd3_dir"])
def test_denoising_training_learns_and_its_result_loads_as_a_teacher(request, tmp_path, teacher_fixture):
    from distill import data
    from distill.trainer import encode_batch, step_generator

    folder = request.getfixturevalue(teacher_fixture)
    cfg = tiny_cfg(tmp_path, folder, **{"method.name": "denoise", "method.params": "{}", "student.kind": "full",
                                        "train.max_steps": 60, "train.checkpoint_every": 60, "data.batch_size": 8})
    init, trained = build_method(cfg, "cpu"), train(cfg)
    raw = data.collate([data.build(cfg.data, 32)[i] for i in range(0, 1600, 50)])

    def held_out_loss(method):
        with torch.no_grad():
            return sum(method.loss(encode_batch(raw, method.teacher, step_generator(5, k, 0, 0)), "student").loss
                       .item() for k in range(4)) / 4

    before, after = held_out_loss(init), held_out_loss(trained)
    assert after < 0.8 * before, (before, after)  # measured: SDXL eps 3.04 -> 2.23, SD3 flow falls further
    reloaded = teachers.load(TeacherConfig(source=str(tmp_path / "run/student"), resolution=32))
    for a, b in zip(reloaded.backbone.parameters(), trained.student.backbone.parameters()):
        assert torch.equal(a, b)
