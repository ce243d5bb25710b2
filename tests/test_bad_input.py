"""Bad input on every command, as a careless or hostile user types it: exit 2, one line naming the field or path,
no traceback, and nothing under the run, the export, the leaderboard or the other files changed (sha256)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from distill import checkpoint, cli, config, data, runs
from distill.exporting import export
from distill.trainer import train

READ_ONLY = "/sys/distill-bad-input"  # sysfs refuses new entries even to root
PROMPTS = Path(__file__).resolve().parents[1] / "experiments/prompts/digits.txt"
GMM = {"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
       "method": {"params": {"guidance_min": 1.0, "guidance_max": 1.0}},
       "data": {"kind": "teacher", "batch_size": 8, "size": 64}, "train": {"max_steps": 2}}


def tree_stat(folder: Path) -> list:
    """A cheap look between cases: every entry's name, and each file's size and modification time."""
    return [(str(p), p.is_file() and (p.lstat().st_size, p.lstat().st_mtime_ns)) for p in sorted(folder.rglob("*"))]


def tree_digest(folder: Path) -> str:
    """Names of every file and folder below `folder`, and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def _teacher_variants(w: Path, tiny_sdxl_dir: Path) -> None:
    for name in ("empty-encoder", "no-encoder-2", "bad-class"):
        shutil.copytree(tiny_sdxl_dir, w / name)
    (w / "empty-encoder/text_encoder/model.safetensors").write_bytes(b"")
    shutil.rmtree(w / "no-encoder-2/text_encoder_2")
    index = json.loads((w / "bad-class/model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet9000Model"]
    (w / "bad-class/model_index.json").write_text(json.dumps(index))
    vae = load_file(tiny_sdxl_dir / "vae/diffusion_pytorch_model.safetensors")
    save_file({f"first_stage_model.{k}": v for k, v in vae.items()}, w / "vae-only.safetensors")
    (w / "garbage.safetensors").write_bytes(b"\x00not safetensors" * 10)


def _inputs(w: Path) -> None:
    (w / "empty.txt").write_text("\n\n")
    (w / "latin1.txt").write_bytes("a caf\xe9 digit\n".encode("latin-1"))
    (w / "bad.jsonl").write_text('{"prompt": "a handwritten digit 1"}\n{"prompt": \n')
    (w / "no-prompt-key.jsonl").write_text('{"text": "a handwritten digit 1"}\n')
    (w / "a-file").write_text("not a folder")
    (w / "folder").mkdir()
    (w / "busy").mkdir()
    (w / "busy/mine.txt").write_text("the user's own file")
    (w / "empty.yaml").write_text("# nothing\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "latin1.yaml").write_bytes("train: {output_dir: caf\xe9}\n".encode("latin-1"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (w / "bomb.yaml").write_text(bomb)
    (w / "huge.yaml").write_text("train: {max_steps: 2}\n" + "#" * (config.MAX_YAML_BYTES + 10) + "\n")
    (w / "user").mkdir()
    (w / "user/config.yaml").write_text(yaml.safe_dump({**GMM, "train": {"output_dir": "."}}) + "# my notes\n")
    (w / "meta-latin1").mkdir()
    (w / "meta-latin1/metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    good = {**GMM, "train": {**GMM["train"], "output_dir": str(w / "new-run")}}
    (w / "good.yaml").write_text(yaml.safe_dump(good))
    (w / "corrupt.sqlite").write_bytes(b"junk" * 100)
    (w / "bench-missing.yaml").write_text("runs: [{config: no/such.yaml}]\n")
    (w / "bench-typo.yaml").write_text("teachers: [{source: builtin:digits-sdxl, stepz: [4]}]\n")
    (w / "bench-zero.yaml").write_text("num_per_prompt: 0\nteachers: [{source: builtin:digits-sdxl}]\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sdxl_dir):
    """A trained run, an earlier export, a leaderboard and every kind of bad file, all under one folder."""
    w = tmp_path_factory.mktemp("world")
    cfg = runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                        "student": {"kind": "lora", "lora_rank": 4},
                        "method": {"name": "consistency", "params": {"guidance_min": 3.0, "guidance_max": 3.0}},
                        "data": {"kind": "digits", "batch_size": 2},
                        "train": {"output_dir": str(w / "run"), "max_steps": 2}})
    train(cfg)
    export(w / "run", w / "export", prompts=["a handwritten digit 1"])
    from distill.leaderboard import Leaderboard

    Leaderboard(w / "board.sqlite").close()
    from teachers.gmm import GMMTeacher

    gmm = GMMTeacher("vp")
    data.write_cache(gmm, data.Samples(gmm.dataset(8, 0)), w / "gmm-cache.safetensors")
    _teacher_variants(w, tiny_sdxl_dir)
    _inputs(w)
    (w / "parent-link").symlink_to(w)
    return w


def _cases(w: Path, tiny: Path) -> list[tuple[list[str], str]]:
    run, good, out = str(w / "run"), str(w / "good.yaml"), str(w / "out")
    ckpt = str(w / "run/checkpoints/step-00000002")
    train_ = lambda *o: ["train", good, *o]  # noqa: E731
    sdxl = [f"teacher.source={tiny}", "teacher.resolution=32", "data.kind=digits", "student.kind=lora"]
    gen = lambda *a: ["generate", run, "--prompt", "a handwritten digit 1", "--out", out, *a]  # noqa: E731
    ev = lambda *a: ["eval", run, "--db", str(w / "board.sqlite"), *a]  # noqa: E731
    exp = lambda to, *a: ["export", run, "--to", str(to), "--db", str(w / "board.sqlite"), *a]  # noqa: E731
    speed = lambda *a: ["bench-speed", run, "--db", str(w / "board.sqlite"), *a]  # noqa: E731
    return [
        # train: every numeric field is range-checked; NaN and inf never pass
        # DMD2 (issue #13): refused before any model loads
        (train_("method.name=dmd2", "method.params={fake_adapter: default}"),
         "'method.params.fake_adapter' has bad value 'default': must be a name"),
        (train_("method.name=dmd2", "method.params={student_steps: 5000}"), "'method.params.student_steps' has bad"),
        (train_("method.name=dmd2", "method.params={student_steps: 0}"), "'method.params.student_steps' has bad"),
        (train_("method.name=dmd2", "method.params={fake_score: twin}"), "'method.params.fake_score'"),
        (train_("method.name=dmd2", "method.params={gan_fake_weight: 0}"), "both > 0 (GAN on) or both 0 (GAN off)"),
        (train_("method.name=dmd2", "method.params={}", "data.kind=prompts", f"data.path={PROMPTS}"),
         "'data.kind' has bad value 'prompts': DMD2's GAN term needs real images"),
        (train_("train.max_grad_norm=-1"), "'train.max_grad_norm' has bad value -1"),
        (train_("train.max_grad_norm=.nan"), "'train.max_grad_norm'"),
        (train_("train.learning_rate=.inf"), "'train.learning_rate' has bad value inf"),
        (train_("train.learning_rate=1e39"), "'train.learning_rate' has bad value 1e+39: must be a number in (0, "),
        (train_("train.learning_rate=.nan"), "'train.learning_rate' has bad value nan"),
        (train_("train.learning_rate=0"), "'train.learning_rate'"),
        (train_("train.adam_beta1=1.0"), "'train.adam_beta1' has bad value 1.0: must be in [0, 1)"),
        (train_("train.adam_beta2=-0.1"), "'train.adam_beta2'"),
        (train_("train.weight_decay=-0.01"), "'train.weight_decay'"),
        (train_("train.seed=-1"), "'train.seed' has bad value -1: must be in [0, 2^63)"),
        (train_("train.seed=9223372036854775808"), "'train.seed'"),
        (train_("train.warmup_steps=-3"), "'train.warmup_steps'"),
        (train_("train.turn_learning_rates={student: .inf}"), "'train.turn_learning_rates.student'"),
        (train_("train.max_steps=-5"), "'train.max_steps'"),
        (train_("train.gradient_accumulation_steps=0"), "'train.gradient_accumulation_steps'"),
        (train_("data.batch_size=0"), "'data.batch_size'"),
        (train_("student.lora_alpha=0"), "'student.lora_alpha'"),
        (train_("student.kind=lora", "train.fsdp=true"), "'train.fsdp' has bad value True: shards a full student"),
        (train_("student.kind=full", "train.fsdp=true"), "train.fsdp shards the student over several processes"),
        (train_("sample.guidance_scale=.nan"), "'sample.guidance_scale' has bad value nan"),
        (train_("sample.guidance_scale=0.5"), "'sample.guidance_scale'"),
        (train_("sample.steps=0"), "'sample.steps'"),
        (train_("sample.steps=100000"), "'sample.steps' has bad value 100000: must be in [1, 1000]"),
        (train_("sample.height=30"), "'sample.height'"),
        (train_("teacher.resolution=100000"), "'teacher.resolution' has bad value 100000: must be in [8, 4096]"),
        (train_("student.ema_decay=.nan"), "'student.ema_decay'"),
        # train: overrides and config files
        (train_("train.output_dir="), "'train.output_dir' has bad value None"),
        (train_("train.output_dir=''"), "'train.output_dir' has bad value '': must not be empty"),
        (train_("train.turn_every={student: 1"), "'train.turn_every' has bad value '{student: 1': not a valid YAML"),
        (train_("train.max_steps=[1, 2"), "'train.max_steps'"),
        (train_("train.max_steps=two"), "'train.max_steps' has bad value 'two'"),
        (train_("sample"), "overrides look like section.field=value"),
        (["train", str(w / "folder")], "is a folder"),
        (["train", str(w / "no-such.yaml")], "no such config file"),
        (["train", str(w / "empty.yaml")], "the config file is empty"),
        (["train", str(w / "list.yaml")], "must hold a mapping"),
        (["train", str(w / "latin1.yaml")], "is not UTF-8 text"),
        (["train", str(w / "bomb.yaml")], "expands to more than 100000 values through YAML aliases"),
        (["train", str(w / "huge.yaml")], "bytes; a config file is at most"),
        # train: the run folder
        (train_("--stop-after-steps", "-1"), "argument --stop-after-steps: -1 is out of range"),
        (train_("--stop-after-steps", "0"), "argument --stop-after-steps"),
        (train_("--resume", "latest", "--restart"), "give one"),
        (train_(f"train.output_dir={run}"), "already holds a run (it has checkpoints)"),
        (["train", str(w / "user/config.yaml"), f"train.output_dir={w / 'user'}"], "distill did not write"),
        (train_(f"train.output_dir={w / 'a-file'}"), "a-file is a file"),
        (train_(f"train.output_dir={w / 'a-file/run'}"), "which is a file"),
        (train_(f"train.output_dir={READ_ONLY}"), "cannot be written"),
        (train_(f"train.output_dir={w / 'new-run'}", "--resume", "latest"), "nothing to resume"),
        # train: data and teachers
        (train_("data.kind=prompts", f"data.path={w / 'latin1.txt'}"), "latin1.txt is not UTF-8 text"),
        (train_("data.kind=prompts", f"data.path={w / 'bad.jsonl'}"), "bad.jsonl line 2 is not a JSON object"),
        (train_("data.kind=prompts", f"data.path={w / 'empty.txt'}"), "empty.txt holds no prompts"),
        (train_(*sdxl, "data.kind=latents", f"data.path={w / 'gmm-cache.safetensors'}"), "made by another teacher"),
        (train_(*sdxl, "data.kind=images", f"data.path={w / 'meta-latin1'}"), "metadata.jsonl is not UTF-8 text"),
        (train_(*sdxl[1:], f"teacher.source={w / 'empty-encoder'}"), "text_encoder/model.safetensors"),
        (train_(*sdxl[1:], f"teacher.source={w / 'no-encoder-2'}"), "is missing its text_encoder_2/ component"),
        (train_(*sdxl[1:], f"teacher.source={w / 'bad-class'}"), "component 'unet' names the class"),
        (train_(*sdxl[1:], f"teacher.source={w / 'vae-only.safetensors'}", "teacher.family=sdxl"),
         "holds no diffusion model weights"),
        (train_(*sdxl[1:], f"teacher.source={w / 'garbage.safetensors'}", "teacher.family=sdxl"),
         "garbage.safetensors is not a readable safetensors file"),
        # generate
        (gen("--steps", "0"), "argument --steps: 0 is out of range"),
        (gen("--steps", "-1"), "argument --steps"),
        (gen("--steps", "100000"), "argument --steps: 100000 is out of range; allowed: 1 to 1000"),
        (gen("--steps", "four"), "argument --steps: 'four' is not a whole number"),
        (gen("--steps", "51"), "--steps 51: this student samples on its 50-point training grid"),
        (gen("--teacher", "--steps", "-1"), "argument --steps"),
        (gen("--num-per-prompt", "0"), "argument --num-per-prompt"),
        (gen("--batch-size", "0"), "argument --batch-size"),
        (gen("--seed", "-1"), "argument --seed"),
        (gen("--guidance-scale", "nan"), "argument --guidance-scale: nan is not allowed"),
        (gen("--guidance-scale", "inf"), "argument --guidance-scale"),
        (gen("--prompts", str(w / "empty.txt")), "holds no prompts"),
        (gen("--prompts", str(w / "latin1.txt")), "is not UTF-8 text"),
        (gen("--prompts", str(w / "bad.jsonl")), "line 2 is not a JSON object"),
        (gen("--prompts", str(w / "no-prompt-key.jsonl")), "line 1 is not a JSON object with a \"prompt\""),
        (gen("--prompts", str(w / "folder")), "is a folder"),
        (["generate", run, "--out", out], "give at least one --prompt"),
        (["generate", run, "--prompt", "x", "--out", str(w / "a-file")], "--out " + str(w / "a-file") + " is a file"),
        (["generate", run, "--prompt", "x", "--out", str(w / "a-file/x")], "which is a file"),
        (["generate", run, "--prompt", "x", "--out", READ_ONLY], "cannot be written"),
        (["generate", str(w / "folder"), "--prompt", "x", "--out", out], "is not a distill checkpoint"),
        (["generate", str(w / "a-file"), "--prompt", "x", "--out", out], "is neither a run folder"),
        (["generate", run, "sample.guidance_scale=.nan", "--prompt", "x", "--out", out], "'sample.guidance_scale'"),
        # eval
        (ev("--steps", "-1"), "argument --steps"),
        (ev("--steps", "0"), "argument --steps"),
        (ev("--steps", "1", "--num-per-prompt", "0"), "argument --num-per-prompt"),
        (ev("--steps", "1", "--guidance-scale", "nan"), "argument --guidance-scale"),
        (ev("--steps", "1", "--seed", str(2**63)), "argument --seed"),
        (ev("--steps", "1", "--teacher-reference-steps", "-1"), "argument --teacher-reference-steps"),
        (ev("--steps", "1", "--prompts", str(w / "empty.txt")), "holds no prompts"),
        (ev("--steps", "1", "--out", str(w / "a-file")), "is a file"),
        (ev("--steps", "2", "--num-per-prompt", "2", "--extractor", "no-such"), "feature extractor 'no-such'"),
        (["eval", run, "--steps", "2", "--db", str(w / "corrupt.sqlite")], "cannot be used"),
        # export: --overwrite replaces only an earlier export, never the run or anything holding it
        (exp(w, "--overwrite"), "holds the run being exported"),
        (exp(w / "run", "--overwrite"), "holds the run being exported"),
        (exp(w / "run/checkpoints", "--overwrite"), "holds the run being exported"),
        (exp(w / "run" / "..", "--overwrite"), "holds the run being exported"),
        (exp(w / "parent-link", "--overwrite"), "holds the run being exported"),
        (["export", ckpt, "--to", str(w / "run"), "--overwrite"], "holds the run being exported"),
        (exp(w / "busy", "--overwrite"), "is not an earlier export (it has no distill_export.json)"),
        (exp(w / "busy"), "is not empty; pass --overwrite"),
        (exp(w / "export"), "is not empty; pass --overwrite"),
        (exp(w / "a-file"), "is a file"),
        (exp(w / "a-file/x"), "which is a file"),
        (exp(READ_ONLY), "cannot be written"),
        (exp(w / "out", "--steps", "0"), "argument --steps"),
        (exp(w / "out", "--steps", "64"), "--steps 64: this student samples on its 50-point training grid"),
        (exp(w / "out", "--dtype", "fp8"), "unknown dtype 'fp8'"),
        (exp(w / "out", "--format", "onnx"), "unknown export format 'onnx'"),
        # make-teacher, cache, leaderboard, bench, bench-speed
        (["make-teacher", "tiny-sdxl", str(w / "a-file")], "is a file"),
        (["make-teacher", "tiny-sdxl", READ_ONLY], "cannot be written"),
        (["make-teacher", "tiny-sdxl", str(w / "busy")], "exists and is not empty"),
        (["make-teacher", "tiny-sd15", out], "argument name: invalid choice"),
        (["cache", good, "--out", str(w / "folder")], "must name the .safetensors file"),
        (["cache", good, "--out", str(w / "good.yaml")], "must name the .safetensors file"),
        (["cache", good, "--out", READ_ONLY + "/c.safetensors"], "cannot be written"),
        (["cache", str(w / "folder"), "--out", out + ".safetensors"], "is a folder"),
        (["leaderboard", "--db", str(w / "none.sqlite"), "--out", out], "no leaderboard at"),
        (["leaderboard", "--db", str(w / "board.sqlite"), "--out", str(w / "a-file")], "is a file"),
        (["bench", str(w / "folder")], "is a folder"),
        (["bench", str(w / "empty.yaml")], "the matrix file is empty"),
        (["bench", str(w / "bench-missing.yaml")], "no such config file"),
        (["bench", str(w / "bench-typo.yaml")], "did you mean 'teachers[0].steps'"),
        (["bench", str(w / "bench-zero.yaml")], "'num_per_prompt' has bad value 0: must be an integer >= 1"),
        (speed("--repeats", "0"), "argument --repeats"),
        (speed("--steps", "0"), "argument --steps"),
        (speed("--batch-size", "0"), "argument --batch-size"),
        (speed("--teacher-guidance", "nan"), "argument --teacher-guidance"),
        (speed("--out", str(w / "folder")), "is a folder; give the Markdown file"),
        (speed("--out", READ_ONLY + "/speed.md"), "cannot be written"),
    ]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        code = e.code
    return code, capsys.readouterr().err


def refusal_problem(argv: list, message: str, capsys) -> str | None:
    """Run one case: None if it exits 2 with one `error:` line holding `message` and no traceback, else what went
    wrong."""
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] \
            and "Traceback" not in err:
        return None
    return f"{' '.join(map(str, argv))[-300:]}\n  -> exit {code}: {err.strip()[-500:]}"


def test_every_bad_input_fails_cleanly_and_changes_nothing(world, tiny_sdxl_dir, capsys, monkeypatch):
    monkeypatch.chdir(world)  # relative defaults (runs/leaderboard.sqlite) stay inside the watched tree
    cases = _cases(world, tiny_sdxl_dir)
    assert len(cases) >= 80
    digest, before = tree_digest(world), tree_stat(world)
    failures = []
    for argv, message in cases:
        problem = refusal_problem(argv, message, capsys)
        if problem:
            failures.append(problem)
        elif tree_stat(world) != before:
            failures.append(f"{' '.join(argv)}\n  -> changed files under {world}")
            before = tree_stat(world)
    assert not failures, "\n".join(failures)
    assert tree_digest(world) == digest
    assert not Path(READ_ONLY).exists()


def test_a_launch_with_accelerates_own_fsdp_is_refused(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for distributed_type: FSDP
    code, err = _run(["train", str(world / "good.yaml"), "student.kind=full", "train.fsdp=true"], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "set train.fsdp=true" in err, err


def test_the_real_entry_point_prints_one_line(world, cli):
    for args, message in [(["export", world / "run", "--to", world, "--overwrite"], "holds the run being exported"),
                          (["train", world / "bomb.yaml"], "YAML aliases")]:
        before = tree_digest(world)
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert tree_digest(world) == before


# ---- the run folder: no overwrite, no mixing ---------------------------------------------------------------
def _gmm_config(tmp_path: Path, **train_fields) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**GMM, "train": {**GMM["train"], "output_dir": str(tmp_path / "run"),
                                                    **train_fields}}))
    return cfg


