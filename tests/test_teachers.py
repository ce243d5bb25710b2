"""Tiny SDXL and SD3 teachers, loaded from folders, agree with diffusers' own pipelines."""
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline

import students
import teachers
from distill import paths
from distill.config import StudentConfig, TeacherConfig
from distill.errors import DistillError
from distill.sampling import ddim_sample
from teachers.base import adapters_disabled


def test_sdxl_teacher_loads_frozen_and_matches_pipeline_ddim(tiny_sdxl_dir):
    teacher = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32))
    assert teacher.family == "sdxl" and teacher.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    prompts = ["a handwritten digit 3", "a cat"]
    ours = ddim_sample(teacher, teacher.encode_prompts(prompts), 4, torch.Generator().manual_seed(0),
                       teacher.latent_shape(32, 32), guidance=5.0)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True, clip_sample=False, steps_offset=0)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_sd3_teacher_matches_pipeline_and_is_deterministic(tiny_sd3_dir):
    teacher = teachers.load(TeacherConfig(source=str(tiny_sd3_dir), resolution=32))
    assert teacher.family == "sd3" and not any(m.training for m in teacher.modules())
    cond = teacher.encode_prompts(["a handwritten digit 7"])
    x = torch.randn(1, *teacher.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    a, b = teacher.predict(x, 700.0, cond, 4.0), teacher.predict(x, 700.0, cond, 4.0)
    assert torch.equal(a[0], b[0])  # no dropout left on (T5 defaults to 0.1)
    assert torch.allclose(teacher.add_noise(a[0], a[1], 700.0), x, atol=1e-5)

    ours = ddim_sample(teacher, cond, 3, torch.Generator().manual_seed(1), teacher.latent_shape(32, 32), guidance=4.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a handwritten digit 7", num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
               max_sequence_length=77, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # a scheduler that shifts by the token count (as FLUX.1's does) gives each size its own grid, as the pipeline
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True,
                                                      base_image_seq_len=64, max_image_seq_len=1024)
    dynamic = teachers.wrap(pipe, TeacherConfig(source=str(tiny_sd3_dir), resolution=32))
    for h, w in ((32, 32), (16, 32)):
        ours = ddim_sample(dynamic, cond, 3, torch.Generator().manual_seed(1), dynamic.latent_shape(h, w), guidance=4.0)
        ref = pipe("a handwritten digit 7", num_inference_steps=3, guidance_scale=4.0, height=h, width=w,
                   max_sequence_length=77, output_type="latent", generator=torch.Generator().manual_seed(1)).images
        assert torch.allclose(ours, ref, atol=1e-5), (h, w, (ours - ref).abs().max())


def test_v_prediction_teacher_reads_the_same_lens(tiny_sdxl_dir):
    eps_t = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32))
    v_t = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32, prediction_type="v_prediction"))
    cond = eps_t.encode_prompts(["x"])
    x = torch.randn(1, *eps_t.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    out = eps_t._forward(eps_t.backbone, x, torch.tensor([500.0]), cond.pos, None)
    a, s = v_t.alpha_sigma(torch.tensor(500.0))
    x0, eps = v_t.predict(x, 500.0, cond)
    assert torch.allclose(x0, a * x - s * out, atol=1e-5) and torch.allclose(eps, s * x + a * out, atol=1e-5)


def test_builtin_tiny_teacher_is_built_once_and_loaded_from_folder():
    t1 = teachers.load(TeacherConfig(source="builtin:tiny-sd3"))
    t2 = teachers.load(TeacherConfig(source="builtin:tiny-sd3"))
    assert (paths.cache_dir() / "teachers" / "tiny-sd3" / "model_index.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(t1.backbone.parameters(), t2.backbone.parameters()))


def test_unreachable_hub_id_is_one_clear_line():
    with pytest.raises(DistillError, match="could not fetch teacher 'nobody/no-such-model' from the hub"):
        teachers.load(TeacherConfig(source="nobody/no-such-model"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(DistillError, match="not a diffusers pipeline"):
        teachers.load(TeacherConfig(source=str(tmp_path)))


def test_lora_student_shares_the_teachers_weights(tiny_sdxl_dir):
    teacher = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32))
    cond = teacher.encode_prompts(["a"])
    x = torch.randn(1, *teacher.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    before = teacher.predict(x, 400.0, cond)[0]
    n_params = sum(p.numel() for p in teacher.parameters())
    student = students.build(teacher, StudentConfig(kind="lora", lora_rank=4))
    assert student.backbone is teacher.backbone
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.1)
    assert all("lora_" in n for n, p in teacher.backbone.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in teacher.parameters() if not p.requires_grad) == n_params  # no copy was made
    assert torch.equal(teacher.predict(x, 400.0, cond)[0], before)  # the teacher: adapters off
    after = teacher.predict(x, 400.0, cond, backbone=student.backbone)[0]
    assert not torch.allclose(after, before)
    with adapters_disabled(student.backbone):
        assert torch.equal(teacher.predict(x, 400.0, cond, backbone=student.backbone)[0], before)


def test_full_student_with_guidance_input_starts_as_the_teacher(tiny_sdxl_dir):
    teacher = teachers.load(TeacherConfig(source=str(tiny_sdxl_dir), resolution=32))
    student = students.build(teacher, StudentConfig(kind="full", guidance_embedding=True, ema_decay=0.5), ema=True)
    assert student.backbone is not teacher.backbone and student.backbone.config.time_cond_proj_dim == 256
    cond = teacher.encode_prompts(["a"])
    x = torch.randn(2, *teacher.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ref = teacher.predict(x, 300.0, cond[[0, 0]])[0]
    got = teacher.predict(x, 300.0, cond[[0, 0]], backbone=student.backbone, guidance_cond=torch.tensor([2.0, 9.0]))[0]
    assert torch.allclose(got, ref, atol=1e-5)
    with torch.no_grad():
        next(student.backbone.parameters()).add_(1.0)
    student.update_ema()
    e, p = next(student.ema.parameters()), next(student.backbone.parameters())
    t = next(teacher.backbone.parameters())
    assert torch.allclose(e, 0.5 * t + 0.5 * p)


@pytest.mark.parametrize("name, backbone, billions, text", [
    ("sdxl-base-arch", "unet", 2.567, {(0.123, 0.695), (0.124, 0.695)}),
    ("sd3-medium-arch", "transformer", 2.028, {(0.123, 0.695), (0.124, 0.695)}),
    ("sd35-medium-arch", "transformer", 2.243, {(0.124, 0.695)}),  # 2.47B with its 384 x 384 position table
    ("sd35-large-arch", "transformer", 8.057, {(0.124, 0.695)}),
    ("flux-dev-arch", "transformer", 11.901, {(0.123, 4.762)})])
def test_real_size_architectures_have_the_published_sizes(name, backbone, billions, text):
    """The shipped architecture files build SDXL base's UNet (2.567B parameters), SD3 medium's MMDiT (2.028B) with
    CLIP-L (123M) and bigG (695M), and FLUX.1-dev's transformer (11.9B) with CLIP-L and T5-XXL's encoder (4.76B),
    here on the meta device (no memory); tiny tokenizers' ids fit the real vocabularies."""
    from teachers import real_size

    with torch.device("meta"):
        pipe = real_size.pipeline(name)
    count = {k: sum(p.numel() for p in m.parameters()) / 1e9 for k, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    assert round(count[backbone], 3) == billions
    assert (round(count["text_encoder"], 3), round(count["text_encoder_2"], 3)) in text
    assert pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id < pipe.text_encoder.config.vocab_size
    assert pipe.scheduler.sigmas.dtype == torch.float32 and pipe.scheduler.sigmas.device.type == "cpu"


@pytest.mark.parametrize("source", ["builtin:tiny-sdxl", "builtin:tiny-flux"])
def test_guidance_input_survives_a_backbone_built_from_keyword_arguments(source):
    """A backbone built in memory from some keyword arguments (as teachers/real_size.py builds SDXL's and FLUX's
    architectures) lists the others in its config's `_use_default_values`, which from_config would reset: the w
    input of a guidance-embedded student must be there all the same, zeroed."""
    teacher = teachers.load(TeacherConfig(source=source, resolution=32))
    given = {"sdxl": ("block_out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
                      "attention_head_dim", "down_block_types", "up_block_types", "transformer_layers_per_block",
                      "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"),
             "flux": ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope")}
    config = teacher.backbone.config
    backbone = type(teacher.backbone)(**{k: config[k] for k in given[teacher.family]}).eval()
    assert ("time_cond_proj_dim" if teacher.family == "sdxl" else "guidance_embeds") in \
        backbone.config["_use_default_values"]
    student = teacher.add_guidance_input(backbone)
    embed = (student.time_embedding.cond_proj if teacher.family == "sdxl"
             else student.time_text_embed.guidance_embedder.linear_2)
    assert embed is not None and not embed.weight.any()
