"""Reliability round 3: no user's file runs code, no command replaces what it did not make, no two commands write
one folder at once, and what used to fail as a bug or pass silently now ends in one line naming the field or path.

Each case: exit 2, one `error:` line naming the field or path, no traceback, and nothing under the watched tree
changed (sha256 of every file)."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distill import checkpoint, cli, data, metrics, paths
from distill.errors import DistillError
from test_bad_input import GMM, refusal_problem, tree_digest

MARKER = "PWNED"


class Payload:
    """Unpickling this writes MARKER into the current folder: what a hostile weights file would do."""

    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').write('code ran')",))


def _payloads(w: Path) -> dict[str, Path]:
    """A pickle payload in every form a weights file takes: torch.save's zip, a bare pickle, and either one under a
    name that promises something safe."""
    files = {"zip.pth": w / "evil.pth", "raw.pkl": w / "evil.pkl", "named.safetensors": w / "evil.safetensors",
             "named.bin": w / "unet-only/unet/diffusion_pytorch_model.bin", "named.ckpt": w / "evil.ckpt"}
    torch.save({"weight": Payload()}, files["zip.pth"])
    files["raw.pkl"].write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    shutil.copy(files["zip.pth"], files["named.safetensors"])
    shutil.copy(files["zip.pth"], files["named.ckpt"])
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sdxl_dir):
    """A trained GMM run with two checkpoints, payloads, a user's files and a leaderboard, under one folder."""
    w = tmp_path_factory.mktemp("round3")
    (w / "unet-only/unet").mkdir(parents=True)
    shutil.copytree(tiny_sdxl_dir, w / "teacher-with-pickle")
    (w / "teacher-with-pickle/unet/diffusion_pytorch_model.safetensors").unlink()
    _payloads(w)
    shutil.copy(w / "evil.pth", w / "teacher-with-pickle/unet/diffusion_pytorch_model.bin")
    cfg = {**GMM, "train": {**GMM["train"], "output_dir": str(w / "run"), "checkpoint_every": 1}}
    (w / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(w / "run.yaml")]) == 0
    other = {**cfg, "train": {**cfg["train"], "output_dir": str(w / "other")}}
    (w / "other.yaml").write_text(yaml.safe_dump(other))
    assert cli.main(["train", str(w / "other.yaml")]) == 0
    fresh = {**cfg, "train": {**cfg["train"], "output_dir": str(w / "fresh")}}
    (w / "fresh.yaml").write_text(yaml.safe_dump(fresh))
    (w / "twice.yaml").write_text("train: {max_steps: 2}\nmethod: {name: consistency}\ntrain: {max_steps: 3}\n")
    (w / "twice-nested.yaml").write_text("method:\n  params: {huber_c: 0.1, huber_c: 0.2}\n")
    (w / "mine.safetensors").write_bytes(b"the user's exported LoRA")
    (w / "notes.md").write_text("# the user's notes\n")
    (w / "images").mkdir()
    (w / "images/0000-a-handwritten-digit-1.png").write_bytes(b"the user's image")
    (w / "a-file").write_text("a file, not a folder")
    os.mkfifo(w / "fifo.yaml")
    (w / "dangling").symlink_to(w / "nowhere")
    return w


