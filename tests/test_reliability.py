"""Reliability: kills at any moment, checkpoints never half-read, NaNs, bad data, unsafe files."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import teachers
from distill import checkpoint, cli, data, runs
from distill.config import TeacherConfig
from distill.trainer import train

ROOT = Path(__file__).resolve().parents[1]
GMM = {"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
       "method": {"params": {"guidance_min": 1.0, "guidance_max": 1.0}},
       "data": {"kind": "teacher", "batch_size": 8, "size": 64}}


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def _image_folder(root: Path, n=4, bad=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{i}.png"
        if i in bad:
            (root / name).write_text("this is not an image")
        else:
            Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(root / name)
        rows.append(json.dumps({"file_name": name, "text": f"a handwritten digit {i % 10}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------------
def _bad_inputs(tmp: Path, tiny_sdxl_dir: Path) -> list[tuple[dict, str]]:
    trunc = tmp / "trunc-teacher"
    os.system(f"cp -r '{tiny_sdxl_dir}' '{trunc}'")
    weights = trunc / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    pickled = tmp / "pickle-teacher"
    os.system(f"cp -r '{tiny_sdxl_dir}' '{pickled}'")
    sd = load_file(pickled / "unet/diffusion_pytorch_model.safetensors")
    torch.save(sd, pickled / "unet/diffusion_pytorch_model.bin")
    (pickled / "unet/diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, tmp / "model.ckpt")
    (tmp / "empty-images").mkdir()
    (tmp / "empty-images/metadata.jsonl").write_text("\n")
    (tmp / "broken-meta").mkdir()
    (tmp / "broken-meta/metadata.jsonl").write_text('{"file_name": "a.png"\n')
    (tmp / "shards").mkdir()
    (tmp / "shards/bad.tar").write_bytes(b"\x00garbage" * 300)
    save_file({"latents": torch.zeros(4, 2)}, tmp / "cache.safetensors")
    (tmp / "cache-trunc.safetensors").write_bytes((tmp / "cache.safetensors").read_bytes()[:40])
    (tmp / "empty.txt").write_text("")
    sdxl = {"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}}
    return [
        ({"teacher": {"source": str(tmp)}}, "is not a diffusers pipeline (no model_index.json)"),
        ({"teacher": {"source": str(trunc), "resolution": 32}}, "unet/diffusion_pytorch_model.safetensors in"),
        ({"teacher": {"source": str(pickled), "resolution": 32}}, "is a pickle, which distill never loads"),
        ({"teacher": {"source": str(tmp / "model.ckpt"), "family": "sdxl"}}, "pickled .ckpt/.bin files are refused"),
        ({**sdxl, "data": {"kind": "images", "path": str(tmp / "empty-images")}}, "lists no images"),
        ({**sdxl, "data": {"kind": "images", "path": str(tmp / "broken-meta")}}, "line 1 is not a JSON object"),
        ({**sdxl, "data": {"kind": "shards", "path": str(tmp / "shards")}}, "bad.tar is corrupt or truncated"),
        ({**sdxl, "data": {"kind": "latents", "path": str(tmp / "cache-trunc.safetensors")}},
         "is not a readable safetensors file"),
        ({**sdxl, "data": {"kind": "prompts", "path": str(tmp / "empty.txt")}}, "holds no prompts"),
        ({"teacher": {"source": "builtin:gmm-vp", "family": "sdxx"}}, "allowed: sdxl, sd3, flux, gmm"),
        ({"teacher": {"dtype": "fp8"}}, "allowed: float32, float16, bfloat16"),
        ({"method": {"name": "adversarial"}}, "'method.name' has bad value 'adversarial'"),
        ({"data": {"kind": "teacher", "batch_size": 0}}, "must be a positive integer"),
        ({"student": {"lora_rank": 0}}, "'student.lora_rank' has bad value 0"),
        ({"student": {"lora_rank": 2.5}}, "expected int"),
        ({"train": {"trackers": ["mlflow"]}}, "allowed: wandb, tensorboard"),
        ({"train": {"seed": True}}, "'train.seed' has bad value True: expected int"),
        ({"teacher": {"resolution": 30}}, "must be a multiple of 8"),
        ({"student": {"lora_targets": ["no_such_layer"]}, "teacher": {"source": "builtin:gmm-vp"},
          "data": {"kind": "teacher"}}, "match no module"),
    ]


def test_twenty_odd_bad_inputs_each_fail_cleanly(tmp_path, tiny_sdxl_dir, capsys):
    (tmp_path / "inputs").mkdir()
    cases = _bad_inputs(tmp_path / "inputs", tiny_sdxl_dir)
    assert len(cases) >= 18
    for i, (bad, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        raw = {**GMM, **bad, "train": {**bad.get("train", {}), "output_dir": str(out), "max_steps": 2}}
        if "gmm" not in raw["teacher"].get("source", "gmm") and "data" not in bad:
            raw["data"] = {"kind": "digits"}
        cfg = tmp_path / f"bad{i}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        assert cli.main(["train", str(cfg)]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (bad, err)
        assert not out.exists(), bad


def test_resume_with_a_breaking_change_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**GMM, "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2}}))
    assert cli.main(["train", str(cfg)]) == 0
    before = _tree_digest(tmp_path / "run")
    for override in ("teacher.source=builtin:gmm-flow", "student.kind=lora"):
        assert cli.main(["train", str(cfg), override, "train.max_steps=4", "--resume", "latest"]) == 2
        assert "cannot resume" in capsys.readouterr().err
    assert _tree_digest(tmp_path / "run") == before


# ---- bad samples inside a data set ----------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_sdxl_dir):
    folder = _image_folder(tmp_path / "imgs", n=6, bad=(1, 4))
    cfg = runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                        "data": {"kind": "images", "path": str(folder), "batch_size": 2},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "log_every": 1}})
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["data/skipped_samples"] >= 1
    ds = data.build(cfg.data, 32)
    assert ds[1]["skipped"] == 1 and ds[1]["prompt"] == "a handwritten digit 2"


# ---- non-finite losses ----------------------------------------------------------------------------------
def _gmm_cache(tmp_path, nan_every: int | None) -> Path:
    from teachers.gmm import GMMTeacher

    teacher = GMMTeacher("vp")
    path = data.write_cache(teacher, data.Samples(teacher.dataset(64, 0)), tmp_path / f"cache-{nan_every}.safetensors")
    tensors = load_file(path)
    if nan_every:
        tensors["latents"][::nan_every] = float("nan")
        save_file(tensors, path)
    return path


def test_nonfinite_steps_are_skipped_then_the_run_stops_keeping_its_last_good_checkpoint(tmp_path, capsys):
    base = {**GMM, "data": {"kind": "latents", "path": str(_gmm_cache(tmp_path, None)), "batch_size": 8}}
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**base, "train": {"output_dir": str(run), "max_steps": 40, "log_every": 1,
                                                     "checkpoint_every": 4, "max_nonfinite_steps": 3}}))
    assert cli.main(["train", str(cfg), "train.max_steps=4"]) == 0

    # Some poisoned samples: their steps are skipped, the run goes on and its weights stay finite.
    some = str(_gmm_cache(tmp_path, 4))
    assert cli.main(["train", str(cfg), f"data.path={some}", "data.batch_size=2", "train.max_steps=12",
                     "train.max_nonfinite_steps=8", "--resume", "latest"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["nonfinite_in_row"] > 0 for r in rows) and rows[-1]["step"] == 12
    assert "skipped: non-finite loss" in capsys.readouterr().err
    weights = load_file(run / "checkpoints/step-00000012/weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())

    # Everything poisoned: three bad steps in a row stop the run; the last good checkpoint stays intact.
    good = _tree_digest(run / "checkpoints/step-00000012")
    every = str(_gmm_cache(tmp_path, 1))
    assert cli.main(["train", str(cfg), f"data.path={every}", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 15: 3 steps in a row had a non-finite loss" in err
    assert (run / "checkpoints/latest").read_text() == "step-00000012"
    assert _tree_digest(run / "checkpoints/step-00000012") == good


# ---- checkpoints: manifests, fallback, retention --------------------------------------------------------
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    cfg = runs.parse_config({**GMM, "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6,
                                         "checkpoint_every": 2, "keep_checkpoints": 2}})
    train(cfg)
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000006"]  # retention
    weights = ckpts / "step-00000006/weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    assert checkpoint.verify(ckpts / "step-00000006").startswith("weights.safetensors is")
    assert checkpoint.find(tmp_path / "run", "latest") == ckpts / "step-00000004"
    assert "skipping checkpoint" in capsys.readouterr().err and "step-00000006" in "".join(
        [str(ckpts / "step-00000006")])
    optim = ckpts / "step-00000004/optim-student.safetensors"
    blob = bytearray(optim.read_bytes())
    blob[-5] ^= 0xFF  # flipped bits, same size
    optim.write_bytes(bytes(blob))
    with pytest.raises(Exception, match="no intact checkpoint"):
        checkpoint.find(tmp_path / "run", "latest")
    with pytest.raises(Exception, match="does not match its sha256"):
        checkpoint.find(tmp_path, str(ckpts / "step-00000004"))


# ---- SIGKILL at any moment ------------------------------------------------------------------------------
def _launch(cfg: Path, out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "distill", "train", str(cfg), f"train.output_dir={out}"]
    # With no checkpoint yet, a killed start is started over (its partial folder is moved aside).
    return subprocess.Popen(args + (["--resume", "latest"] if resume else ["--restart"]), cwd=ROOT,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _kill_when(proc: subprocess.Popen, ready, timeout=120, sig=signal.SIGKILL) -> bool:
    """Send `sig` to the run as soon as `ready()` holds; False if it finished first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(sig)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


