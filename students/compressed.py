"""Compressed students: the teacher's backbone with blocks removed, its surviving weights copied from the teacher
(BK-SDM, Kim et al. 2023, and KOALA, Lee et al. 2024, initialise their students this way).

A removal plan says what survives, per family:
- UNet (SDXL): `layers` (residual/attention layers per down stage; each up stage has one more, as in the teacher,
  so the skip connections still pair up), `depth` (transformer blocks per attention layer, per down stage; the up
  stages mirror it) and `mid` (keep the mid block or not);
- MMDiT (SD3) and FLUX: `blocks` (indices of the joint/double-stream blocks kept) and, for FLUX, `single_blocks`.
A plan is a preset name (`half`, or one of UNET_PRESETS) or a dict of those keys; keys left out keep the teacher's
value.

Which teacher layer a surviving layer copies: the first ones of each down stage and transformer block stack; in an
up stage the first layer and the teacher's last ones (the first up layer reads the previous up block's width, the
last the skip from the outer stage's downsampler or conv_in, so only the teacher's first and last have those
shapes; the middle ones are taken from the end so that each reads the same down layer's output as in the teacher,
up blocks reading the skips from the last down layer backwards); the listed blocks of a transformer (BK-SDM's
copy maps the same way). `compress` builds the student on the meta device and fills every tensor from the teacher,
so nothing is left at random.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from distill.errors import ConfigError

# Named plans for an SDXL-like UNet (three stages: plain, attention depth 2, attention depth 10; the mid block takes
# the last stage's depth). Parameter counts at SDXL's real size: experiments/results/compressed_students.md.
UNET_PRESETS = {
    # BK-SDM's removals (one residual-attention pair per down stage, so two per up stage; small also drops the mid
    # block)
    "bk-base": {"layers": 1},
    "bk-small": {"layers": 1, "mid": False},
    # KOALA-1B's and -700M's shape (Lee et al. 2024): as bk-base, with transformer depth 6 (1B) or 5 (700M) at the
    # lowest resolution; 700M drops the mid block. They come to KOALA's reported 1,161M and 782M UNet parameters;
    # which transformer blocks survive (the first) is this code's choice
    "koala-1b": {"layers": 1, "depth": [1, 2, 6]},
    "koala-700m": {"layers": 1, "depth": [1, 2, 5], "mid": False},
}


def _halve(n: int) -> int:
    return max(1, n // 2)


def _every_other(n: int, keep_last: bool) -> list[int]:
    """Every other block index of n, counted from the last one where the last must stay."""
    return sorted(range(n - 1, -1, -2)) if keep_last else list(range(0, n, 2))


def kind(backbone: nn.Module) -> str:
    name = type(backbone).__name__
    return {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "mmdit", "FluxTransformer2DModel": "flux"}.get(
        name, name)


def resolve(plan: str | dict | None, backbone: nn.Module) -> dict:
    """The explicit plan for `backbone`: a preset expanded for its config, or a dict checked against it."""
    c, k = backbone.config, kind(backbone)
    stages = len(c.down_block_types) if k == "unet" else 0
    if plan is None or plan == "half":  # about half of every repeated part, on any family
        if k == "unet":
            layers, depth = _per_stage(c.layers_per_block, stages), _per_stage(c.transformer_layers_per_block, stages)
            plan = {"layers": [_halve(n) for n in layers], "depth": [_halve(d) for d in depth], "mid": False}
        elif k in ("mmdit", "flux"):
            plan = {"blocks": _every_other(c.num_layers, keep_last=k == "mmdit")}
            if k == "flux":
                plan["single_blocks"] = _every_other(c.num_single_layers, keep_last=False)
    elif isinstance(plan, str):
        if plan not in UNET_PRESETS or k != "unet":
            raise ConfigError("student.compression", plan, f"presets for this backbone ({k}): half" +
                              (", " + ", ".join(UNET_PRESETS) if k == "unet" else ""))
        plan = dict(UNET_PRESETS[plan])
    allowed = {"unet": ("layers", "depth", "mid"), "mmdit": ("blocks",), "flux": ("blocks", "single_blocks")}
    if k not in allowed:
        raise ConfigError("student.kind", "compressed", f"no removal plan is known for a {k} backbone")
    extra = sorted(set(plan) - set(allowed[k]))
    if extra:
        raise ConfigError("student.compression", plan, f"unknown keys {extra}; a {k} plan takes {list(allowed[k])}")
    if k == "unet":
        teacher = {"layers": _per_stage(c.layers_per_block, stages),
                   "depth": _per_stage(c.transformer_layers_per_block, stages)}
        if not isinstance(plan.get("mid", True), bool):
            raise ConfigError("student.compression.mid", plan["mid"], "must be true or false")
        out = {"mid": plan.get("mid", c.mid_block_type is not None) and c.mid_block_type is not None}
        for key in ("layers", "depth"):
            out[key] = _per_stage(plan.get(key, teacher[key]), stages)
            if not all(1 <= n <= m for n, m in zip(out[key], teacher[key])):
                raise ConfigError(f"student.compression.{key}", plan.get(key),
                                  f"each stage keeps 1 to the teacher's {teacher[key]}")
        return out
    out = {}
    for key, total in (("blocks", c.num_layers), ("single_blocks", getattr(c, "num_single_layers", 0))):
        if key not in allowed[k]:
            continue
        kept = sorted(set(plan.get(key, range(total))))
        if not kept or not all(isinstance(i, int) and 0 <= i < total for i in kept):
            raise ConfigError(f"student.compression.{key}", plan.get(key), f"indices in 0..{total - 1}, at least one")
        if k == "mmdit" and kept[-1] != total - 1:  # SD3's last block reads the text without updating it
            raise ConfigError(f"student.compression.{key}", plan.get(key), f"must keep the last block ({total - 1})")
        out[key] = kept
    return out


def _per_stage(value, stages: int) -> list[int]:
    if isinstance(value, int):
        return [value] * stages
    if len(value) != stages or not all(isinstance(v, int) for v in value):
        raise ConfigError("student.compression", value, f"one integer per stage ({stages} stages)")
    return list(value)


def student_config(backbone: nn.Module, plan: dict) -> dict:
    """The backbone config of the compressed student (a plan from `resolve`)."""
    config, k = dict(backbone.config), kind(backbone)
    if k == "unet":
        # the same layer count in every stage is written as one number, as diffusers' own configs have it (the
        # single-file converter, diffusers' and ComfyUI's, reads only that form)
        layers = plan["layers"][0] if len(set(plan["layers"])) == 1 else plan["layers"]
        config.update(layers_per_block=layers, transformer_layers_per_block=plan["depth"],
                      reverse_transformer_layers_per_block=None,
                      mid_block_type=config["mid_block_type"] if plan["mid"] else None)
    else:
        config["num_layers"] = len(plan["blocks"])
        if k == "flux":
            config["num_single_layers"] = len(plan["single_blocks"])
        dual = config.get("dual_attention_layers") or ()
        if dual:
            config["dual_attention_layers"] = tuple(i for i, old in enumerate(plan["blocks"]) if old in dual)
    return {key: v for key, v in config.items() if not key.startswith("_")}


def source_name(name: str, teacher: nn.Module, plan: dict) -> str:
    """The teacher tensor that the student's tensor `name` is copied from."""
    k = kind(teacher)
    if k == "unet":
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name)
        if m:
            stage, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n_student = plan["layers"][::-1][stage] + 1
            n_teacher = len(getattr(teacher.up_blocks[stage], part))
            return f"up_blocks.{stage}.{part}.{j if j == 0 else j + n_teacher - n_student}.{rest}"
        return name
    for key, prefix in (("blocks", "transformer_blocks"), ("single_blocks", "single_transformer_blocks")):
        m = re.match(rf"{prefix}\.(\d+)(\..*)?$", name)
        if m:
            return f"{prefix}.{plan[key][int(m[1])]}{m[2] or ''}"
    return name


