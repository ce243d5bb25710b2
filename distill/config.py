"""Typed run configuration: YAML plus dotted `key=value` overrides, checked before any model loads.

Every field has a type and a default; `load()` turns a YAML file and overrides into a `Config`,
and any problem is a `ConfigError` that names the field, the bad value and what is allowed. This module checks the
values themselves; the teacher source is checked by `teachers.check_source` and the method by
`distill.methods.check_config`, and `distill.runs.load_config` runs all three (a leaf: it imports no other part).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill import paths
from distill.errors import ConfigError, check_choice

# Every supported family is trained on 1,000 discrete times, so no sampler has more distinct steps to take.
MAX_STEPS = 1000
FLOAT32_MAX = 3.4028234663852886e38  # the largest rate the optimisers' float32 arithmetic accepts
MAX_PIXELS = 4096  # twice SDXL's and SD3's largest trained size; more only exhausts memory
MAX_YAML_BYTES = 1 << 20  # a run config or matrix is a few KB; more is a mistake or an attack
MAX_YAML_VALUES = 100_000  # aliases that expand into each other reach billions of values from a few hundred bytes
MAX_VALIDATE_PROMPTS = 64  # a validation grid shows at most 64 images
MAX_VALIDATE_SAMPLES = 10_000  # a validation is a quick look; `distill eval` measures in earnest
VALIDATE_FIELDS = ("validate_every", "validate_prompts", "validate_steps", "validate_samples")
WRITTEN_BY = "# written by distill: the resolved config of this run (edits here are not read back)\n"


@dataclass
class TeacherConfig:
    # A diffusers pipeline folder, a single .safetensors checkpoint, a hub id, or one of teachers.BUILTIN.
    source: str = "builtin:tiny-sdxl"
    family: str | None = None  # inferred from the pipeline folder; required for single files
    prediction_type: str | None = None  # override the scheduler's (epsilon | v_prediction)
    dtype: str = "float32"  # weights of the frozen parts: float32 | float16 | bfloat16
    resolution: int = 64  # pixels (the height); SDXL is 1024, SD3 is 1024
    width: int | None = None  # pixels across, for non-square images; default: resolution
    max_text_length: int = 77  # T5 tokens for SD3 (diffusers' default is 256)
    # With a single-file source: the pipeline folder (or hub id) whose configs and other components go with it.
    # Needed for FLUX, whose files (flux1-dev.safetensors) hold the transformer alone; offline, needed for any.
    config: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels, as the loaded teacher's `size`."""
        return self.resolution, self.width or self.resolution

    @property
    def pixels(self) -> int | str:
        """The image size as rows and reports give it: pixels when square (as rows always had it), else 'HxW'."""
        return pixels(*self.size)


def pixels(height: int, width: int) -> int | str:
    """An image size as rows and reports give it: the side when square, else 'HxW'."""
    return height if height == width else f"{height}x{width}"


@dataclass
class StudentConfig:
    kind: str = "lora"  # lora | full | compressed (a full student with blocks removed: students/compressed.py)
    lora_rank: int = 16
    lora_alpha: float | None = None  # defaults to the rank (scale 1)
    lora_targets: list[str] | None = None  # module names; the teacher family gives a default
    ema_decay: float = 0.95  # a full student's EMA: consistency's target network; no other method makes one
    guidance_embedding: bool = False  # full students only: condition on the CFG scale w
    gradient_checkpointing: bool = False
    init_from: str | None = None  # start from the student of another run or checkpoint (same teacher and kind)
    compression: str | dict | None = None  # kind=compressed: a preset (half, koala-1b, ...) or a removal plan
    feature_weight: float = 1.0  # kind=compressed: weight of feature + output distillation added to the step loss


@dataclass
class MethodConfig:
    name: str = "consistency"
    params: dict[str, Any] = field(default_factory=dict)  # checked against the method's own config