@pytest.mark.parametrize("method", [
    # One turn, and two turns over two parts: slow-marked, as DMD2's two turns over three parts (student, fake
    # score, head) take the same kill-and-resume path with the most state.
    pytest.param({"name": "consistency", "params": {"guidance_min": 2.0, "guidance_max": 5.0}},
                 marks=pytest.mark.slow),
    pytest.param({"name": "ladd", "params": {"student_steps": 2}}, marks=pytest.mark.slow),
    {"name": "dmd2", "params": {"student_steps": 2}},
], ids=["consistency", "ladd", "dmd2"])
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, tiny_sdxl_dir, cli, method):
    cfg = tmp_path / "c.yaml"
    runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "full"},
                  "method": method,
                  "data": {"kind": "digits", "batch_size": 2},
                  "train": {"max_steps": 18, "checkpoint_every": 3, "keep_checkpoints": 2,
                            "lr_scheduler": "cosine", "warmup_steps": 3}}).dump(cfg)
    cli("train", cfg, f"train.output_dir={tmp_path / 'whole'}")

    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    mid_write = lambda: any(ckpts.glob(".step-*.tmp"))  # noqa: E731
    after_step = lambda n: lambda: (run / "metrics.jsonl").exists() and len(  # noqa: E731
        (run / "metrics.jsonl").read_text().splitlines()) >= n
    # SIGTERM (a scheduler's stop) is taken as Ctrl-C: exit 143, and the run folder's lock file is removed
    kills = [(mid_write, signal.SIGKILL), (after_step(8), signal.SIGTERM), (mid_write, signal.SIGKILL),
             (after_step(16), signal.SIGKILL)]
    landed_mid_write = 0
    for ready, sig in kills:
        proc = _launch(cfg, run, resume=(ckpts / "latest").exists())
        if _kill_when(proc, ready, sig=sig):
            landed_mid_write += any(ckpts.glob(".step-*.tmp"))
            if sig == signal.SIGTERM:
                assert proc.returncode == 143 and not (tmp_path / ".killed.lock").exists()
    assert landed_mid_write >= 1  # at least one kill hit a checkpoint being written
    proc = _launch(cfg, run, resume=True)
    assert proc.wait(timeout=300) == 0
    assert not list(ckpts.glob(".*.tmp"))
    names = sorted(p.name for p in (tmp_path / "whole/checkpoints/step-00000018").glob("*.safetensors"))
    turns = {"consistency": 1, "ladd": 2, "dmd2": 2}[method["name"]]
    assert len(names) == 1 + turns  # the weights, and one optimiser per turn
    for name in names:
        whole = load_file(tmp_path / "whole/checkpoints/step-00000018" / name)
        killed = load_file(ckpts / "step-00000018" / name)
        assert whole.keys() == killed.keys() and all(torch.equal(whole[k], killed[k]) for k in whole), name