def _cases(w: Path) -> list[tuple[list, str]]:
    run, fresh = w / "run", w / "fresh.yaml"
    return [
        # security: a pickle in any weights slot is refused before it is opened by anything that unpickles
        *[(["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "inception-v3-compat",
            "--extractor-weights", w / name], why)
          for name, why in (("evil.pth", "never runs it"), ("evil.ckpt", "never runs it"),
                            ("evil.safetensors", "is neither a safetensors nor a torch.save weights file"))],
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "vgg16", "--extractor-weights",
          w / "evil.pkl"], "never runs it"),
        (["train", fresh, f"teacher.source={w / 'teacher-with-pickle'}", "teacher.resolution=32", "student.kind=lora",
          "data.kind=digits", "teacher.family=sdxl"], "is a pickle, which distill never loads"),
        (["train", fresh, f"teacher.source={w / 'evil.ckpt'}", "teacher.family=sdxl", "student.kind=lora",
          "data.kind=digits"], "evil.ckpt"),
        (["train", fresh, f"teacher.source={w / 'evil.safetensors'}", "teacher.family=sdxl", "student.kind=lora",
          "data.kind=digits"], "is not a readable safetensors file"),
        (["train", fresh, "data.kind=latents", f"data.path={w / 'evil.safetensors'}"], "evil.safetensors"),
        # eval: arguments that would have no effect, or would download, are refused before sampling
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor-weights", w / "evil.pth"],
         "--extractor-weights has no effect with the extractor 'distill-digits'"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor-weights", w / "no-such.pth"],
         "--extractor-weights has no effect"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "inception-v3-compat"],
         "needs local weights"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "clip-vit-b-32"], "would download"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "inception-v3-compat",
          "--extractor-weights", w / "fifo.yaml"], "is a FIFO (named pipe), not a regular file"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite", "--extractor", "inception-v3-compat",
          "--extractor-weights", w / "notes.md"], "is neither a safetensors nor a torch.save weights file"),
        (["bench-speed", run, "--methods", "ladd"], "--methods times training steps: it needs --train"),
        (["bench-speed", run, "--profile", "3"], "--profile times training steps"),
        # no command replaces a file it did not make
        (["cache", fresh, "--out", w / "mine.safetensors"], "mine.safetensors exists; distill cache writes a new file"),
        (["plan", fresh, "--out", fresh], "exists and distill plan did not write it"),
        (["plan", fresh, "--out", w / "notes.md"], "exists and distill plan did not write it"),
        (["plan", fresh, "student.lora_rank=100000000"], "'student.lora_rank' has bad value 100000000"),
        (["plan", fresh, "data.batch_size=100000000"], "'data.batch_size' has bad value 100000000"),
        (["bench-speed", run, "--out", w / "notes.md"], "exists and distill bench-speed did not write it"),
        (["generate", run, "--prompt", "a handwritten digit 1", "--out", w / "images"],
         "already holds 0000-a-handwritten-digit-1.png"),
        # resume: never mixes two runs, trains backwards or loads weights of another shape
        (["train", w / "run.yaml", "--resume", w / "other/checkpoints/step-00000002"], "is a checkpoint of another run"),
        (["train", w / "run.yaml", "train.max_steps=1", "--resume", "latest"],
         "train.max_steps 1 is below the checkpoint's step 2"),
        (["train", w / "run.yaml", "student.guidance_embedding=true", "train.max_steps=3", "--resume", "latest"],
         "cannot resume: student.guidance_embedding is True in this config and False in the checkpoint"),
        # config files and overrides
        (["train", w / "twice.yaml"], "the key 'train' appears twice"),
        (["train", w / "twice-nested.yaml"], "the key 'huber_c' appears twice"),
        (["train", fresh, "train.output_dir=!!python/object/apply:os.system [touch PWNED]"],
         "'train.output_dir' has bad value"),
        (["train", fresh, "train.turn_every={a: 1, a: 2}"], "the key 'a' appears twice"),
        (["train", w / "fifo.yaml"], "is a FIFO (named pipe), not a regular file"),
        (["train", "/dev/null"], "is a character device, not a regular file"),
        (["train", w / ("x" * 300 + ".yaml")], "File name too long"),
        (["generate", run, "--prompts", w / "fifo.yaml", "--out", w / "out"], "is a FIFO (named pipe)"),
        (["train", fresh, f"train.output_dir={w / 'link-to-run'}", "--restart"], "is a symbolic link"),
        # what has nothing to make, or nowhere to write, says so before any work
        (["generate", run, "--prompt", "class 1", "--out", w / "out"], "samples 2-D points, not images"),
        (["eval", run, "--steps", "1", "--db", w / "b.sqlite"], "samples 2-D points, not images"),
        (["make-teacher", "tiny-sdxl", w / "dangling"], "is a symbolic link to"),
        (["generate", run, "--prompt", "x", "--out", w / "dangling"], "is a symbolic link to"),
        (["train", fresh, "teacher.source=builtin:tiny-sd3", "student.kind=lora", "data.kind=digits",
          "teacher.resolution=32"], "DISTILL_CACHE"),
    ]


def test_round3_bad_input_fails_cleanly_and_changes_nothing(world, capsys, monkeypatch):
    monkeypatch.chdir(world)  # a payload that ran would leave MARKER here
    monkeypatch.setenv("DISTILL_CACHE", str(world / "a-file"))  # a file where built-in teachers would be built
    (world / "link-to-run").symlink_to(world / "run")
    digest, failures = tree_digest(world), []
    for argv, message in _cases(world):
        failures.append(refusal_problem(argv, message, capsys))
        assert not (world / MARKER).exists(), f"code ran: {argv}"
        now = tree_digest(world)
        if now != digest:
            failures.append(f"{' '.join(map(str, argv))[-300:]}\n  -> changed files under {world}")
            digest = now
    (world / "link-to-run").unlink()
    assert not any(failures), "\n".join(filter(None, failures))


