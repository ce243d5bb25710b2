"""Teachers: frozen diffusion models behind one interface (see teachers/base.py).

`load(cfg)` takes a diffusers pipeline folder, a single-file .safetensors checkpoint, a hub id, or a
builtin (`builtin:tiny-sdxl`, `builtin:tiny-sd3`, `builtin:tiny-flux`, `builtin:tiny-flux-dev`, `builtin:gmm-vp`,
`builtin:gmm-flow`, `builtin:gmm-flux`) or a teacher trained by distill and shipped in teachers/zoo (ZOO).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from distill import paths
from distill.config import TeacherConfig
from distill.errors import ConfigError, DistillError, check_choice
from teachers.base import Cond, Teacher

__all__ = ["Cond", "Teacher", "load", "family_of", "check_source"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Teachers trained by distill itself and shipped in the repository (recipes in experiments/).
ZOO = {name: Path(__file__).parent / "zoo" / name
       for name in ("digits-sdxl", "digits-sd3", "digits-flux", "digits-flux-dev", "pairs-sdxl", "pairs-sd3",
                    "shapes-sdxl", "shapes-sd3")}
BUILTIN = tuple(f"builtin:{name}" for name in (*ZOO, "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux-dev",
                                                "gmm-vp", "gmm-flow", "gmm-flux"))
FAMILIES = ("sdxl", "sd3", "flux", "gmm")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Random pipelines `distill make-teacher` builds offline: tiny ones (tiny.py) and real architectures (real_size.py).
# real_size.py's architectures, which `distill plan` also builds on meta
ARCHITECTURES = ("sdxl-base-arch", "sd3-medium-arch", "sd35-medium-arch", "sd35-large-arch", "flux-dev-arch")
MAKEABLE = ("tiny-sdxl", "tiny-sd3", "tiny-sd35-medium", "tiny-sd35-large", "tiny-flux", "tiny-flux-dev",
            *ARCHITECTURES)


def make(name: str, out: Path) -> str:
    """Build the random pipeline `name` (one of MAKEABLE) into the folder `out`; returns what was written."""
    from teachers import real_size, tiny

    if name in real_size.ARCHITECTURES:
        real_size.build(name, out)
        return f"{name} (real architecture, random bfloat16 weights)"
    tiny.build(name, out)
    return f"tiny {name} pipeline"


def check_source(t: TeacherConfig) -> None:
    """A teacher.source (and teacher.family) that load can take, or a one-line ConfigError; reads no weights."""
    check_choice("teacher.family", t.family, (None, *FAMILIES))
    src = t.source
    if src.startswith("builtin:"):
        if src not in BUILTIN:
            raise ConfigError("teacher.source", src, "allowed builtins: " + ", ".join(BUILTIN))
        return
    path = Path(src).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".safetensors":
            raise ConfigError("teacher.source", src, "a single-file teacher must be .safetensors "
                              "(pickled .ckpt/.bin files are refused)")
        if path.is_file() and t.family is None:
            raise ConfigError("teacher.family", None, "a single-file teacher needs teacher.family (sdxl, sd3 or flux)")
        if path.is_file() and t.family == "flux" and t.config is None:
            raise ConfigError("teacher.config", None, "a FLUX single file holds the transformer alone: give the FLUX "
                              "pipeline folder (or hub id) whose VAE, text encoders and configs go with it")
        if path.is_dir() and t.config is not None:
            raise ConfigError("teacher.config", t.config, "only a single-file teacher.source reads it")
        if t.config is not None and not Path(t.config).expanduser().is_dir() and not HUB_ID.match(t.config):
            raise ConfigError("teacher.config", t.config, "no such folder (give a diffusers pipeline folder or a "
                              "hub id like org/name)")
        return
    if not HUB_ID.match(src) or src.startswith((".", "/", "~")):
        raise ConfigError("teacher.source", src, "no such file or folder (give a pipeline folder, a "
                          ".safetensors file, a hub id like org/name, or a builtin)")


def _classes():
    from teachers.flux import FluxTeacher
    from teachers.sd3 import SD3Teacher
    from teachers.sdxl import SDXLTeacher

    return {"sdxl": SDXLTeacher, "sd3": SD3Teacher, "flux": FluxTeacher}


def family_of(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise DistillError(f"teacher folder {folder} is not a diffusers pipeline (no model_index.json); "
                           "save one with pipeline.save_pretrained(folder)")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    raise DistillError(f"teacher {folder} is a {name or 'unknown'} pipeline; supported: StableDiffusionXL*, "
                       "StableDiffusion3*, Flux*")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickles(folder: Path) -> None:
    """A pipeline component whose weights exist only as pickles is refused: unpickling runs code."""
    for part in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        pickles = [f for f in part.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix == ".safetensors" for f in part.iterdir()):
            raise DistillError(f"{pickles[0]} is a pickle, which distill never loads (it can run code); convert it "
                               "to safetensors (load it once where you trust it, then save_pretrained)")


def _builtin(cfg: TeacherConfig) -> Path | Teacher:
    name = cfg.source.removeprefix("builtin:")
    if name.startswith("gmm-"):
        from teachers.gmm import GMMTeacher

        return GMMTeacher(schedule=name.removeprefix("gmm-"), resolution=cfg.resolution, width=cfg.width)
    if name in ZOO:
        if not (ZOO[name] / "model_index.json").is_file():
            raise DistillError(f"builtin:{name} is not in this copy of distill ({ZOO[name]} is missing); train it "
                               f"with its recipe in experiments/ (see experiments/results/)")
        return ZOO[name]
    from teachers import tiny

    folder = paths.cache_dir() / "teachers" / name
    if not (folder / "model_index.json").is_file():
        paths.check_writable(paths.cache_dir(), "DISTILL_CACHE (where built-in teachers are built)")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tiny.build(name, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_components(folder: Path) -> None:
    """Name the broken part of a pipeline folder (a missing component, an unknown class, an unreadable weights
    file) before diffusers' loader reports it as a problem with the whole pipeline."""
    import importlib

    from safetensors import safe_open

    for name, spec in json.loads((folder / "model_index.json").read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, cls = spec
        if library not in ("diffusers", "transformers") or not hasattr(importlib.import_module(library), str(cls)):
            raise DistillError(f"teacher {folder}: component '{name}' names the class {library}.{cls}, which is "
                               "not known; fix model_index.json")
        if not (folder / name).is_dir():
            raise DistillError(f"teacher {folder} is missing its {name}/ component, which model_index.json lists")
        for weights in (folder / name).glob("*.safetensors"):
            try:
                with safe_open(str(weights), "pt") as f:
                    f.keys()
            except Exception as e:  # safetensors raises its own error type for empty or truncated files
                raise DistillError(f"teacher component {name}/{weights.name} in {folder} is not a readable "
                                   f"safetensors file ({weights.stat().st_size} bytes)") from e


def check_single_file(path: Path, family: str) -> None:
    """A single-file teacher must hold the backbone; a VAE or LoRA file would otherwise send diffusers to the
    hub for what is missing."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type for empty or truncated files
        raise DistillError(f"teacher {path} is not a readable safetensors file") from e
    marker = _classes()[family].single_file_marker
    if not any(marker in k for k in keys):
        raise DistillError(f"teacher {path} holds no diffusion model weights ({marker}*): it is not a "
                           f"full {family} checkpoint (a VAE, text encoder or LoRA file?)")


def _config_folder(config: str | None, family: str) -> str | None:
    """A local teacher.config is a pipeline folder of the family, with no pickles: the pipeline reads its parts."""
    if config is None or not Path(config).expanduser().is_dir():
        return config
    folder = Path(config).expanduser()
    if family_of(folder) != family:
        raise DistillError(f"teacher.config {config} is a {family_of(folder)} pipeline, not {family}")
    refuse_pickles(folder)
    check_components(folder)
    return str(folder)


def _pipeline(source: str, family: str | None, dtype: torch.dtype, config: str | None = None):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    from huggingface_hub.errors import HFValidationError

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    path = Path(source).expanduser()
    try:
        if path.is_file():
            check_single_file(path, family)
            return _classes()[family].from_single_file(str(path), _config_folder(config, family), dtype)
        if path.is_dir():
            family_of(path)
            refuse_pickles(path)
            check_components(path)
        return DiffusionPipeline.from_pretrained(str(path) if path.exists() else source, dtype=dtype,
                                                 use_safetensors=True)
    except (OSError, HFValidationError, ValueError, RuntimeError) as e:
        if path.exists():
            raise DistillError(f"could not load teacher {source}: {str(e).splitlines()[0]}") from e
        raise DistillError(f"could not fetch teacher '{source}' from the hub (offline or not found); download it "
                           "where the hub is reachable and set teacher.source to the local folder") from e


def load(cfg: TeacherConfig, device: str | torch.device = "cpu") -> Teacher:
    src = _builtin(cfg) if cfg.source.startswith("builtin:") else cfg.source
    if isinstance(src, Teacher):
        return src.to(device)
    if cfg.family == "gmm":
        raise DistillError("teacher.family=gmm is only the builtin:gmm-vp / gmm-flow / gmm-flux teachers")
    pipe = _pipeline(str(src), cfg.family, DTYPES[cfg.dtype], cfg.config)
    matches = [f for f, c in _classes().items() if isinstance(pipe, c.pipeline_class)]
    if not matches or (cfg.family and cfg.family != matches[0]):
        raise DistillError(f"teacher {src} loaded as {type(pipe).__name__}, which is not a "
                           f"{cfg.family or 'supported'} pipeline (supported: sdxl, sd3, flux)")
    return wrap(pipe, cfg).to(device)


def wrap(pipe, cfg: TeacherConfig) -> Teacher:
    """The Teacher of a loaded pipeline of a supported family, with cfg's resolution and overrides."""
    pipe.set_progress_bar_config(disable=True)
    cls = next(c for c in _classes().values() if isinstance(pipe, c.pipeline_class))
    if cls.family == "sdxl":
        teacher = cls(pipe, cfg.resolution, cfg.prediction_type)
    else:
        teacher = cls(pipe, cfg.resolution, cfg.max_text_length)
    teacher.width = cfg.width
    teacher.check_sizes([teacher.size], "teacher.width" if teacher.size[1] % teacher.size_multiple else
                        "teacher.resolution")
    return teacher


def load_meta(cfg: TeacherConfig, architecture: str | None = None) -> Teacher:
    """cfg's teacher with every weight on the meta device (shapes and dtypes, no data): the shipped architecture
    `architecture` (one of ARCHITECTURES), or else the configs of cfg.source's local pipeline folder."""
    from teachers import real_size

    if architecture is None and cfg.source.startswith("builtin:") and not cfg.source.startswith("builtin:gmm-"):
        folder = _builtin(cfg)
    else:
        folder = Path(cfg.source).expanduser()
    dtype = DTYPES[cfg.dtype]
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise DistillError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        with torch.device("meta"):
            pipe = real_size.pipeline(architecture, dtype)
    elif (folder / "model_index.json").is_file():
        family_of(folder)
        pipe = real_size.meta_pipeline(folder, dtype)
    else:
        raise DistillError(f"the architecture of teacher {cfg.source} is not known here: give a local pipeline folder "
                           f"as teacher.source, or pass --architecture ({', '.join(ARCHITECTURES)})")
    return wrap(pipe, cfg).to("meta")