@dataclass
class DataConfig:
    # prompts | images | shards | latents | digits | digit_pairs | digit_stacks | digit_shapes | teacher
    kind: str = "digits"
    path: str | None = None  # file or folder for prompts, images, shards and latents
    batch_size: int = 4  # per process
    num_workers: int = 0
    size: int = 4096  # samples drawn for kind=teacher
    # Aspect-ratio buckets (images, shards, and caches of them): [[height, width], ...], or auto (sizes of about
    # bucket_pixels pixels from 1:4 to 4:1 on the teacher's size grid). Each image goes to the bucket nearest its
    # aspect ratio, resized to cover it and centre-cropped; every batch is one bucket's. None: the teacher's size.
    buckets: str | list[list[int]] | None = None
    bucket_pixels: int | None = None  # auto's budget; default the teacher's height x width
    upscale: bool = True  # false: an image only goes to buckets it covers, and one smaller than every bucket is refused


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    turn_learning_rates: dict[str, float] = field(default_factory=dict)  # per turn, e.g. {discriminator: 1e-4}
    turn_every: dict[str, int] = field(default_factory=dict)  # run a turn every k steps, e.g. {student: 2}
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    compile: bool = False  # torch.compile the student's and the teacher's backbones (nn.Module.compile, in place)
    fsdp: bool = False  # shard a full student over the processes (FSDP2; distill.sharding)
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 0  # keep the last K checkpoints; 0 keeps all
    log_every: int = 10
    trackers: list[str] = field(default_factory=list)  # wandb | tensorboard
    project: str = "distill"
    # Validation while training (distill.validation): every N steps and at the last, sample a fixed prompt grid and,
    # on the digit worlds, score FID and adherence. 0: never. None: the defaults named in distill.validation.
    validate_every: int = 0
    validate_prompts: list[str] | None = None  # default: the data's (the ten digit prompts, ten pairs, ...)
    validate_steps: list[int] | None = None  # the student's step counts to sample at; default [sample.steps]
    validate_samples: int = 200  # samples FID and adherence read (digits and digit_pairs data)


