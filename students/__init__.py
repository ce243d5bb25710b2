"""Students: a LoRA on the teacher's own backbone, or a full trainable copy with an EMA.

A LoRA student shares every weight with its teacher; the teacher runs the same backbone with the
adapters switched off (teachers.base.adapters_disabled), so one copy of the weights is in memory.
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors.torch import save_file
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from distill import checkpoint, paths
from distill.config import StudentConfig
from distill.errors import ConfigError, DistillError
from students import compressed
from teachers.base import Teacher, adapter_layers, adapter_state, adapters_as, set_adapter_state


STUDENT_ADAPTER = "default"  # the student's LoRA adapter name (peft's default; what diffusers' files carry)


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, kind: str, ema_decay: float | None = None, guidance_input: bool = False,
                 plan: dict | None = None, feature_weight: float = 0.0):
        super().__init__()
        self.backbone, self.kind, self.ema_decay, self.guidance_input = backbone, kind, ema_decay, guidance_input
        # a compressed student: its removal plan (students.compressed) and the weight of its feature distillation
        self.plan, self.feature_weight = plan, feature_weight
        # A full student keeps an EMA copy (LCM's target network theta^-) when its method reads one (ema_decay given):
        # a backbone's copy, 10 GB in float32 for SDXL. A LoRA student is its own target.
        self.ema = (copy.deepcopy(backbone).requires_grad_(False).eval()
                    if kind == "full" and ema_decay is not None else None)

    @property
    def target(self) -> nn.Module:
        return self.ema if self.ema is not None else self.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.kind == "lora":  # the student's own adapter, not others on the same backbone (DMD2's fake score)
            return adapter_parameters(self.backbone, STUDENT_ADAPTER)
        return [p for p in self.backbone.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        for e, p in zip(self.ema.parameters(), self.backbone.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.ema_decay)

    def train(self, mode: bool = True):
        self.backbone.train(mode)
        return self

    def snapshot(self, into: nn.Module | None = None):
        """The student as it is now, frozen: a LoRA student's adapter weights by parameter name, or a full student's
        weights copied into `into` (a module of the same shape, made once: a sharded module can only be filled)."""
        if self.kind == "lora":
            return {k: v.detach().clone() for k, v in self.backbone.named_parameters() if "lora_" in k}
        mine = into.state_dict()
        with torch.no_grad():
            for k, v in self.backbone.state_dict().items():
                mine[k].copy_(v)
        return into

    @contextlib.contextmanager
    def as_snapshot(self, snapshot):
        """The backbone that computes `snapshot`: a full snapshot itself (None for none), or for LoRA weights this
        backbone with them in place of the adapter's own, which come back after."""
        if snapshot is None or isinstance(snapshot, nn.Module):
            yield snapshot
            return
        params = dict(self.backbone.named_parameters())
        current = {k: params[k].detach().clone() for k in snapshot}
        for k, v in snapshot.items():
            params[k].data.copy_(v)
        try:
            yield self.backbone
        finally:
            for k, v in current.items():
                params[k].data.copy_(v)

    def snapshot_state(self, snapshot, prefix: str) -> dict[str, torch.Tensor]:
        """A snapshot's tensors for a checkpoint, as `<prefix>.*` (full) or `<prefix>_lora.*` (LoRA)."""
        if isinstance(snapshot, nn.Module):
            return {f"{prefix}.{k}": v for k, v in snapshot.state_dict().items()}
        return {f"{prefix}_lora.{k}": v for k, v in (snapshot or {}).items()}

    def snapshot_from(self, state: dict[str, torch.Tensor], prefix: str, into: nn.Module | None = None):
        """The snapshot snapshot_state wrote under `prefix` (a full one loaded into `into`), or None if none."""
        full = checkpoint.section(state, f"{prefix}.")
        if full:
            into.load_state_dict(full)
            return into
        return checkpoint.section(state, f"{prefix}_lora.") or None

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep: LoRA weights, or the full backbone and its EMA if it has one."""
        if self.kind == "lora":
            return {f"lora.{k}": v for k, v in adapter_state_dict(self.backbone, STUDENT_ADAPTER).items()}
        state = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        if self.ema is not None:
            state |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        return state

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        if self.kind == "lora":
            lora = checkpoint.section(state, "lora.")
            load_adapter_state_dict(self.backbone, STUDENT_ADAPTER, lora)
            return
        self.backbone.load_state_dict(checkpoint.section(state, "backbone."))
        if self.ema is not None:  # a student saved without an EMA (another method's run) starts its EMA at itself
            self.ema.load_state_dict(checkpoint.section(state, "ema.") or self.backbone.state_dict())


def adapter_state_dict(backbone: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights in peft/diffusers naming (without the adapter name)."""
    return get_peft_model_state_dict(backbone, adapter_name=name)


