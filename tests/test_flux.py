"""FLUX.1 teachers (teachers/flux.py): the tiny dev-shaped (guidance input) and schnell-shaped pipelines sample
through distill's teacher as diffusers' FluxPipeline does, every method trains on them, and a student exports."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import teachers
from distill import runs
from distill.config import TeacherConfig
from distill.errors import ConfigError, DistillError
from distill.evaluation import nfe
from distill.sampling import ddim_sample
from distill.trainer import build_method, train
from teachers import tiny
from distill.schedules import dynamic_shift

PROMPTS = ["a handwritten digit 7", "a cat"]


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {name: tiny.build(name, root / name) for name in ("tiny-flux-dev", "tiny-flux")}


def _pipeline_latents(folder, res, steps, seed, width=None, **call):
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    width = width or res
    packed = pipe(PROMPTS, num_inference_steps=steps, height=res, width=width, max_sequence_length=77,
                  output_type="latent", generator=torch.Generator().manual_seed(seed), **call).images
    return FluxPipeline._unpack_latents(packed, res, width, pipe.vae_scale_factor)


@pytest.mark.parametrize("name,res", [("tiny-flux-dev", 16), ("tiny-flux-dev", 32), ("tiny-flux", 32)])
def test_teacher_samples_as_the_flux_pipeline(flux_dirs, name, res):
    teacher = teachers.load(TeacherConfig(source=str(flux_dirs[name]), resolution=res))
    assert teacher.family == "flux" and teacher.guidance_embedded == (name == "tiny-flux-dev")
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    # the shift follows the token count: (res / 2 / 2)^2 tokens, mu linear from 0.5 at 256 to 1.15 at 4,096
    tokens = (res // 4) ** 2
    assert teacher.shift == pytest.approx(math.exp(0.5 + 0.65 * (tokens - 256) / 3840))
    cond = teacher.encode_prompts(PROMPTS)
    guidance = 3.5 if teacher.guidance_embedded else 1.0  # dev: the embedded scale, one pass
    ours = ddim_sample(teacher, cond, 3, torch.Generator().manual_seed(1), teacher.latent_shape(res, res), guidance)
    ref = _pipeline_latents(flux_dirs[name], res, 3, 1, guidance_scale=guidance)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    if not teacher.guidance_embedded:  # two-pass CFG against the empty prompt is FluxPipeline's true CFG
        ours = ddim_sample(teacher, cond, 2, torch.Generator().manual_seed(2), teacher.latent_shape(res, res), 4.0)
        ref = _pipeline_latents(flux_dirs[name], res, 2, 2, true_cfg_scale=4.0, negative_prompt=["", ""])
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    if res == 16:  # another size, here twice as wide, shifts by its own token count, as FluxPipeline's call does
        wide = teacher.latent_shape(res, 2 * res)
        assert teacher.shift_at(wide) == pytest.approx(math.exp(0.5 + 0.65 * (2 * tokens - 256) / 3840))
        ours = ddim_sample(teacher, cond, 3, torch.Generator().manual_seed(1), wide, guidance)
        ref = _pipeline_latents(flux_dirs[name], res, 3, 1, width=2 * res, guidance_scale=guidance)
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_a_dev_teacher_reads_guidance_as_an_input(flux_dirs):
    teacher = teachers.load(TeacherConfig(source=str(flux_dirs["tiny-flux-dev"]), resolution=16))
    calls = []
    teacher.backbone.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["guidance"]),
                                           with_kwargs=True)
    x = torch.randn(2, *teacher.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(PROMPTS)
    a = teacher.predict(x, 600.0, cond, guidance=5.0)[0]
    b = teacher.predict(x, 600.0, cond, guidance=torch.tensor([5.0, 2.0]))[0]
    assert [c.tolist() for c in calls] == [[5.0, 5.0], [5.0, 2.0]]  # one pass each, batch not doubled
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-4)


def test_a_guided_step_costs_one_evaluation_on_a_dev_teacher(flux_dirs, tmp_path):
    for name, cost in (("tiny-flux-dev", 4), ("tiny-flux", 8)):
        method = build_method(_cfg(flux_dirs[name], tmp_path, "consistency", "lora"), "cpu")
        assert nfe(method, 4, 3.5, teacher=True) == cost and nfe(method, 4, 1.0, teacher=True) == 4


def _cfg(folder, tmp_path, method, kind, student=(), **params):
    return runs.parse_config({"teacher": {"source": str(folder), "resolution": 16},
                              "student": {"kind": kind, "lora_rank": 4, **dict(student)},
                              "method": {"name": method, "params": params},
                              "data": {"kind": "digits", "batch_size": 2},
                              "train": {"output_dir": str(tmp_path / f"{method}-{kind}"), "max_steps": 2,
                                        "learning_rate": 1e-3, "checkpoint_every": 2, "log_every": 1,
                                        "turn_every": {"student": 1}}}, [])


METHODS = [("consistency", {"guidance_min": 2.0, "guidance_max": 6.0}), ("denoise", {}),
           ("progressive", {"start_steps": 4, "round_steps": 1}),
           ("add", {"feature_net": "vit_tiny_patch16_224", "feature_size": 32}), ("ladd", {}), ("dmd2", {})]


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_trains_on_the_dev_teacher(flux_dirs, tmp_path, method, params, kind):
    cfg = _cfg(flux_dirs["tiny-flux-dev"], tmp_path, method, kind, **params)
    trained = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / f"{method}-{kind}" / "metrics.jsonl").read_text().splitlines()]
    for turn in trained.turns:
        assert len(rows) == 2 and all(math.isfinite(r[f"{turn}/loss"]) for r in rows)
    init = build_method(cfg, "cpu")
    changed = [not torch.equal(a, b) for a, b in zip(trained.student.trainable_parameters(),
                                                       init.student.trainable_parameters())]
    assert sum(changed) > 0.5 * len(changed)
    fresh = teachers.load(TeacherConfig(source=str(flux_dirs["tiny-flux-dev"]), resolution=16))
    frozen = {n.replace(".base_layer", ""): p for n, p in trained.teacher.backbone.named_parameters()
              if "lora_" not in n}
    assert all(torch.equal(frozen[n], p) for n, p in fresh.backbone.named_parameters())


def test_guidance_distillation_makes_a_dev_like_student_of_a_cfg_teacher(flux_dirs, tmp_path):
    embed = {"guidance_embedding": True}
    cfg = _cfg(flux_dirs["tiny-flux"], tmp_path, "guidance", "full", embed)
    init = build_method(cfg, "cpu")
    student = init.student.backbone
    assert student.config.guidance_embeds and not init.teacher.backbone.config.guidance_embeds
    # the added guidance embedder starts at zero: the student is the teacher, whatever w it reads
    x = torch.randn(1, *init.teacher.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    cond = init.teacher.encode_prompts(PROMPTS[:1])
    teacher_x0 = init.teacher.predict(x, 500.0, cond)[0]
    for w in (1.0, 6.0):
        assert torch.allclose(init.teacher.predict(x, 500.0, cond, backbone=student, guidance_cond=w)[0],
                              teacher_x0, atol=1e-6)
    teacher_weights = {p.data_ptr() for p in init.teacher.backbone.parameters()}
    assert not teacher_weights & {p.data_ptr() for p in student.parameters()}  # its own copy, built without a draft
    train(cfg)
    dev = _cfg(flux_dirs["tiny-flux-dev"], tmp_path, "guidance", "full", embed)
    with pytest.raises(ConfigError, match="already reads the guidance scale as an input"):
        build_method(dev, "cpu")


def test_a_lora_student_of_the_dev_teacher_loads_in_diffusers(flux_dirs, tmp_path, cli):
    from test_export import _load_in_fresh_process, _same_as_generate

    teacher = flux_dirs["tiny-flux-dev"]
    from distill.exporting import export as write

    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "experiments/lcm_digits_sdxl.yaml"
    train(runs.load_config(recipe, [
        f"teacher.source={teacher}", "teacher.resolution=32", f"train.output_dir={run}", "train.max_steps=2",
        "data.batch_size=2", "train.checkpoint_every=2", "student.lora_alpha=32"]))
    export = write(run, tmp_path / "export", ["lora", "kohya", "merged", "single-file"], steps=1)
    facts = json.loads((export / "distill_export.json").read_text())
    assert facts["family"] == "flux" and facts["scheduler"] == "FlowMatchLCMScheduler"
    assert facts["pipeline_call"]["guidance_scale"] == 1.0  # sample.guidance_scale, the input distill feeds
    # the kohya file in BFL's names holds exactly the diffusers LoRA's updates, q, k and v fused
    ours = load_file(export / "pytorch_lora_weights.safetensors")
    kohya = load_file(export / "lora_kohya.safetensors")
    assert {k.split(".")[0] for k in kohya} == {
        "lora_unet_double_blocks_0_" + m for m in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
                                                   "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        "lora_unet_single_blocks_0_linear1"}
    _same(_updates_from_kohya(kohya, 1, 1, width=32), _updates(ours, 32.0, "transformer."))
    # the single file: the merged transformer in BFL's layout (diffusers reads it back: the test below)
    single = load_file(export / facts["single_file"])
    merged = load_file(export / "pipeline/transformer/diffusion_pytorch_model.safetensors")
    assert "double_blocks.0.img_attn.qkv.weight" in single and len(single) < len(merged)
    assert torch.equal(single["single_blocks.0.linear2.weight"], merged["single_transformer_blocks.0.proj_out.weight"])
    assert "FluxTransformer2DModel.from_single_file" in (export / "README.md").read_text()
    loaded, stdout = _load_in_fresh_process(teacher, export, ["lora", "merged"], tmp_path, 1)
    # every LoRA module of the file lands in FluxPipeline's transformer
    adapters = [k for k in load_file(export / "pytorch_lora_weights.safetensors") if k.endswith("lora_A.weight")]
    assert adapters and f"lora lora modules {len(adapters)}\n" in stdout, stdout
    for images in loaded.values():
        _same_as_generate(images, run, tmp_path, cli, 1)


def test_the_pipeline_call_guides_as_distill_samples(flux_dirs):
    dev = teachers.load(TeacherConfig(source=str(flux_dirs["tiny-flux-dev"]), resolution=16))
    plain = teachers.load(TeacherConfig(source=str(flux_dirs["tiny-flux"]), resolution=16))
    assert dev.call_guidance(3.5, False) == {"guidance_scale": 3.5}  # the backbone's input
    assert plain.call_guidance(1.0, False) == {"guidance_scale": 1.0}
    assert plain.call_guidance(4.0, True) == {"guidance_scale": 4.0}  # a w-student gained the input
    assert plain.call_guidance(4.0, False) == {"true_cfg_scale": 4.0, "negative_prompt": ""}  # two-pass CFG
    assert plain.call_size(32, 16) == {"height": 32, "width": 16}  # the pipeline shifts by the size, as distill
    with pytest.raises(DistillError, match="at most 512 T5 tokens"):
        teachers.load(TeacherConfig(source=str(flux_dirs["tiny-flux"]), resolution=16, max_text_length=600))


def test_flux_bad_input_is_one_line(flux_dirs, tmp_path, cli):
    cfg = _cfg(flux_dirs["tiny-flux-dev"], tmp_path, "consistency", "lora")
    cfg.teacher.resolution = 18
    with pytest.raises(DistillError, match="multiples of 4 px"):
        build_method(cfg, "cpu")
    single = tmp_path / "flux.safetensors"
    single.write_bytes(b"")
    proc = cli("train", "experiments/lcm_digits_sdxl.yaml", f"teacher.source={single}", "teacher.family=flux",
               check=False)
    assert proc.returncode == 2 and "teacher.config" in proc.stderr and "transformer alone" in proc.stderr
    assert dynamic_shift(4096, {"use_dynamic_shifting": True}) == pytest.approx(math.exp(1.15))
    assert dynamic_shift(10, {"shift": 3.0}) == 3.0
    # a scheduler whose times distill's exponential dynamic shift would not follow is refused, not misread
    pipe = FluxPipeline.from_pretrained(flux_dirs["tiny-flux-dev"])
    for change in ({"time_shift_type": "linear"}, {"shift_terminal": 0.02}):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **change)
        with pytest.raises(DistillError, match="exponential dynamic shift only"):
            teachers.wrap(pipe, TeacherConfig(source=str(flux_dirs["tiny-flux-dev"]), resolution=32))


def _probe(width):
    return torch.randn(width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)


def _updates(lora, alpha, prefix=""):
    """{diffusers module: its weight update B A alpha / r applied to a fixed probe vector} of a peft-named LoRA (alpha
    None: scale 1, as diffusers loads a converted LoRA)."""
    out = {}
    for key, down in lora.items():
        if key.endswith("lora_A.weight"):
            up = lora[key.replace("lora_A", "lora_B")].double()
            out[key.removeprefix(prefix).removesuffix(".lora_A.weight")] = up @ (down.double() @ _probe(
                down.shape[1])) * (1.0 if alpha is None else alpha / len(down))
    return out


def _updates_from_kohya(kohya, double, single, width):
    """The same, read from a kohya FLUX LoRA: each fused module's update cut into its parts' rows."""
    from teachers.flux import BFL

    out = {}
    for kind, count in (("transformer_blocks", double), ("single_transformer_blocks", single)):
        block, plain, fused = BFL[kind]
        for i in range(count):
            names = {f"{block}.{i}.{v}": [f"{kind}.{i}.{k}"] for k, v in plain.items()}
            names |= {f"{block}.{i}.{k}": [f"{kind}.{i}.{p}" for p in v] for k, v in fused.items()}
            for bfl, parts in names.items():
                key = "lora_unet_" + bfl.replace(".", "_")
                if f"{key}.lora_down.weight" not in kohya:
                    continue
                down, up = kohya[f"{key}.lora_down.weight"].double(), kohya[f"{key}.lora_up.weight"].double()
                delta = up @ (down @ _probe(down.shape[1])) * float(kohya[f"{key}.alpha"]) / len(down)
                rows = [width] * (len(parts) - 1) + [len(up) - width * (len(parts) - 1)]  # the MLP part is last
                for part, piece in zip(parts, delta.split(rows)):
                    if piece.abs().sum() > 0:  # a part without a LoRA is all zeros
                        out[part] = piece
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_kohya_flux_names_convert_back_whole_in_diffusers():
    """At FLUX.1-dev's own sizes (19 double and 38 single blocks, width 3072, MLP 12288), a rank-2 LoRA on every
    default target written in BFL's names is read back by diffusers' kohya-FLUX converter, every module applied,
    each update as it was."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from teachers.flux import bfl_lora

    gen = torch.Generator().manual_seed(0)
    width, mlp = 3072, 12288
    shapes = {"attn.to_q": (width, width), "attn.to_k": (width, width), "attn.to_v": (width, width)}
    double = {**shapes, "attn.add_q_proj": (width, width), "attn.add_k_proj": (width, width),
              "attn.add_v_proj": (width, width), "attn.to_out.0": (width, width), "attn.to_add_out": (width, width),
              "ff.net.0.proj": (width, mlp), "ff.net.2": (mlp, width), "ff_context.net.0.proj": (width, mlp),
              "ff_context.net.2": (mlp, width)}
    single = {**shapes, "proj_mlp": (width, mlp)}
    pairs = {}
    for kind, count, modules in (("transformer_blocks", 19, double), ("single_transformer_blocks", 38, single)):
        for i in range(count):
            for name, (fan_in, fan_out) in modules.items():
                if (kind, i, name) == ("transformer_blocks", 3, "attn.to_k"):
                    continue  # a part without a LoRA: its rows of the fused module stay zero
                pairs[f"{kind}.{i}.{name}"] = (torch.randn(2, fan_in, generator=gen),
                                               torch.randn(fan_out, 2, generator=gen))
    kohya = bfl_lora(pairs, 4.0, lambda name: width)
    peft = {f"{k}.lora_A.weight": a for k, (a, _) in pairs.items()} | {f"{k}.lora_B.weight": b
                                                                          for k, (_, b) in pairs.items()}
    expected = _updates(peft, 4.0)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))  # it consumes what it converts, and refuses leftovers
    assert "transformer.transformer_blocks.3.attn.to_k.lora_A.weight" in back  # the zero part, converted as zeros
    converted = _updates({k: v for k, v in back.items() if "lora_" in k}, None, "transformer.")
    _same({k: v for k, v in converted.items() if v.abs().sum() > 0}, expected)
    assert _updates_from_kohya(kohya, 19, 38, width).keys() == expected.keys()


