"""Resumable checkpoints in safetensors and JSON only: nothing in a checkpoint is ever unpickled.

Layout of `<output_dir>/checkpoints/step-00000100/`:
  weights.safetensors        what the method must keep (LoRA or full student + EMA, heads)
  optim-<turn>.safetensors   optimiser tensors; optim-<turn>.json its hyper-parameters and scalars
  trainer.json               step, LR-scheduler states, config hash
  config.yaml                the resolved run config
  manifest.json              size and sha256 of every file above, written last
A checkpoint is written to a temporary folder and renamed into place; `latest` is then replaced
atomically, so it never names a partial checkpoint. The data order and all noise are functions
of (seed, step), so the step counter is all the RNG state a resume needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill import paths
from distill.errors import DistillError


def section(state: dict, prefix: str) -> dict:
    """The entries of `state` whose names start with `prefix`, with it taken off (one module's part of a state)."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, scalars in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's files to disk before it is renamed into place."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


NEEDED = ("weights.safetensors", "trainer.json", "config.yaml")  # what every checkpoint's manifest names


def verify(path: Path) -> str | None:
    """None if the checkpoint matches its manifest and its files read back, else what is wrong with it."""
    manifest_file = Path(path) / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return "no readable manifest.json"
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                                 and isinstance(v.get("sha256"), str) for v in manifest.values()):
        return "manifest.json is not a map of file names to sizes and sha256"
    missing = [n for n in NEEDED if n not in manifest]
    if missing:
        return f"manifest.json does not name {missing[0]}"
    for name, want in manifest.items():
        f = Path(path) / name
        if Path(name).name != name or not f.is_file() or f.is_symlink():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256"
    for name in manifest:  # a header that lies about its tensors passes the sha256 its writer took of it
        if name.endswith(".safetensors") and (problem := _unreadable(Path(path) / name)):
            return f"{name} cannot be read ({problem})"
    return None


def _unreadable(path: Path) -> str | None:
    """Why a safetensors file cannot be opened (its header is checked against the file: shapes, types, offsets), or
    None. Cheap: no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own types for truncated or inconsistent files
        return " ".join(str(e).split())[:120]
    return None


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def nonfinite_error(what: str, name: str) -> DistillError:
    return DistillError(f"{what}: {name} holds NaN or inf values; nothing was written")


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Weights with NaN or inf must never be saved or exported: they load fine and sample garbage."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise nonfinite_error(what, name)


def run_marker(folder: Path) -> str | None:
    """The entry that shows `folder` already holds a run (checkpoints, a saved student, metrics), or None."""
    for name in ("checkpoints", "student", "metrics.jsonl", "config.yaml"):
        if (Path(folder) / name).exists():
            return name
    return None


def clean_partial(root: Path) -> None:
    """Remove checkpoint folders a killed run left half-written."""
    for tmp in [*(Path(root) / "checkpoints").glob(".*.tmp"), *(Path(root) / "checkpoints").glob(".*.old")]:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save(root: Path, step: int, weights: dict, optim_states: dict, schedulers: dict, config, keep: int = 0,
         milestone: bool = False, timed: tuple[float, int] = (0.0, 0)) -> Path:
    """Write a checkpoint; `keep` > 0 then prunes all but the newest `keep`, sparing milestones (e.g. each
    progressive round's student). `timed`: the training seconds to this step over all resumes, and the step they
    count from."""
    root = Path(root) / "checkpoints"
    final = root / step_name(step)
    with paths.atomic_folder(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        for turn, opt_state in optim_states.items():
            tensors, meta = _flatten_optimizer(opt_state)
            save_file(tensors, str(tmp / f"optim-{turn}.safetensors"))
            (tmp / f"optim-{turn}.json").write_text(json.dumps(meta))
        trainer = {"step": step, "seconds": timed[0], "timed_from": timed[1],
                   "schedulers": {t: s.state_dict() for t, s in schedulers.items()},
                   "config_hash": config.hash(), "method": config.method.name, "teacher": config.teacher.source,
                   "student": config.student.kind}
        (tmp / "trainer.json").write_text(json.dumps(trainer))
        config.dump(tmp / "config.yaml")
        if milestone:
            (tmp / "MILESTONE").write_text(f"step {step}\n")
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
    paths.write_atomic(root / "latest", final.name)
    if keep > 0:  # only folders distill names (step-NNNNNNNN), oldest first by their step
        for old in ours(root)[:-keep]:
            if not (old / "MILESTONE").exists():
                shutil.rmtree(old, ignore_errors=True)
    return final


STEP = re.compile(r"step-(\d{8,})")


def ours(ckpts: Path) -> list[Path]:
    """The checkpoint folders distill wrote in `ckpts` (named step-NNNNNNNN, real folders, not links), by step."""
    found = [p for p in Path(ckpts).glob("step-*") if STEP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(STEP.fullmatch(p.name).group(1)))


def _pointed(ckpts: Path) -> Path | None:
    """The checkpoint `latest` names, refusing a name that leads anywhere but a checkpoint of this run."""
    pointer = ckpts / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not STEP.fullmatch(name) or (ckpts / name).is_symlink():
        raise DistillError(f"{pointer} names {name[:80]!r}, which is not a checkpoint of this run (step-NNNNNNNN in "
                           f"{ckpts}); refused rather than followed: fix or delete the file")
    return ckpts / name


def find(root: Path, which: str) -> Path:
    """`latest`, a checkpoint folder, or a run folder. For `latest` and run folders a checkpoint that fails
    its manifest is reported in one line and the newest good one before it is used instead."""
    path = Path(which)
    if which == "latest" or (path.is_dir() and (path / "checkpoints").is_dir()):
        ckpts = (Path(root) if which == "latest" else path) / "checkpoints"
        named = _pointed(ckpts)
        candidates = ([named] if named else []) + ours(ckpts)[::-1]
        for candidate in dict.fromkeys(candidates):
            problem = verify(candidate) if candidate.is_dir() else "it does not exist"
            if problem is None:
                return candidate
            print(f"warning: skipping checkpoint {candidate}: {problem}", file=sys.stderr)
        raise DistillError(f"nothing to resume: no intact checkpoint in {ckpts}")
    if not (path / "trainer.json").is_file():
        raise DistillError(f"{path} is not a distill checkpoint (no trainer.json)")
    problem = verify(path)
    if problem:
        raise DistillError(f"checkpoint {path} is damaged ({problem}); use an earlier one or --resume latest")
    return path


def trainer_state(path: Path) -> dict:
    """A checkpoint's trainer.json, which must be an object with a whole step."""
    try:
        trainer = json.loads((Path(path) / "trainer.json").read_text())
    except (OSError, ValueError):
        trainer = None
    step = trainer.get("step") if isinstance(trainer, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DistillError(f"checkpoint {path} is damaged (trainer.json holds no step); use an earlier one")
    return trainer


def load(path: Path) -> tuple[dict, dict, dict]:
    """(weights, optimizer states by turn, trainer state)."""
    path = Path(path)
    trainer = trainer_state(path)
    optims = {}
    for meta_file in path.glob("optim-*.json"):
        turn = meta_file.stem.removeprefix("optim-")
        optims[turn] = _unflatten_optimizer(load_file(str(path / f"optim-{turn}.safetensors")),
                                            json.loads(meta_file.read_text()))
    return load_file(str(path / "weights.safetensors")), optims, trainer
