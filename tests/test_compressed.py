"""Compressed students (students/compressed.py): the removal plans build the intended backbones, every surviving
tensor is the teacher's, and the GPU check runs in its CPU smoke mode."""
import json
import sys

import pytest
import torch

import teachers
from distill.config import TeacherConfig
from distill.errors import ConfigError, DistillError
from students import compressed

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _teacher(source):
    return teachers.load(TeacherConfig(source=source, resolution=32))


def _same_as_source(student, teacher, plan):
    plan = compressed.resolve(plan, teacher)
    source = dict(teacher.state_dict())
    for name, t in student.state_dict().items():
        assert torch.equal(t, source[compressed.source_name(name, teacher, plan)]), name


@pytest.mark.parametrize("source,plan,expect", [
    ("builtin:tiny-sdxl", None, {"mid": False, "layers": [1, 1], "depth": [1, 1]}),
    ("builtin:tiny-sdxl", {"mid": True}, {"mid": True, "layers": [1, 1], "depth": [1, 1]}),
    ("builtin:tiny-sd3", None, {"blocks": [1]}),  # SD3's last block stays: it reads the text without updating it
    ("builtin:tiny-flux", {"blocks": [0], "single_blocks": [0]}, {"blocks": [0], "single_blocks": [0]}),
])
def test_plans_build_and_copy_every_surviving_tensor(source, plan, expect):
    teacher = _teacher(source)
    backbone = teacher.backbone
    assert compressed.resolve(plan, backbone) == expect
    student = compressed.compress(backbone, plan)
    _same_as_source(student, backbone, plan)
    x, cond = teacher.probe()
    t = torch.full((1,), 0.5)
    x0, _ = teacher.predict(x + 1, t, cond, backbone=student)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    if plan is None and source.endswith("sdxl"):
        assert student.mid_block is None and compressed.parameters(student) < 0.8 * compressed.parameters(backbone)


def test_up_stages_copy_the_teachers_last_layer_for_the_low_resolution_skip():
    """A UNet whose stages lose a layer: in an up stage the first layers and the last survive (only the teacher's
    last has the input width of the skip that comes from below)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2).eval()
    student = compressed.compress(unet, {"layers": [1, 1], "depth": [1, 1]})
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2]
    assert compressed.source_name("up_blocks.0.resnets.1.conv1.weight", unet, compressed.resolve(
        {"layers": [1, 1], "depth": [1, 1]}, unet)) == "up_blocks.0.resnets.2.conv1.weight"
    assert len(student.up_blocks[0].attentions[0].transformer_blocks) == 1
    _same_as_source(student, unet, {"layers": [1, 1], "depth": [1, 1]})
    out = student(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 8)).sample
    assert out.shape == (1, 4, 8, 8)
    plan = compressed.resolve({"layers": [1, 1], "depth": [1, 1]}, unet)
    pairs = compressed.feature_pairs(student, unet, plan)
    assert pairs and all(s[0].endswith(".attn1") and t[0].endswith(".attn1") for s, t in pairs)
    # FSDP2 renames a sharded module's class (FSDP<name>): the pairs are read off the teacher's family
    student.__class__ = type("FSDPUNet2DConditionModel", (type(student),), {})
    assert compressed.feature_pairs(student, unet, plan) == pairs


def test_sdxl_presets_match_the_published_parameter_counts():
    """On SDXL's real architecture (meta device): the KOALA-like presets land on KOALA's 1.16B and 0.78B UNets."""
    from teachers import real_size

    with torch.device("meta"):
        unet = real_size.pipeline("sdxl-base-arch").unet
    counts = {}
    for preset in ("koala-1b", "koala-700m", "bk-base", "bk-small", "half"):
        with torch.device("meta"):
            student = type(unet).from_config(compressed.student_config(unet, compressed.resolve(preset, unet)))
        counts[preset] = round(compressed.parameters(student) / 1e9, 2)
    assert round(compressed.parameters(unet) / 1e9, 2) == 2.57
    assert counts == {"koala-1b": 1.16, "koala-700m": 0.78, "bk-base": 1.72, "bk-small": 1.30, "half": 0.75}


@pytest.mark.parametrize("plan,message", [
    ("koala-1b", "presets for this backbone (mmdit): half"),
    ({"blocks": [0]}, "must keep the last block"),
    ({"blocks": [7]}, "indices in 0..1"),
    ({"layers": 2}, "unknown keys ['layers']"),
])
def test_bad_plans_are_refused_in_one_line(plan, message):
    backbone = _teacher("builtin:tiny-sd3").backbone
    with pytest.raises(ConfigError, match=None) as e:
        compressed.resolve(plan, backbone)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpu_check_runs_in_smoke_mode(tmp_path):
    """experiments/gpu_check.py on the tiny SDXL on CPU: every method's step, the plans, sampling and the
    compressed backbones, all reported (it measures nothing here; it must not rot before a GPU runs it)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    plans = tmp_path / "plans.json"
    assert gpu_check.main(["--smoke", "--plans-only", "--plans", str(plans), "--methods", "denoise"]) == 0
    assert json.loads(plans.read_text())["denoise"] > 0
    assert gpu_check.main(["--smoke", "--plans", str(plans), "--steps", "1", "--out", str(tmp_path / "gpu_check.md")]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["method"] for r in results["train"]] == ["denoise", "consistency", "progressive", "guidance", "add",
                                                        "ladd", "dmd2", "denoise:full", "denoise:compressed"]
    assert all("error" not in r and r["ms"] > 0 for r in results["train"])
    assert results["train"][0]["plan_gb"] > 0 and "plan_gb" not in results["train"][1]
    assert [r["sampler"].split(",")[0] for r in results["sampling"]] == [
        "teacher", "LoRA consistency student", "compressed student (half)", "LoRA consistency student merged"]
    assert [r["backbone"] for r in results["compressed"]] == ["teacher", "half"]
    assert results["compressed"][1]["params_b"] < results["compressed"][0]["params_b"]