def test_a_single_file_flux_teacher_is_the_folder_teacher(flux_dirs, tmp_path):
    """A transformer in BFL's layout (flux1-dev.safetensors' keys, also under ComfyUI's model.diffusion_model.) with
    teacher.config naming the pipeline folder for the rest reads back as the same teacher: identical predictions.
    A file read with the other kind's config (dev's guidance_in, schnell's config) is refused."""
    from safetensors.torch import save_file

    from teachers.flux import bfl_single_file

    dev = flux_dirs["tiny-flux-dev"]
    folder = teachers.load(TeacherConfig(source=str(dev), resolution=32))
    state = bfl_single_file(folder.backbone)
    save_file(state, tmp_path / "bare.safetensors")
    save_file({**{f"model.diffusion_model.{k}": v for k, v in state.items()},  # ComfyUI's checkpoint: VAE beside
               "vae.decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "comfy.safetensors")
    x = torch.randn(2, *folder.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = folder.encode_prompts(PROMPTS)
    want = folder.predict(x, 700.0, cond, 3.5)[0]
    for name in ("bare", "comfy"):
        single = teachers.load(TeacherConfig(source=str(tmp_path / f"{name}.safetensors"), family="flux",
                                             config=str(dev), resolution=32))
        assert single.guidance_embedded and torch.equal(single.predict(x, 700.0, cond, 3.5)[0], want)
    with pytest.raises(DistillError, match="guidance_in.* not in the config"):
        teachers.load(TeacherConfig(source=str(tmp_path / "bare.safetensors"), family="flux",
                                    config=str(flux_dirs["tiny-flux"]), resolution=32))


def test_bfl_single_file_converts_back_exactly_in_diffusers():
    """A FLUX transformer written in Black Forest Labs' layout is read back by diffusers' single-file converter
    (what FluxTransformer2DModel.from_single_file runs; it assumes FLUX.1's width 3072, so the model has that
    width, one double and one single block) tensor for tensor: every key, shape and row, fused q/k/v and the final
    modulation's swapped halves included. Rows differ in value, so a mixed-up order shows."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from teachers.flux import bfl_single_file, from_bfl

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32,
                                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    # each tensor's rows numbered apart, the columns broadcast (no memory): a key or row out of place is seen
    state = {k: (i + torch.arange(v.shape[0]) / v.shape[0]).reshape(-1, *[1] * (v.dim() - 1)).expand(v.shape)
             for i, (k, v) in enumerate(model.state_dict().items())}
    bfl = bfl_single_file(SimpleNamespace(state_dict=lambda: state))  # all it reads of a transformer
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    ours = from_bfl(bfl, state)  # distill's own reader (any width) agrees
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)