@dataclass
class SampleConfig:
    steps: int = 4
    guidance_scale: float = 1.0  # CFG applied at sampling; 1 means none
    height: int | None = None  # defaults to teacher.resolution
    width: int | None = None  # defaults to teacher.width, else teacher.resolution


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identifies the recipe: every field except where the run is written and whether it is sharded (a
        sharded run computes what an unsharded one does)."""
        recipe = self.to_dict()
        recipe["train"].pop("output_dir")
        recipe["train"].pop("fsdp")
        for name in VALIDATE_FIELDS:  # validation watches a run without changing it; rows keep their hashes
            recipe["train"].pop(name)
        for name in ("width", "config"):  # added later: recipes without them keep the hashes their rows have
            if recipe["teacher"][name] is None:
                recipe["teacher"].pop(name)
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def dump(self, path: Path) -> None:
        """The first line marks the file as distill's, so a user's own config.yaml is never taken for it."""
        Path(path).write_text(WRITTEN_BY + yaml.safe_dump(self.to_dict(), sort_keys=False))


def written_by_distill(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(WRITTEN_BY)) == WRITTEN_BY.encode()
    except OSError:
        return False


CHOICES = {
    "teacher.prediction_type": (None, "epsilon", "v_prediction"),
    "teacher.dtype": ("float32", "float16", "bfloat16"),
    "student.kind": ("lora", "full", "compressed"),
    "data.kind": ("prompts", "images", "shards", "latents", "digits", "digit_pairs", "digit_stacks", "digit_shapes",
                  "teacher"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
}
POSITIVE = ("teacher.resolution", "teacher.max_text_length", "student.lora_rank", "data.batch_size",
            "data.size", "train.max_steps", "train.gradient_accumulation_steps", "train.checkpoint_every",
            "train.log_every", "train.max_nonfinite_steps", "sample.steps")


# Numeric fields outside these ranges train silently wrong (a negative clip norm flips the gradient), so each
# is refused with what is allowed. A None value (an optional field left unset) is not checked.
RANGES = {
    "train.learning_rate": (lambda v: 0 < v <= FLOAT32_MAX, f"must be a number in (0, {FLOAT32_MAX:.3g}]"),
    "train.adam_beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"),
    "train.max_grad_norm": (lambda v: math.isfinite(v) and v >= 0,
                            "must be a finite number >= 0 (0 disables clipping)"),
    "train.seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2^63)"),
    "train.warmup_steps": (lambda v: 0 <= v, "must be >= 0"),
    "train.keep_checkpoints": (lambda v: 0 <= v, "must be >= 0 (0 keeps all)"),
    "train.validate_every": (lambda v: 0 <= v, "must be >= 0 (0 turns validation off)"),
    "train.validate_samples": (lambda v: 2 <= v <= MAX_VALIDATE_SAMPLES,
                               f"must be in [2, {MAX_VALIDATE_SAMPLES}] (FID needs 2; a few hundred make a quick "
                               "curve)"),
    "data.num_workers": (lambda v: 0 <= v, "must be >= 0"),
    "data.bucket_pixels": (lambda v: 64 <= v <= MAX_PIXELS**2, f"must be in [64, {MAX_PIXELS}^2]"),
    "student.ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "student.feature_weight": (lambda v: 0 <= v <= FLOAT32_MAX, "must be a number >= 0"),
    "student.lora_alpha": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),
    "sample.guidance_scale": (lambda v: math.isfinite(v) and v >= 1, "must be a finite number >= 1 (1 means no CFG)"),
    "sample.steps": (lambda v: 1 <= v <= MAX_STEPS, f"must be in [1, {MAX_STEPS}]"),
    # Bounds far past any real run, so `distill plan` and a start never try to allocate petabytes
    "student.lora_rank": (lambda v: v <= 4096, "must be in [1, 4096] (no backbone layer is wider than that)"),
    "data.batch_size": (lambda v: v <= 65536, "must be in [1, 65536] per process"),
    "train.gradient_accumulation_steps": (lambda v: v <= 65536, "must be in [1, 65536]"),
    "teacher.max_text_length": (lambda v: v <= 4096, "must be in [1, 4096] tokens"),
    "teacher.resolution": (lambda v: 8 <= v <= MAX_PIXELS, f"must be in [8, {MAX_PIXELS}]"),
    "teacher.width": (lambda v: 8 <= v <= MAX_PIXELS and v % 8 == 0, f"must be a multiple of 8 in [8, {MAX_PIXELS}]"),
    "sample.height": (lambda v: 8 <= v <= MAX_PIXELS and v % 8 == 0, f"must be a multiple of 8 in [8, {MAX_PIXELS}]"),
    "sample.width": (lambda v: 8 <= v <= MAX_PIXELS and v % 8 == 0, f"must be a multiple of 8 in [8, {MAX_PIXELS}]"),
}


def parse(raw: dict, overrides: list[str] = (), for_training: bool = True) -> Config:
    """Build a Config from a nested dict and `a.b=value` overrides, then check it (data paths only when it
    is for training: a checkpoint's config must still load where its data is gone)."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(item, item, "overrides look like section.field=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, item, f"'{p}' is not a section")
        node[leaf] = _override_value(key, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    if for_training:
        check_data(cfg)
    return cfg


def _override_value(key: str, value: str):
    """YAML when the whole text is one YAML value, else the text itself: `run #2` is a name, not `run` plus a
    comment."""
    try:
        node = yaml.compose(value)
    except yaml.YAMLError as e:
        raise ConfigError(key, value, f"not a valid YAML value ({_yaml_problem(e)})") from e
    if node is None:
        return None
    if value[node.end_mark.index:].strip():
        return value
    if _expanded_size(node, {}) > MAX_YAML_VALUES:
        raise ConfigError(key, value[:80], f"expands to more than {MAX_YAML_VALUES} values through YAML aliases")
    try:
        return safe_load(value)
    except yaml.YAMLError as e:  # a tag such as !!python/object, or a key given twice
        raise ConfigError(key, value[:80], f"not a plain YAML value ({_yaml_problem(e)})") from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _expanded_size(node, seen: dict) -> int:
    """How many values a YAML node graph holds once its aliases are expanded, counted without expanding them
    (each shared node once, by identity); stops counting past the limit."""
    if node is None or isinstance(node, yaml.ScalarNode):
        return 1
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = MAX_YAML_VALUES + 1  # a node that contains itself expands without end
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
    total = 1
    for child in children:
        total += _expanded_size(child, seen)
        if total > MAX_YAML_VALUES:
            break
    seen[id(node)] = total
    return total


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a mapping naming one key twice (YAML would keep the last and drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen and key != "<<"
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' appears twice in one mapping",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def safe_load(text: str):
    return yaml.load(text, Loader=_UniqueKeys)


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML file holding a non-empty mapping, or a one-line ConfigError naming what is wrong with it."""
    path = Path(path)
    found = paths.kind(path)
    if found == "a folder":
        raise ConfigError(what, str(path), f"is a folder; give the {what} file (.yaml) inside it")
    if found == "missing":
        raise ConfigError(what, str(path), f"no such {what} file")
    if found != "a file":
        raise ConfigError(what, str(path), f"is {found}, not a regular file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(what, str(path), f"is {path.stat().st_size} bytes; a {what} file is at most "
                          f"{MAX_YAML_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
        values = _expanded_size(yaml.compose(text), {})
        if values > MAX_YAML_VALUES:
            raise ConfigError(what, str(path), f"expands to more than {MAX_YAML_VALUES} values through YAML aliases")
        raw = safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(what, str(path), f"is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(what, str(path), f"not valid YAML ({_yaml_problem(e)})") from e
    except OSError as e:
        raise ConfigError(what, str(path), f"cannot be read ({e.strerror})") from e
    if not raw:
        raise ConfigError(what, str(path), f"the {what} file is empty; see experiments/ for examples")
    if not isinstance(raw, dict):
        raise ConfigError(what, str(path), "the file must hold a mapping of sections")
    return raw


def load(path: str | Path, overrides: list[str] = (), for_training: bool = True) -> Config:
    return parse(read_yaml(path), overrides, for_training)


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "config", raw, "expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"allowed: {', '.join(names)}"
            raise ConfigError(where, value, f"unknown field; {hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # the first alternative the value is (student.compression: a preset name or a plan)
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                refused = e
        if len(inner) == 1:
            raise refused
        raise ConfigError(where, value, "expected " + " or ".join(getattr(a, "__name__", str(a)) for a in inner))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, value, "expected a list")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, value, "expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(where, value, f"expected {tp.__name__}")
    return value


def coerce_params(cls, raw: dict, prefix: str):
    """Check a method's own parameters (a dataclass) the same way as the main config."""
    return _build(cls, raw, prefix)


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        check_choice(dotted, _get(cfg, dotted), allowed)
    for dotted in POSITIVE:
        if _get(cfg, dotted) <= 0:
            raise ConfigError(dotted, _get(cfg, dotted), "must be a positive integer")
    for dotted, (ok, allowed) in RANGES.items():
        value = _get(cfg, dotted)
        if value is not None and not ok(value):
            raise ConfigError(dotted, value, allowed)
    for turn, k in cfg.train.turn_every.items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"train.turn_every.{turn}", k, "must be a positive integer")
    for turn, lr in cfg.train.turn_learning_rates.items():
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= FLOAT32_MAX:
            raise ConfigError(f"train.turn_learning_rates.{turn}", lr, f"must be a number in (0, {FLOAT32_MAX:.3g}]")
    for dotted in ("train.output_dir", "teacher.source"):
        if not _get(cfg, dotted).strip():
            raise ConfigError(dotted, _get(cfg, dotted), "must not be empty")
    if cfg.teacher.resolution % 8:
        raise ConfigError("teacher.resolution", cfg.teacher.resolution, "must be a multiple of 8")
    if cfg.student.guidance_embedding and cfg.student.kind == "lora":
        raise ConfigError("student.guidance_embedding", True, "needs student.kind=full (a LoRA shares the "
                          "teacher's backbone, which has no w input)")
    if cfg.train.fsdp and cfg.student.kind == "lora":
        raise ConfigError("train.fsdp", True, "shards a full student; a LoRA student is small, so train it with "
                          "plain data parallel (leave train.fsdp false)")
    for tracker in cfg.train.trackers:
        check_choice("train.trackers", tracker, ("wandb", "tensorboard"))
    if cfg.train.validate_every:
        _check_validation(cfg)
    if cfg.data.buckets is not None:
        check_buckets(cfg.data)


def _check_validation(cfg: Config) -> None:
    """The validation fields of a run that validates (their defaults are distill.validation's)."""
    tc = cfg.train
    if tc.validate_steps is not None:
        if not tc.validate_steps:
            raise ConfigError("train.validate_steps", [], "must name at least one step count (or leave it unset: "
                              "[sample.steps])")
        for steps in tc.validate_steps:
            if not 1 <= steps <= MAX_STEPS:
                raise ConfigError("train.validate_steps", steps, f"each must be in [1, {MAX_STEPS}]")
    if tc.validate_prompts is not None:
        if not 1 <= len(tc.validate_prompts) <= MAX_VALIDATE_PROMPTS:
            raise ConfigError("train.validate_prompts", f"{len(tc.validate_prompts)} prompts",
                              f"give 1 to {MAX_VALIDATE_PROMPTS} prompts (or leave it unset: the data's)")
        if not all(p.strip() for p in tc.validate_prompts):
            raise ConfigError("train.validate_prompts", tc.validate_prompts, "every prompt must be non-empty")
    if tc.fsdp:
        raise ConfigError("train.validate_every", tc.validate_every, "validation samples on the main process alone, "
                          "and a student sharded by train.fsdp needs every process: leave it 0 with train.fsdp, and "
                          "evaluate checkpoints with distill eval")
    if cfg.teacher.source.startswith("builtin:gmm"):
        raise ConfigError("train.validate_every", tc.validate_every, f"the {cfg.teacher.source} teacher samples 2-D "
                          "points, not images: there is no grid to draw nor FID to score; leave it 0")


def check_data(cfg: Config) -> None:
    """The data a training run reads exists (a checkpoint's config must load where its data is gone)."""
    d = cfg.data
    if d.kind in ("prompts", "images", "shards", "latents"):
        if d.path is None:
            raise ConfigError("data.path", None, f"data.kind={d.kind} needs a path")
        if not Path(d.path).expanduser().exists():
            raise ConfigError("data.path", d.path, "no such file or folder")
    if d.kind == "teacher" and not cfg.teacher.source.startswith("builtin:gmm"):
        raise ConfigError("data.kind", d.kind, "samples from the teacher's exact distribution need a "
                          "builtin:gmm-* teacher")


def check_buckets(d: DataConfig) -> None:
    if d.kind not in ("images", "shards", "latents", "digit_shapes"):
        raise ConfigError("data.buckets", d.buckets, f"sorts images by shape: it needs data.kind images, shards, "
                          f"latents (a cache of bucketed images) or digit_shapes (it is {d.kind}); leave it unset")
    if isinstance(d.buckets, str):
        if d.buckets != "auto":
            raise ConfigError("data.buckets", d.buckets, "a list of [height, width] pairs, or auto")
        return
    if not d.buckets:
        raise ConfigError("data.buckets", d.buckets, "name at least one [height, width] pair (or auto; or leave it "
                          "unset for the teacher's one size)")
    for b in d.buckets:
        if len(b) != 2 or not all(8 <= v <= MAX_PIXELS for v in b):
            raise ConfigError("data.buckets", b, f"each bucket is [height, width], both in [8, {MAX_PIXELS}]")
    if len({tuple(b) for b in d.buckets}) != len(d.buckets):
        raise ConfigError("data.buckets", d.buckets, "each bucket once")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