def _cfg(tmp_path, source, out, **over):
    from distill import runs

    raw = {"teacher": {"source": str(source), "resolution": 32},
           "student": {"kind": "compressed", "ema_decay": 0.5},
           "method": {"name": "consistency", "params": {"guidance_min": 3.0, "guidance_max": 3.0}},
           "data": {"kind": "digits", "batch_size": 2},
           "train": {"output_dir": str(tmp_path / out), "max_steps": 4, "learning_rate": 1e-3, "checkpoint_every": 2,
                     "log_every": 1}, "sample": {"steps": 2}}
    return runs.parse_config(raw, [f"{k}={v}" for k, v in over.items()])


def test_feature_distillation_reaches_only_the_student_and_a_run_resumes_bit_identically(tmp_path, tiny_sdxl_dir):
    """The step loss and the feature + output distillation are one loss; the teacher's weights never move; a run
    stopped at step 2 and resumed ends where the uninterrupted one does, bit for bit."""
    from safetensors.torch import load_file

    from distill.trainer import train

    whole = train(_cfg(tmp_path, tiny_sdxl_dir, "whole"))
    before = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32)).backbone.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in whole.teacher.backbone.state_dict().items())
    logs = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert all(r["student/kd_feature"] > 0 and r["student/kd_output"] > 0 for r in logs)
    assert whole.student.backbone.mid_block is None and whole.student.plan == {"mid": False, "layers": [1, 1],
                                                                                  "depth": [1, 1]}
    train(_cfg(tmp_path, tiny_sdxl_dir, "split"), stop_after=2)
    train(_cfg(tmp_path, tiny_sdxl_dir, "split"), resume="latest")
    a = load_file(tmp_path / "whole/checkpoints/step-00000004/weights.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step-00000004/weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("student.ema.") for k in a)  # consistency's target network, compressed too


def test_without_feature_weight_a_compressed_run_is_the_plain_method(tmp_path, tiny_sdxl_dir):
    from distill.trainer import train

    method = train(_cfg(tmp_path, tiny_sdxl_dir, "plain", **{"student.feature_weight": 0, "train.max_steps": 1,
                                                             "student.compression": "{layers: [1, 1], mid: true}"}))
    row = json.loads((tmp_path / "plain/metrics.jsonl").read_text().splitlines()[0])
    assert "student/kd_feature" not in row and row["student/loss"] > 0
    assert method.student.plan["mid"] and method.student.backbone.mid_block is not None  # a plan given as a mapping


@pytest.fixture(scope="module")
def large_and_small(tmp_path_factory, tiny_sdxl_dir):
    """A LoRA consistency student and a compressed one of the same teacher, each trained two steps."""
    from distill.trainer import train

    tmp = tmp_path_factory.mktemp("stitch")
    train(_cfg(tmp, tiny_sdxl_dir, "large", **{"student.kind": "lora", "student.lora_rank": 4, "train.max_steps": 2}))
    train(_cfg(tmp, tiny_sdxl_dir, "small", **{"train.max_steps": 2}))
    return tmp / "large", tmp / "small"


def test_t_stitch_runs_the_small_student_first_and_the_large_one_after(tmp_path, large_and_small, capsys):
    """Stitching at 0 is the large student's own sampler, at 1 the small student's; in between the first k steps
    are the small one's (the same chain computed step by step by hand); generate and eval take --stitch."""
    from distill import api
    from distill.evaluation import sample_images
    from distill.runs import load_run
    from distill.sampling import renoise_chain, randn, stitched

    large, small = (load_run(r)[2] for r in large_and_small)
    prompts = ["a handwritten digit 3", "a handwritten digit 8"]

    def images(fraction=None, method=large):
        if fraction is None:
            return sample_images(method, prompts, 2, 11, 1.0, False)[0]
        with stitched(large, small, fraction, 2):
            return sample_images(large, prompts, 2, 11, 1.0, False)[0]
    assert torch.equal(images(0.0), images()) and torch.equal(images(1.0), images(method=small))
    half = images(0.5)
    assert not torch.equal(half, images()) and not torch.equal(half, images(method=small))
    # by hand: step 1 by the small student, step 2 by the large one, on the large run's sampler
    t, g = large.teacher, torch.Generator().manual_seed(11)
    cond, times = t.encode_prompts(prompts), large.sample_times(2)
    boundary = (large.params.sigma_data, large.params.timestep_scaling)
    x = randn((2, *t.latent_shape(*t.size)), g, t.device)
    with torch.no_grad():
        x = renoise_chain(t, small.student.backbone, x, cond, times[:1], g, boundary=boundary)
        x = t.add_noise(x, randn(x.shape, g, x), times[1])
        x = renoise_chain(t, large.student.backbone, x, cond, times[1:], g, boundary=boundary)
    assert torch.allclose(half, t.decode(x).clamp(-1, 1), atol=1e-5)

    from distill.cli import main

    assert main(["generate", str(large_and_small[0]), "--prompt", prompts[0], "--steps", "2", "--stitch",
                 f"{large_and_small[1]}:0.5", "--out", str(tmp_path / "png")]) == 0
    assert "the first 1 of 2 steps" in capsys.readouterr().out and len(list((tmp_path / "png").glob("*.png"))) == 1
    row = api.evaluate(large_and_small[0], 2, num_per_prompt=2, bootstrap=10, stitch=f"{large_and_small[1]}:0.5",
                       out=tmp_path / "grid").row
    assert row["student"] == "lora+stitch" and row["stitch"]["first_steps"] == 1 and row["stitch"]["rest_nfe"] == 1
    assert row["stitch"]["first"] == str(large_and_small[1]) and row["ms_per_image"] > 0
    assert main(["generate", str(large_and_small[0]), "--prompt", "x", "--stitch", "nowhere", "--out",
                 str(tmp_path / "x")]) == 2
    assert "give RUN:FRACTION" in capsys.readouterr().err
    assert main(["generate", str(large_and_small[0]), "--prompt", "x", "--teacher", "--stitch",
                 f"{large_and_small[1]}:0.5", "--out", str(tmp_path / "x")]) == 2
    assert "drop --teacher or --stitch" in capsys.readouterr().err


def test_dmd2_fake_score_of_a_compressed_student_is_an_adapter_on_the_frozen_teacher(tmp_path, tiny_sdxl_dir):
    """No full copy for the fake score: a `fake` adapter on the teacher's own backbone that its turn trains, while
    the teacher's base weights stay as loaded and its predictions (adapters off) stay the bare teacher's."""
    from safetensors.torch import load_file

    from distill.trainer import train

    method = train(_cfg(tmp_path, tiny_sdxl_dir, "dmd2", **{
        "method.name": "dmd2", "method.params": "{student_steps: 2, fake_rank: 4}",
        "train.max_steps": 2, "train.turn_every": "{student: 1}"}))
    assert method.fake.copy is None and method.fake.shared[0] is method.teacher.backbone
    bare = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32))
    trained = {k: v for k, v in method.teacher.backbone.state_dict().items() if "lora_" not in k}
    base = {k.replace(".base_layer", ""): v for k, v in trained.items()}
    assert base.keys() == bare.backbone.state_dict().keys()
    assert all(torch.equal(v, bare.backbone.state_dict()[k]) for k, v in base.items())
    fake = method.fake.state_to_save()
    assert fake and all(v.shape[0] == 4 or v.shape[1] == 4 for v in fake.values())  # rank 4
    assert any(v.abs().sum() > 0 for k, v in fake.items() if "lora_B" in k)  # the fake turn trained it
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    with torch.no_grad():
        cond = bare.encode_prompts(["3"])
        assert torch.equal(method.teacher.predict(x, t, cond)[0], bare.predict(x, t, cond)[0])
    saved = load_file(tmp_path / "dmd2/checkpoints/step-00000002/weights.safetensors")
    assert any(k.startswith("fake.") for k in saved) and not any("fake" in k and "copy" in k for k in saved)
    with pytest.raises(DistillError, match="fake_score: copy"):  # a full copy's weights never land in the teacher
        method.fake.load_saved({"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="set it to copy"):  # train.fsdp shards no adapter on the teacher
        type(method).check_config(_cfg(tmp_path, tiny_sdxl_dir, "x", **{"method.name": "dmd2", "method.params": "{}",
                                                                "train.fsdp": "true"}))