def test_weights_are_read_without_running_code_and_load_the_same_from_either_format(tmp_path, monkeypatch):
    """The payloads are refused by distill's own reader; real weights in the real layout, saved by torch.save or
    as safetensors, give torch-fidelity's inception identical features."""
    monkeypatch.chdir(tmp_path)
    for name, path in _payloads(tmp_path).items():
        if name != "named.bin":  # torch.load reads a .safetensors name with safetensors, which fails on a pickle
            with pytest.raises(DistillError, match="is neither" if name == "named.safetensors" else "never runs it"):
                metrics.read_weights(path)
    assert not (tmp_path / MARKER).exists()
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    # random weights in the real layout: built with torch-fidelity's own class, its download bypassed
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(state, tmp_path / "inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    a = metrics.features(images, "inception-v3-compat", str(tmp_path / "inception.pth"))
    b = metrics.features(images, "inception-v3-compat", str(tmp_path / "inception.safetensors"))
    assert a.shape == (3, 2048) and torch.equal(a, b) and a.std() > 0
    del state[next(iter(state))]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "short.safetensors")
    with pytest.raises(DistillError, match="does not fit the extractor 'inception-v3-compat'"):
        metrics.check_extractor("inception-v3-compat", str(tmp_path / "short.safetensors"))


# ---- checkpoints: what distill wrote, and nothing else --------------------------------------------------------
def _gmm(tmp_path: Path, name: str = "run", **train) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**GMM, "train": {**GMM["train"], "output_dir": str(tmp_path / name), **train}}))
    return cfg


def test_pruning_keeps_a_users_folder_and_orders_by_step(tmp_path):
    cfg = _gmm(tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=2)
    assert cli.main(["train", str(cfg)]) == 0
    ckpts = tmp_path / "run/checkpoints"
    (ckpts / "step-best").mkdir()
    (ckpts / "step-best/mine.txt").write_text("the user's pick")  # sorted by name, it came after every step
    assert cli.main(["train", str(cfg), "train.max_steps=4", "--resume", "latest"]) == 0
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000003", "step-00000004", "step-best"]
    assert (ckpts / "step-best/mine.txt").read_text() == "the user's pick"


@pytest.mark.parametrize("damage,why", [
    ("list", "manifest.json is not a map"), ("empty", "manifest.json does not name weights.safetensors"),
    ("lying-header", "weights.safetensors cannot be read"), ("latest-escapes", "which is not a checkpoint of this run")])