def test_rerun_is_refused_restart_moves_the_old_run_aside_and_resume_continues(tmp_path, capsys):
    cfg = _gmm_config(tmp_path, checkpoint_every=1, keep_checkpoints=1, log_every=1)
    assert cli.main(["train", str(cfg)]) == 0
    before = tree_digest(tmp_path / "run")
    assert cli.main(["train", str(cfg), "train.max_steps=3"]) == 2
    assert "already holds a run" in capsys.readouterr().err and tree_digest(tmp_path / "run") == before
    # The run's own resolved config continues it (it is distill's file, not the user's).
    assert cli.main(["train", str(tmp_path / "run/config.yaml"), "train.max_steps=3", "--resume", "latest"]) == 0
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-00000003"
    old = tree_digest(tmp_path / "run")
    assert cli.main(["train", str(cfg), "--restart"]) == 0
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and tree_digest(aside[0]) == old  # the old run, untouched
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the new run's metrics only, nothing of the old one mixed in
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-00000002"


def test_a_users_config_in_the_output_dir_is_never_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("# my comments\n" + yaml.safe_dump({**GMM, "train": {**GMM["train"], "output_dir": "."}}))
    text = mine.read_text()
    assert cli.main(["train", "config.yaml"]) == 2
    assert "distill did not write" in capsys.readouterr().err and mine.read_text() == text