def load_adapter_state_dict(backbone: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(backbone, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise DistillError(f"checkpoint LoRA does not fit adapter {name!r}: {result.unexpected_keys[:3]}")


def adapter_parameters(backbone: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in backbone.named_parameters() if "lora_" in n and f".{name}." in n]


def check_adapter_name(field: str, name: str) -> None:
    """A second adapter's name: an identifier that is not the student's own adapter's."""
    if name == STUDENT_ADAPTER or not name.isidentifier():
        raise ConfigError(field, name, f"must be a name (letters, digits, _) other than {STUDENT_ADAPTER!r}, the "
                          "student's own adapter")


class Companion(nn.Module):
    """A second trainable network beside a student that starts as the bare teacher. Beside a LoRA student it is a
    second adapter `name` on the same layers of the same backbone (one copy of the base weights), on only inside
    active(). Beside a compressed student it is an adapter on the frozen teacher's own backbone (on the `targets`
    layers): it has the teacher's size, not the student's, and costs no copy (the cross-size recipe of LightX2V's
    Wan distillation). Otherwise (a full student, or separate=True) a trainable full copy of the teacher's backbone.
    The adapter's rank defaults to the student's (a compressed student has none: DEFAULT_RANK) and its alpha to its
    own rank (scale 1)."""

    DEFAULT_RANK = 16  # student.lora_rank's default

    def __init__(self, student: Student, teacher_backbone: nn.Module, name: str, rank: int = 0,
                 separate: bool = False, alpha: float | None = None, targets: list[str] | None = None):
        super().__init__()
        self.name, self.copy = name, None
        on_teacher = student.plan is not None and not separate
        if (student.kind != "lora" and not on_teacher) or separate:
            # the bare teacher: a LoRA student's adapters on the backbone are dropped from the copy
            self.copy = fuse_lora(copy.deepcopy(teacher_backbone), merge=False).float().requires_grad_(True)
            return
        backbone = teacher_backbone if on_teacher else student.backbone
        self.shared = [backbone]  # in a list: the student or the teacher owns the backbone, not this module
        if on_teacher:
            lora = LoraConfig(r=rank or self.DEFAULT_RANK, init_lora_weights="gaussian", target_modules=targets)
            backbone.peft_config = getattr(backbone, "peft_config", {})
        else:
            lora = copy.copy(backbone.peft_config[STUDENT_ADAPTER])
            lora.r = rank or lora.r
        lora.lora_alpha = alpha or lora.r
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora, backbone, adapter_name=name)
        backbone.peft_config[name] = lora
        for layer in adapter_layers(backbone):  # peft activates the new adapter: keep the student's (or, on the
            # teacher, none) active outside active()
            layer._disable_adapters, layer._active_adapter = on_teacher, name if on_teacher else STUDENT_ADAPTER
        for p in self.trainable_parameters():
            p.data = p.data.float()
            p.requires_grad_(True)

    @property
    def network(self) -> nn.Module:
        """The module that computes it: the copy, or the backbone carrying the adapter."""
        return self.copy if self.copy is not None else self.shared[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.copy is not None:
            return list(self.copy.parameters())
        return adapter_parameters(self.shared[0], self.name)

    @contextlib.contextmanager
    def active(self):
        """The backbone that computes this network."""
        if self.copy is not None:
            yield self.copy
            return
        with adapters_as(self.shared[0], self.name):
            yield self.shared[0]

    def state_to_save(self) -> dict[str, torch.Tensor]:
        if self.copy is not None:
            return self.copy.state_dict()
        return adapter_state_dict(self.shared[0], self.name)

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        if self.copy is not None:
            self.copy.load_state_dict(state)
            return
        if any("lora_" not in k for k in state):  # a full copy's weights must not land in the shared backbone
            raise DistillError(f"the checkpoint holds a full network as {self.name}, and this run makes it an "
                               "adapter; load it with the settings it was trained with (DMD2: fake_score: copy)")
        load_adapter_state_dict(self.shared[0], self.name, state)


def lora_layers(student: Student, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft/diffusers naming, without the backbone prefix."""
    return {k: v.to(dtype or v.dtype).contiguous() for k, v in adapter_state_dict(student.backbone, STUDENT_ADAPTER).items()}


def save_lora(student: Student, teacher: Teacher, folder: Path, dtype: torch.dtype | None = None) -> None:
    """`pytorch_lora_weights.safetensors`, which pipeline.load_lora_weights(folder) reads."""
    name = teacher.backbone_name
    teacher.pipeline_class.save_lora_weights(
        folder, **{f"{name}_lora_layers": lora_layers(student, dtype),
                   f"{name}_lora_adapter_metadata": student.backbone.peft_config[STUDENT_ADAPTER].to_dict()},
        safe_serialization=True)


def fuse_lora(backbone: torch.nn.Module, merge: bool = True) -> torch.nn.Module:
    """Fold every active LoRA adapter into its base layer (merge=False: drop the adapters) and put the base layer
    back in its place (in place)."""
    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())
    backbone.__dict__.pop("peft_config", None)
    return backbone


def save_pipeline(teacher: Teacher, backbone: nn.Module, folder: Path, **swap) -> None:
    """The teacher's whole pipeline with `backbone` in place of its own (and any other components in `swap`,
    e.g. scheduler=...), saved as a diffusers folder; the teacher's pipeline is left as it was."""
    pipe = teacher.pipe
    swap = {teacher.backbone_name: backbone, **swap}
    originals = {k: getattr(pipe, k) for k in swap}

    def put(components: dict) -> None:
        for k, v in components.items():
            setattr(pipe, k, v)
            pipe.register_to_config(**{k: (type(v).__module__.split(".")[0], type(v).__name__)})

    # The pipeline's default height and width come from the backbone's sample_size: make it the trained one.
    size = teacher.size_config()
    before = {k: backbone.config.get(k) for k in size}
    backbone.register_to_config(**size)
    put(swap)
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        put(originals)
        backbone.register_to_config(**before)


def save(student: Student, teacher: Teacher, folder: Path, sampling: tuple | None = None,
         backbone: nn.Module | None = None) -> Path:
    """Write the trained student where diffusers reads it: `pytorch_lora_weights.safetensors` for a LoRA
    (pipeline.load_lora_weights(folder)), or for a full student the whole pipeline with the student's
    backbone in place of the teacher's (DiffusionPipeline.from_pretrained(folder), or teacher.source).
    `sampling` = (scheduler, facts) from distill.sampling.diffusers_sampling: a full student's pipeline gets
    that scheduler, so it samples as distill does, and the facts (the pipeline call) go to
    distill_sampling.json. `backbone`: a whole copy of a sharded full student's backbone, saved in its place."""
    folder = Path(folder)
    with paths.atomic_folder(folder) as tmp:
        if not teacher.is_pipeline:
            save_file({k: v.contiguous() for k, v in student.state_to_save().items()}, str(tmp / "student.safetensors"))
        elif student.kind == "lora":
            save_lora(student, teacher, tmp)
        else:
            save_pipeline(teacher, backbone or student.backbone, tmp,
                          **({"scheduler": sampling[0]} if sampling else {}))
        if sampling:
            (tmp / "distill_sampling.json").write_text(json.dumps(sampling[1], indent=2) + "\n")
    return folder


def checkpoint_with_adapter_state(module: nn.Module, *args, **kwargs):
    """diffusers' gradient-checkpointing call (non-reentrant), but the block is recomputed with its LoRA adapters
    switched and chosen as they were in the original forward. A LoRA student's teacher is the same backbone with
    adapters off (teachers.base.adapters_disabled), and DMD2's fake score a second adapter on it; LADD and DMD2
    back-propagate through those passes after the switch is back, so a plain recompute would run the student in
    their place: wrong gradients, or a CheckpointError where shapes differ."""
    layers = adapter_layers(module)
    state = adapter_state(layers)

    def run(*inputs, **kw):
        now = adapter_state(layers)
        set_adapter_state(layers, state)
        try:
            return module(*inputs, **kw)
        finally:
            set_adapter_state(layers, now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def build(teacher: Teacher, cfg: StudentConfig, ema: bool = False) -> Student:
    """cfg's student on `teacher`; a full one with an EMA (decay cfg.ema_decay) if `ema`."""
    if cfg.kind == "lora":
        targets = cfg.lora_targets or list(teacher.lora_targets)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                          target_modules=targets)
        backbone = teacher.backbone
        try:
            inject_adapter_in_model(lora, backbone, adapter_name=STUDENT_ADAPTER)
        except ValueError as e:
            raise DistillError(f"student.lora_targets {targets} match no module of the {teacher.family} "
                               f"backbone: {str(e).splitlines()[0]}") from e
        backbone.peft_config = {STUDENT_ADAPTER: lora}
        for name, p in backbone.named_parameters():
            if "lora_" in name:  # adapters train in float32 even over a half-precision teacher
                p.data = p.data.float()
                p.requires_grad_(True)
        student = Student(backbone, "lora")
    else:  # full, or compressed: a full student with fewer blocks, copied from the teacher's
        plan = compressed.resolve(cfg.compression, teacher.backbone) if cfg.kind == "compressed" else None
        if plan is not None:
            backbone = compressed.compress(teacher.backbone, plan)
        else:  # add_guidance_input makes its own copy
            backbone = teacher.backbone if cfg.guidance_embedding else copy.deepcopy(teacher.backbone)
        if cfg.guidance_embedding:
            backbone = teacher.add_guidance_input(backbone)
        backbone = backbone.float().requires_grad_(True)
        student = Student(backbone, "full", cfg.ema_decay if ema else None, guidance_input=cfg.guidance_embedding,
                          plan=plan, feature_weight=cfg.feature_weight if plan is not None else 0.0)
    if cfg.gradient_checkpointing and hasattr(student.backbone, "enable_gradient_checkpointing"):
        student.backbone.enable_gradient_checkpointing(checkpoint_with_adapter_state)
    return student