@torch.no_grad()
def compress(teacher: nn.Module, plan: str | dict | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new backbone: `teacher` with the blocks `plan` removes taken out, every tensor copied from the teacher."""
    plan = resolve(plan, teacher)
    with torch.device("meta"):
        student = type(teacher).from_config(student_config(teacher, plan))
    device = next(teacher.parameters()).device
    student = student.to_empty(device=device)
    if dtype != torch.float32:
        student = student.to(dtype)
    # a teacher carrying LoRA adapters (a LoRA method's, DMD2's fake score) is read as its base layers
    source = {name.replace(".base_layer.", "."): t for name, t in [*teacher.named_parameters(),
                                                                   *teacher.named_buffers()] if "lora_" not in name}
    for name, t in [*student.named_parameters(), *student.named_buffers()]:
        s = source[source_name(name, teacher, plan)]
        if s.shape != t.shape:
            raise ConfigError("student.compression", plan, f"{name} does not fit the teacher's tensor ({s.shape})")
        t.copy_(s)
    return student.eval()


def parameters(module: nn.Module) -> int:
    """The network's own parameters, without LoRA adapters (a student's, or DMD2's fake score on the teacher)."""
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)


def feature_pairs(student: nn.Module, teacher: nn.Module, plan: dict) -> list[tuple[tuple, tuple]]:
    """(student layer, teacher layer) pairs whose outputs feature distillation matches, each as (module name, index
    of the output tuple or None): every self-attention of a UNet (KOALA finds self-attention features carry the
    most, Lee et al. 2024; matching every one is this code's choice), every kept block's image tokens of a
    transformer. Each student layer is matched to the teacher layer it was copied from. The family is read off the
    teacher: FSDP renames a sharded student's class."""
    if kind(teacher) == "unet":
        names = [(n, None) for n, _ in student.named_modules() if n.endswith(".attn1")]
    else:
        names = [(n, 1) for n, _ in student.named_modules()
                 if re.fullmatch(r"(single_)?transformer_blocks\.\d+", n)]
    return [((n, i), (source_name(n, teacher, plan), i)) for n, i in names]