def test_stop_after_says_where_it_stopped(tmp_path, capsys):
    cfg = _gmm_config(tmp_path, max_steps=4)
    assert cli.main(["train", str(cfg), "--stop-after-steps", "1"]) == 0
    assert "stopped at step 1 of 4" in capsys.readouterr().out and not (tmp_path / "run/student").exists()


# ---- non-finite weights are never saved --------------------------------------------------------------------
def test_a_run_whose_weights_turn_nonfinite_saves_nothing_and_exits_2(tmp_path, capsys, monkeypatch):
    from distill.methods.base import Method

    def poison(self, turn, step):  # what an overflow inside the optimiser leaves behind
        if step == 2:
            next(self.student.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(Method, "after_step", poison)
    cfg = _gmm_config(tmp_path, checkpoint_every=2, max_steps=6)
    assert cli.main(["train", str(cfg)]) == 2
    err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error: "))
    assert "stopped at step 4" in err and "NaN or inf" in err and "nothing was written" in err, err
    assert [p.name for p in (tmp_path / "run/checkpoints").glob("step-*")] == ["step-00000002"]
    assert not (tmp_path / "run/student").exists()


def test_export_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, capsys):
    cfg = _gmm_config(tmp_path)
    assert cli.main(["train", str(cfg)]) == 0
    ckpt = tmp_path / "run/checkpoints/step-00000002"
    weights = load_file(ckpt / "weights.safetensors")
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, ckpt / "weights.safetensors")
    manifest = json.loads((ckpt / "manifest.json").read_text())  # an intact-looking checkpoint, made so on purpose
    manifest["weights.safetensors"] = {"bytes": (ckpt / "weights.safetensors").stat().st_size,
                                       "sha256": checkpoint._sha256(ckpt / "weights.safetensors")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["export", str(ckpt), "--to", str(tmp_path / "out")]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- values that used to be read wrong ---------------------------------------------------------------------
def test_an_override_is_text_unless_it_is_one_whole_yaml_value():
    cfg = runs.parse_config(GMM, ["train.output_dir=/x/run #2", "train.max_steps=7", "train.turn_every={student: 2}"])
    assert cfg.train.output_dir == "/x/run #2" and cfg.train.max_steps == 7 and cfg.train.turn_every == {"student": 2}
    assert runs.parse_config(GMM, ["train.output_dir='run #3'"]).train.output_dir == "run #3"


@pytest.mark.parametrize("mode,suffix", [("I;16", "png"), ("I", "tiff"), ("F", "tiff"), ("P", "png"), ("LA", "png")])
def test_every_image_mode_keeps_its_brightness(tmp_path, mode, suffix):
    gray = np.full((16, 16), 0.25)
    if mode == "I;16":
        img = Image.fromarray((gray * 65535).astype(np.uint16))
    elif mode == "I":
        img = Image.fromarray((gray * 65535).astype(np.int32))
    elif mode == "F":
        img = Image.fromarray(gray.astype(np.float32))
    elif mode == "P":
        img = Image.fromarray((gray * 255).astype(np.uint8)).convert("P")
    else:
        img = Image.fromarray(np.stack([(gray * 255).astype(np.uint8), np.full((16, 16), 255, np.uint8)], -1))
    img.save(tmp_path / f"x.{suffix}")
    loaded = data.open_image(tmp_path / f"x.{suffix}", "x")
    assert loaded.mode == mode
    mean = (data.image_to_tensor(loaded, 16).mean().item() + 1) / 2
    assert abs(mean - 0.25) < 0.01, (mode, mean)


def test_a_bug_is_one_line_and_a_traceback_file(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(cli, "_leaderboard", broken)
    parser = cli.parser()
    monkeypatch.setattr(cli, "parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["leaderboard"].set_defaults(func=broken)
    assert cli.main(["leaderboard"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distill leaderboard failed unexpectedly (RuntimeError: something" in err
    log = Path(err.split("the traceback is in ")[1].split(" (or run")[0])
    assert "Traceback" in log.read_text() and "something nobody foresaw" in log.read_text()
    os.unlink(log)
