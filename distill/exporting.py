"""`distill export RUN_OR_CHECKPOINT --to DIR`: a trained student in the formats other tools load as they are.

- `lora`: DIR/pytorch_lora_weights.safetensors, for `pipeline.load_lora_weights(DIR)` (SDXL, SD3, FLUX).
- `kohya`: DIR/lora_kohya.safetensors, `lora_unet_*` keys with `.alpha` tensors, for ComfyUI, A1111 and
  diffusers' kohya loading path (SDXL and FLUX families). The module names inside the keys are the original ones
  A1111 and ComfyUI expect, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (SDXL's LDM names),
  lora_unet_double_blocks_0_img_attn_qkv (Black Forest Labs' FLUX names, q, k and v in one module).
- `merged`: DIR/pipeline/, the LoRA fused into the backbone (or the full student's backbone), saved as a
  diffusers pipeline with the scheduler that samples as distill does; `DiffusionPipeline.from_pretrained`.
- `single-file`: DIR/<family>_<method>_<n>step.safetensors, the fused student with the rest of the pipeline in
  the original layout: one file for A1111 and ComfyUI, or `from_single_file(path, config=<the teacher>)`
  (SDXL and SD3). FLUX: the transformer alone in Black Forest Labs' layout (as flux1-dev.safetensors), for
  ComfyUI's diffusion-model loader or `FluxTransformer2DModel.from_single_file`. A compressed UNet student's file
  keeps its own block counts; diffusers reads it with `config=DIR/pipeline`, the merged folder written beside it.
A full student with a w embedding keeps it in the merged backbone (`time_cond_proj_dim`, which diffusers'
SDXL pipelines feed with `guidance_scale`); it has no LoRA form.

Every export also holds README.md (the model card: teacher, method, how to sample, leaderboard rows, the
training config), samples.png and distill_export.json (the same facts for programs). It is written to a
temporary folder next to DIR and renamed into place only when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import students
from students import compressed
from distill import checkpoint, config, data, digits, leaderboard, paths
from distill.errors import DistillError
from distill.evaluation import git_commit, sample_images, write_grid
from distill.runs import load_run
from distill.sampling import diffusers_sampling

FORMATS = ("lora", "kohya", "merged", "single-file")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kohya_state(student: students.Student, teacher, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LoRA in kohya's keys, as the teacher's family names its modules (Teacher.kohya_lora)."""
    alpha = float(student.backbone.peft_config[students.STUDENT_ADAPTER].lora_alpha)
    layers = students.lora_layers(student, dtype)  # <module>.lora_A.weight / .lora_B.weight
    pairs = {key.removesuffix(".lora_A.weight"): (v, layers[key.replace(".lora_A.", ".lora_B.")])
             for key, v in layers.items() if key.endswith(".lora_A.weight")}
    return teacher.kohya_lora(pairs, alpha)


def _check_target(to: Path, ckpt: Path, overwrite: bool) -> Path:
    """The export folder, resolved (symlinks too). It never holds the checkpoint, its run or its teacher (an earlier
    merged export, say), and --overwrite replaces only an earlier export, which distill_export.json marks."""
    to, ckpt = to.expanduser().resolve(), ckpt.resolve()
    if paths.contains(to, ckpt):
        raise DistillError(f"--to {to} holds the run being exported ({ckpt}); exporting there would delete it, "
                           "so choose another folder")
    source = str(config.read_yaml(ckpt / "config.yaml").get("teacher", {}).get("source", ""))
    if source and not source.startswith("builtin:") and Path(source).expanduser().exists() \
            and paths.contains(to, Path(source)):
        raise DistillError(f"--to {to} holds the teacher of the run being exported ({source}); exporting there "
                           "would delete it, so choose another folder")
    if to.is_dir() and any(to.iterdir()):
        if not overwrite:
            raise DistillError(f"--to {to} is not empty; pass --overwrite to replace an earlier export")
        if not (to / "distill_export.json").is_file():
            raise DistillError(f"--to {to} is not an earlier export (it has no distill_export.json); --overwrite "
                               "only replaces those, so choose an empty or new folder")
    return paths.check_writable(to, "--to")