def feature_loss(teacher, student: nn.Module, plan: dict, x0: torch.Tensor, cond, t, noise,
                 prediction_type: str | None = None, guidance_cond=None) -> tuple:
    """Feature and output distillation of a compressed student on x_t = alpha x0 + sigma noise, unguided. The
    feature term: the mean over matched layers of ||f_s - f_t||^2 / ||f_t||^2 over the batch (each layer's error
    normalised by the teacher feature's magnitude, as LAPTOP-Diff's normalised feature distillation, Zhang et al.
    2024; averaged over layers, where LAPTOP sums). The output term: the squared error between the two predictions
    in the family's own space (eps, v or the flow velocity; BK-SDM's output distillation, Kim et al. 2023, compares
    the raw outputs). `prediction_type`: how the student's output is read (a progressive student's x or v);
    `guidance_cond`: a w-reading student's w (1: unguided)."""
    from discriminators.teacher_heads import capture
    from distill.solvers import loss_space, prediction_loss

    pairs = feature_pairs(student, teacher.backbone, plan)
    x_t = teacher.add_noise(x0, noise, t)
    with torch.no_grad(), capture(teacher.backbone, [p[1] for p in pairs]) as theirs:
        x_t0, eps_t = teacher.predict(x_t, t, cond)
    with capture(student, [p[0] for p in pairs]) as mine:
        x_s0, eps_s = teacher.predict(x_t, t, cond, backbone=student, guidance_cond=guidance_cond,
                                      prediction_type=prediction_type)
    terms = [(a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-8)
             for a, b in zip(mine, theirs, strict=True)]
    feature = torch.stack(terms).mean()
    alpha, sigma = (v.to(x_t.device) for v in teacher.alpha_sigma(t))
    output = prediction_loss(x_s0, eps_s, x_t0, eps_t, alpha, sigma, loss_space(teacher.prediction_type))
    return feature + output, {"kd_feature": feature.item(), "kd_output": output.item()}