# ---- nothing unsafe is loaded ---------------------------------------------------------------------------
def test_pickled_weights_are_refused_and_no_unsafe_loading_in_code(tmp_path, tiny_sdxl_dir):
    folder = tmp_path / "t"
    os.system(f"cp -r '{tiny_sdxl_dir}' '{folder}'")
    torch.save(load_file(folder / "vae/diffusion_pytorch_model.safetensors"), folder / "vae/diffusion_pytorch_model.bin")
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(Exception, match="is a pickle, which distill never loads"):
        teachers.load(TeacherConfig(source=str(folder)))
    sources = [p for d in ("distill", "teachers", "students", "discriminators") for p in (ROOT / d).rglob("*.py")]
    for src in sources:
        text = src.read_text()
        assert "trust_remote_code=True" not in text, src
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (src, line)


@pytest.mark.parametrize("kind,stop", [("full", 4), ("lora", 4), ("lora", 3)])
def test_progressive_resume_restores_the_round_teacher(tmp_path, kind, stop):
    raw = {**GMM, "student": {"kind": kind},
           "method": {"name": "progressive", "params": {"start_steps": 4, "round_steps": 3}},
           "train": {"max_steps": 6, "checkpoint_every": 2, "lr_scheduler": "linear"}}
    whole = train(runs.parse_config(raw, [f"train.output_dir={tmp_path / 'whole'}"])).state_to_save()
    split_cfg = runs.parse_config(raw, [f"train.output_dir={tmp_path / 'split'}"])
    # stops at round 1's start or inside it: its teacher is round 0's student, its optimiser and LR schedule new
    train(split_cfg, stop_after=stop)
    split = train(split_cfg, resume="latest").state_to_save()
    assert any(k.startswith("previous") for k in whole) and whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_progressive_rounds_each_start_a_fresh_optimiser_and_lr_schedule(tmp_path):
    raw = {**GMM, "method": {"name": "progressive", "params": {"start_steps": 8, "round_steps": 4}},
           "train": {"max_steps": 14, "checkpoint_every": 9, "log_every": 1, "lr_scheduler": "linear",
                     "learning_rate": 1e-3, "output_dir": str(tmp_path)}}
    train(runs.parse_config(raw))
    lrs = [json.loads(line)["student/lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the LR after each update: linear to 0 over rounds 0 and 1 (4 steps), and over the last round's 6 steps
    expected = [1e-3 * (1 - k / 4) for k in range(1, 5)] * 2 + [1e-3 * (1 - k / 6) for k in range(1, 7)]
    assert lrs == pytest.approx(expected)
    # AdamW's moments and step count start again with each round: a round's-end checkpoint holds the next round's
    # fresh optimiser, so a resume there starts the round as an unbroken run does
    for step, updates in ((4, set()), (8, set()), (9, {1.0}), (14, {6.0})):
        _, optims, _ = checkpoint.load(tmp_path / "checkpoints" / f"step-{step:08d}")
        assert {float(s["step"]) for s in optims["student"]["state"].values()} == updates, step


def test_only_consistency_makes_an_ema_and_starts_it_from_a_student_saved_without_one(tmp_path):
    raw = {**GMM, "method": {"name": "progressive", "params": {"start_steps": 4, "round_steps": 1}},
           "train": {"max_steps": 2, "output_dir": str(tmp_path / "pd")}}
    progressive = train(runs.parse_config(raw))
    assert progressive.student.ema is None
    saved = checkpoint.load(checkpoint.find(tmp_path / "pd", "latest"))[0]
    assert any(k.startswith("student.backbone.") for k in saved)
    assert not any(k.startswith("student.ema.") for k in saved)
    lcm = runs.parse_config({**GMM, "method": {"name": "consistency"},
                             "student": {"kind": "full", "init_from": str(tmp_path / "pd")}})
    method = runs.build_method(lcm, "cpu")
    for e, p, q in zip(method.student.ema.parameters(), method.student.backbone.parameters(),
                       progressive.student.backbone.parameters()):
        assert torch.equal(e, p) and torch.equal(p, q)