def _check(student, teacher, formats: list[str]) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise DistillError(f"unknown export format '{unknown[0]}'; allowed: {', '.join(FORMATS)}")
    if not teacher.is_pipeline:
        raise DistillError(f"a student of the {teacher.family} teacher has no diffusers pipeline to export to")
    if student.kind == "full" and {"lora", "kohya"} & set(formats):
        raise DistillError(f"this is a {'compressed' if student.plan is not None else 'full'} student: it has no "
                           "LoRA to export; use --format merged")
    if "kohya" in formats and "kohya" not in teacher.lora_formats:
        raise DistillError(f"no kohya LoRA layout is known for the {teacher.family} family; "
                           "use --format lora (diffusers) or merged")
    if "single-file" in formats and not teacher.single_file:
        raise DistillError(f"no single-file layout is known for the {teacher.family} family; use --format merged "
                           "(a diffusers folder)")
    # the student's config has one layer count for every stage (compressed.student_config) or it has no such file
    if "single-file" in formats and student.plan is not None and not isinstance(
            student.backbone.config.get("layers_per_block"), int):
        raise DistillError("a compressed student's single file is written for a UNet with the same layer count in "
                           "every stage, and this one is not; use --format merged (a diffusers folder with the "
                           "student's own config)")
    if "single-file" in formats and student.guidance_input and not teacher.single_file_w:
        raise DistillError("this student reads the guidance scale w, and the original single-file layout has no "
                           "w input; use --format merged")


def _usage(teacher, sampling: dict, folder: Path, formats: list[str], single_file: str) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in sampling["pipeline_call"].items())
    cls, sched_cls = teacher.pipeline_class.__name__, sampling["scheduler"]
    changes = "".join(f", {k}={v!r}" for k, v in sampling["scheduler_config"].items())
    scheduler = f"pipe.scheduler = {sched_cls}.from_config(pipe.scheduler.config{changes})"
    if "merged" in formats:
        load = f'pipe = {cls}.from_pretrained("{folder}/pipeline")  # its scheduler is already {sched_cls}'
    elif "single-file" in formats:  # the teacher's configs; its scheduler config with distill's sampler's changes
        load = f'{teacher.single_file_usage(f"{folder}/{single_file}", "<the teacher>")}\n{scheduler}'
    else:
        load = f'pipe = {cls}.from_pretrained("<the teacher>")\n{scheduler}\npipe.load_lora_weights("{folder}")'
    if "single-file" in formats and "merged" in formats:  # the folder's configs serve the file too
        other = teacher.single_file_usage(f"{folder}/{single_file}", f"{folder}/pipeline").replace("\n", "\n# ")
        load += f"\n# or, from the single file (its configs from the folder):\n# {other}"
    names = [cls, sched_cls] + ["FluxTransformer2DModel"] * ("FluxTransformer2DModel" in load)
    return (f"import torch\nfrom diffusers import {', '.join(names)}\n\n{load}\n"
            f'image = pipe("your prompt", {args}).images[0]')


def export(run: Path, to: Path, formats: list[str] | None = None, dtype: str = "fp32", steps: int | None = None,
           prompts: list[str] | None = None, overwrite: bool = False, db: Path | None = None) -> Path:
    to = Path(to)
    if dtype not in DTYPES:
        raise DistillError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    found = checkpoint.find(Path(run), str(run))
    to = _check_target(to, found, overwrite)
    with paths.lock(to, "--to"):
        _check_target(to, found, overwrite)  # again under the lock: another export may have filled it meanwhile
        return _export(run, to, formats, dtype, steps, prompts, db)