def test_a_damaged_checkpoint_is_skipped_or_refused_in_one_line(tmp_path, capsys, damage, why):
    cfg = _gmm(tmp_path, checkpoint_every=1)
    assert cli.main(["train", str(cfg)]) == 0
    capsys.readouterr()
    ckpts = tmp_path / "run/checkpoints"
    last = ckpts / "step-00000002"
    if damage == "list":
        (last / "manifest.json").write_text("[1, 2]")
    elif damage == "empty":
        (last / "manifest.json").write_text("{}")
        (last / "weights.safetensors").write_bytes((last / "weights.safetensors").read_bytes()[:40])
    elif damage == "lying-header":  # the header claims twice the bytes of its first tensor; sizes and sha256 agree
        raw = (last / "weights.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["shape"] = [2 * s for s in header[first]["shape"]]
        text = json.dumps(header).encode().ljust(n)
        (last / "weights.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        manifest = json.loads((last / "manifest.json").read_text())
        manifest["weights.safetensors"] = {"bytes": (last / "weights.safetensors").stat().st_size,
                                           "sha256": checkpoint._sha256(last / "weights.safetensors")}
        (last / "manifest.json").write_text(json.dumps(manifest))
    else:
        (ckpts / "latest").write_text("../../other/checkpoints/step-00000002")
    code = cli.main(["train", str(cfg), "train.max_steps=3", "--resume", "latest"])
    err = capsys.readouterr().err
    if damage == "latest-escapes":
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
    else:  # the previous intact checkpoint carries the run on
        assert code == 0 and f"skipping checkpoint {last}: {why}" in err, err
        assert (ckpts / "latest").read_text() == "step-00000003"


def test_a_run_whose_every_step_was_skipped_is_not_saved(tmp_path, capsys, monkeypatch):
    from distill.methods.base import LossOut, Method

    def nan_loss(self, batch, turn):
        return LossOut(torch.tensor(float("nan"), requires_grad=True), {})

    monkeypatch.setattr(Method, "forward", nan_loss)
    cfg = _gmm(tmp_path, max_steps=2, max_nonfinite_steps=10)
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "every step from 1 to 2 was skipped" in err and not (tmp_path / "run/student").exists(), err


def test_a_launch_asking_for_deepspeed_without_it_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate")
    if __import__("importlib").util.find_spec("deepspeed"):
        pytest.skip("DeepSpeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cli.main(["train", str(_gmm(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a package that is not installed: DeepSpeed" in err, err
    assert not (tmp_path / "run").exists()


def test_restart_twice_in_one_second_keeps_both_old_runs(tmp_path):
    cfg = _gmm(tmp_path)
    for _ in range(3):
        assert cli.main(["train", str(cfg), "--restart"]) == 0
    assert len(list(tmp_path.glob("run.old-*"))) == 2


# ---- exports: the teacher, a user's folder, and a replacement that is never half done ----------------------
def test_export_never_deletes_the_runs_teacher_and_replaces_the_old_export_only_when_the_new_is_in(
        tmp_path, tiny_sdxl_dir, capsys, monkeypatch):
    teacher = tmp_path / "exports/teacher"
    shutil.copytree(tiny_sdxl_dir, teacher)
    (teacher / "distill_export.json").write_text("{}")  # an earlier merged export, now the teacher of this run
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"source": str(teacher), "resolution": 32},
                                   "student": {"kind": "lora", "lora_rank": 2}, "method": {"name": "consistency"},
                                   "data": {"kind": "digits", "batch_size": 2},
                                   "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    assert cli.main(["train", str(cfg)]) == 0
    before = tree_digest(teacher)
    for to in (teacher, tmp_path / "exports"):
        assert cli.main(["export", str(tmp_path / "run"), "--to", str(to), "--overwrite", "--format", "lora"]) == 2
        assert "holds the teacher of the run being exported" in capsys.readouterr().err
    assert tree_digest(teacher) == before
    # a user's folder named like the old scratch folder is not touched
    (tmp_path / ".out.tmp").mkdir()
    (tmp_path / ".out.tmp/mine.txt").write_text("mine")
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(out), "--format", "lora"]) == 0
    assert (tmp_path / ".out.tmp/mine.txt").read_text() == "mine"
    # killed after the new export was written, as it is renamed in, where the system cannot swap two folders in one
    # step: the old export is back under its name
    old = tree_digest(out)
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    monkeypatch.setattr(paths.os, "replace", killed)
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(out), "--format", "lora", "--overwrite"]) == 130
    monkeypatch.undo()
    assert tree_digest(out) == old and [p.name for p in tmp_path.glob(".out.*")] == [".out.tmp"]
    # with the swap: the new export is in, nothing else is left
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(out), "--format", "kohya", "--overwrite"]) == 0
    assert (out / "lora_kohya.safetensors").is_file() and [p.name for p in tmp_path.glob(".out.*")] == [".out.tmp"]


# ---- one writer at a time ------------------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_train_and_a_second_export(tmp_path, capsys):
    cfg = _gmm(tmp_path)
    with paths.lock(tmp_path / "run", "train.output_dir"):
        assert cli.main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is in use by another distill process" in err, err
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.lock"))
    assert cli.main(["train", str(cfg)]) == 0
    with paths.lock(tmp_path / "to", "--to"):
        assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "to")]) == 2
        assert "is in use by another distill process" in capsys.readouterr().err
    assert not (tmp_path / "to").exists()


def test_two_trains_started_together_into_one_folder_one_proceeds(tmp_path):
    cfg = _gmm(tmp_path, max_steps=20)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "distill", "train", str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2).strip()
    assert len(err.splitlines()) == 1 and ("is in use by another distill process" in err
                                           or "already holds a run" in err), err
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's metrics, none interleaved


# ---- prompts -----------------------------------------------------------------------------------------------
def test_a_prompt_line_is_split_at_line_feeds_only(tmp_path):
    (tmp_path / "p.txt").write_text("a 1\u2028still the first\fand more\r\nsecond\n", newline="")
    assert data.read_prompts(tmp_path / "p.txt") == ["a 1\u2028still the first\fand more", "second"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x\u2028y"}, ensure_ascii=False) + "\n")
    assert data.read_prompts(tmp_path / "p.jsonl") == ["x\u2028y"]


def test_a_full_disk_keeps_what_was_there(tmp_path):
    """A file-size limit stands in for a full disk: the write fails with EFBIG, reported in one line."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            f"from distill import cli; sys.exit(cli.main(['cache', {str(_gmm(tmp_path))!r}, '--out', "
            f"{str(tmp_path / 'c.safetensors')!r}]))")
    cfg = yaml.safe_load((tmp_path / "run.yaml").read_text())
    cfg["data"]["size"] = 4096
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    before = tree_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "could not be written (File too large)" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and tree_digest(tmp_path) == before