def _export(run: Path, to: Path, formats: list[str] | None, dtype: str, steps: int | None,
            prompts: list[str] | None, db: Path | None) -> Path:
    ckpt, cfg, method, step = load_run(Path(run))
    checkpoint.require_finite(method.state_to_save(), f"checkpoint {ckpt} cannot be exported")
    student, teacher = method.student, method.teacher
    if formats is None:
        formats = ["merged"] if student.kind == "full" else list(teacher.lora_formats)
    _check(student, teacher, formats)
    if student.plan is not None and "single-file" in formats and "merged" not in formats:
        formats = [*formats, "merged"]  # a compressed student's single file is read with the folder's UNet config
    steps = steps or cfg.sample.steps
    method.sample_times(steps)  # a step count the student's grid cannot give is refused before any work
    guidance = cfg.sample.guidance_scale
    sched, sampling = diffusers_sampling(method, cfg, steps)
    single_file = f"{teacher.family}_{cfg.method.name}_{steps}step.safetensors"

    with paths.atomic_folder(to) as tmp:
        prompts = prompts or {"digit_pairs": digits.PAIR_PROMPTS[::11], "digit_stacks": digits.STACK_PROMPTS[::11]}.get(
            cfg.data.kind, digits.DIGIT_PROMPTS)
        images, _ = sample_images(method, prompts, steps, 0, guidance, teacher=False,
                                  size=data.sample_size(cfg, teacher), sized=cfg.data.buckets is not None)
        write_grid(images, 1, tmp / "samples.png")
        torch_dtype = DTYPES[dtype]
        if "lora" in formats:
            students.save_lora(student, teacher, tmp, torch_dtype)
        if "kohya" in formats:
            save_file(kohya_state(student, teacher, torch_dtype), str(tmp / "lora_kohya.safetensors"),
                      metadata={"ss_network_module": "networks.lora", "ss_base_model_version": teacher.kohya_base_model,
                                "distill_method": cfg.method.name})
        if {"merged", "single-file"} & set(formats):  # last: fusing changes the student in place
            backbone = students.fuse_lora(student.backbone) if student.kind == "lora" else student.backbone
            teacher.pipe.to(torch_dtype)
            backbone = backbone.to(torch_dtype)
            if "merged" in formats:
                students.save_pipeline(teacher, backbone, tmp / "pipeline", scheduler=sched)
            if "single-file" in formats:
                save_file({k: v.contiguous() for k, v in teacher.single_file_state(backbone).items()},
                          str(tmp / single_file),
                          metadata={"distill_method": cfg.method.name, "distill_steps": str(steps),
                                    "distill_sampling": json.dumps(sampling)})

        sizes = data.trained_sizes(cfg.data, teacher)
        facts = {"teacher": cfg.teacher.source, "family": teacher.family, "method": cfg.method.name,
                 "student": cfg.student.kind, "train_steps": step, "steps": steps, "guidance_scale": guidance,
                 **sampling, "sizes": [list(s) for s in sizes],
                 "formats": formats, "dtype": dtype,
                 **({"single_file": single_file} if "single-file" in formats else {}),
                 "config_hash": cfg.hash(), "git_commit": git_commit(), "checkpoint": str(ckpt)}
        (tmp / "distill_export.json").write_text(json.dumps(facts, indent=2) + "\n")
        rows = []
        if db and Path(db).is_file():
            board = leaderboard.Leaderboard(db, readonly=True)  # the card only reads the leaderboard
            rows = [r for r in board.rows("nfe") if r["config_hash"] == cfg.hash()
                    or (r["method"] == "teacher" and r["teacher"] == cfg.teacher.source)]
        card = [
            "---", yaml.safe_dump({"library_name": "diffusers", "base_model": cfg.teacher.source,
                                   "tags": ["distill", "text-to-image", cfg.method.name, teacher.family,
                                            cfg.student.kind]}).strip(), "---", "",
            f"# {cfg.method.name} student of {cfg.teacher.source}", "",
            f"A {cfg.student.kind} student trained for {step} steps with distill's `{cfg.method.name}` method; it "
            f"samples in {steps} steps with `{type(sched).__name__}` at guidance scale {guidance}. "
            f"Weights are {dtype}.", "",
            *([f"Compressed from the teacher's backbone: removal plan `{json.dumps(student.plan)}`, "
               f"{compressed.parameters(student.backbone) / 1e6:.4g}M parameters against the teacher's "
               f"{compressed.parameters(teacher.backbone) / 1e6:.4g}M.", ""] if student.plan is not None else []),
            "## Sampling", "", "```python", _usage(teacher, sampling, to, formats, single_file), "```", "",
            "The call gives the exact times distill samples at (`timesteps`/`sigmas`) and a size it was trained at "
            "(`height`, `width`); `distill generate` makes the same images from the same seed.", "",
            *([f"Trained on aspect-ratio buckets: height x width {', '.join(f'{h} x {w}' for h, w in sizes)}. "
               "Pass any of them as `height` and `width`: the pipeline conditions each call on its own size, as the "
               "student was trained.", ""] if len(sizes) > 1 else []),
            "## Files", "",
            *(f"- `{f}`" for f in sorted(p.name for p in tmp.iterdir())), "- `README.md`", "",
            "## Leaderboard", "", leaderboard.markdown(rows).split("\n", 2)[2] if rows else
            "No leaderboard rows for this recipe yet (`distill eval` adds them).", "",
            "## Samples", "", "![samples](samples.png)", "", "## Training config", "", "```yaml",
            yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", ""]
        (tmp / "README.md").write_text("\n".join(card))
    return to
