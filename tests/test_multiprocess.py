"""Two CPU processes over gloo under `accelerate launch`: the ranks read different shards, start and end with
identical weights (LoRA and discriminator heads), and match one process accumulating the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_buckets import SIZES, mixed_folder

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
CONFIGS = Path(__file__).parents[1] / "experiments" / "accelerate"


def _run(args, timeout=600):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# LADD: heads on the teacher (slow-marked); DMD2: heads on the fake score, an adapter beside the student's; rCM:
# the JVP of sCM, its adaptive weight, and DMD's term (from step 2, after a one-step warm-up) with the fake adapter
PARTS = {"ladd": ("student.", "discriminator."), "dmd2": ("student.", "discriminator.", "fake."),
         "rcm": ("student.", "weighting.", "fake.")}


@pytest.mark.parametrize("method,bucketed", [pytest.param("ladd", False, marks=pytest.mark.slow), ("dmd2", False),
                                             ("rcm", False), ("dmd2", True)],
                         ids=["ladd", "dmd2", "rcm", "dmd2-buckets"])
def test_two_process_training_matches_one_process_with_the_same_global_batch(tmp_path, tiny_sdxl_dir, method,
                                                                             bucketed):
    cfg = tmp_path / "run.yaml"
    params = {"student_steps": 2} | ({"warmup": 1} if method == "rcm" else {})
    digits = {"kind": "digits", "batch_size": 2}
    # three buckets of four images: the three steps' global batches are one bucket each
    images = {"kind": "images", "path": str(mixed_folder(tmp_path / "imgs")), "batch_size": 2, "buckets": SIZES}
    cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 16 if bucketed else 32},
        "student": {"kind": "lora", "lora_rank": 4},
        "method": {"name": method, "params": params}, "data": images if bucketed else digits,
        "train": {"max_steps": 3, "learning_rate": 1e-3, "checkpoint_every": 3, "output_dir": str(tmp_path / "x")}
        | ({"turn_every": {"student": 1}} if method == "rcm" else {})}))
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    _run([*launch, str(WORKER), str(cfg), str(two), f"train.output_dir={two}/run"])
    _run([sys.executable, str(WORKER), str(cfg), str(one), f"train.output_dir={one}/run",
          "train.gradient_accumulation_steps=2"])

    init = [load_file(two / f"init-{r}.safetensors") for r in (0, 1)]
    final = [load_file(two / f"final-{r}.safetensors") for r in (0, 1)]
    single = load_file(one / "final-0.safetensors")
    assert all(any(k.startswith(part) for k in init[0]) for part in PARTS[method])
    for k in init[0]:
        assert torch.equal(init[0][k], init[1][k]), k  # heads and adapters identical at step 0
        assert torch.equal(final[0][k], final[1][k]), k  # and after training
        assert torch.allclose(final[0][k], single[k], atol=1e-5, rtol=1e-4), (k, (final[0][k] - single[k]).abs().max())
    for part in PARTS[method]:
        assert any(not torch.equal(init[0][k], final[0][k]) for k in init[0] if k.startswith(part)), part

    seen = [json.loads((two / f"seen-{r}.json").read_text()) for r in (0, 1)]
    seen_one = json.loads((one / "seen-0.json").read_text())
    steps = 3
    for s in range(steps):
        assert not set(seen[0][s]) & set(seen[1][s])  # different shards
        assert seen[0][s] + seen[1][s] == seen_one[2 * s] + seen_one[2 * s + 1]  # one global batch


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: load_config_from_file(str(p)).distributed_type for p in sorted(CONFIGS.glob("*.yaml"))}
    assert {k: str(v).split(".")[-1] for k, v in kinds.items()} == {
        "cpu_2proc": "MULTI_GPU", "ddp_8gpu": "MULTI_GPU", "deepspeed_zero2_8gpu": "DEEPSPEED",
        "single_gpu": "NO"}


def _each_rank_holds_half(sharded: Path, modules: set[str]) -> None:
    """The worker's record under train.fsdp: every module named is sharded (DTensor parameters), and each of the
    2 ranks holds about half of it."""
    for rank in (0, 1):
        held = json.loads((sharded / f"shards-{rank}.json").read_text())
        assert set(held) == modules
        for module, sizes in held.items():
            assert sizes and sum(mine for mine, _ in sizes) <= 0.55 * sum(whole for _, whole in sizes), module


def test_fsdp_shards_a_full_student_saves_what_one_process_saves_and_resumes_bit_identically(tmp_path, tiny_sdxl_dir):
    """LADD with a full student (two turns, heads; no EMA) under train.fsdp on 2 processes: each rank holds half of
    every sharded module; the checkpoints and student/ hold whole weights that equal a 1-process run with the
    same global batch; plain diffusers loads student/; a run stopped and resumed ends bit-identical."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "full"},
        "method": {"name": "ladd", "params": {"student_steps": 2}}, "data": {"kind": "digits", "batch_size": 2},
        "train": {"max_steps": 4, "learning_rate": 1e-4, "checkpoint_every": 2, "fsdp": True, "log_every": 1,
                  "output_dir": str(tmp_path / "x")}}))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    sharded, resumed, one = tmp_path / "sharded", tmp_path / "resumed", tmp_path / "one"
    _run([*launch, str(WORKER), str(cfg), str(sharded), f"train.output_dir={sharded}/run"])
    train = [*launch, "-m", "distill", "train", str(cfg), f"train.output_dir={resumed}"]
    _run([*train, "--stop-after-steps", "2"])
    _run([*train, "--resume", "latest"])
    _run([sys.executable, "-m", "distill", "train", str(cfg), f"train.output_dir={one}", "train.fsdp=false",
          "train.gradient_accumulation_steps=2"])

    _each_rank_holds_half(sharded, {"student", "discriminator"})
    # the same gradients every step, in both turns (a turn's no-grad pass must not freeze the next turn's)
    norms = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in
             (sharded / "run", one)]
    for turn in ("discriminator", "student"):
        for x, y in zip(*norms):
            assert x[f"{turn}/grad_norm"] == pytest.approx(y[f"{turn}/grad_norm"], rel=1e-4), (turn, x["step"])
    ckpt = lambda run, f="weights": load_file(run / "checkpoints" / "step-00000004" / f"{f}.safetensors")  # noqa: E731
    a, b, c = ckpt(sharded / "run"), ckpt(resumed), ckpt(one)
    assert set(a) == set(c) and {k.split(".")[0] + k.split(".")[1] for k in a} >= {"studentbackbone"}
    assert any(k.startswith("discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # stopped at step 2 and resumed: bit-identical
        # Adam turns a gradient at rounding level into a step of up to lr: allow half of one (1e-4 / 2)
        assert torch.allclose(a[k], c[k], atol=5e-5, rtol=1e-4), (k, (a[k] - c[k]).abs().max())
    for turn in ("student", "discriminator"):  # optimiser state too, whole
        sa, sb, sc = (ckpt(r, f"optim-{turn}") for r in (sharded / "run", resumed, one))
        assert all(torch.equal(sa[k], sb[k]) and sa[k].shape == sc[k].shape for k in sa)
    init = load_file(resumed / "checkpoints" / "step-00000002" / "weights.safetensors")
    assert any(not torch.equal(init[k], a[k]) for k in a if k.startswith("student.backbone."))

    from diffusers import DiffusionPipeline  # plain diffusers, from the saved folder alone
    unet = DiffusionPipeline.from_pretrained(sharded / "run" / "student").unet
    assert type(unet).__name__ == "UNet2DConditionModel"
    for k, v in unet.state_dict().items():
        assert torch.equal(v, a[f"student.backbone.{k}"]), k


# consistency: the one full student with an EMA (its target network), sharded like the backbone and updated from
# the local shards; DMD2: three sharded modules (student, fake-score copy, heads) over two turns. Adam turns a
# rounding-level gradient into a step of up to lr, and DMD2's heads see such gradients: its weights get 2 x lr.
@pytest.mark.parametrize("method, modules, atol", [
    ({"name": "consistency"}, {"student", "ema"}, 5e-5),
    ({"name": "dmd2", "params": {"student_steps": 2}}, {"student", "discriminator", "fake"}, 2e-4),
], ids=["consistency", "dmd2"])
def test_fsdp_shards_every_module_a_method_keeps_and_saves_them_whole(tmp_path, tiny_sdxl_dir, method, modules, atol):
    """Under train.fsdp on 2 processes each rank holds half of every module the method keeps; the step-2 checkpoint
    holds them whole, equal to a 1-process run with the same global batch, with the same gradient norms."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"source": str(tiny_sdxl_dir), "resolution": 32}, "student": {"kind": "full", "ema_decay": 0.5},
        "method": method, "data": {"kind": "digits", "batch_size": 2},
        "train": {"max_steps": 2, "learning_rate": 1e-4, "checkpoint_every": 2, "fsdp": True, "log_every": 1,
                  "output_dir": str(tmp_path / "x"),
                  "turn_every": {"student": 1} if method["name"] == "dmd2" else {}}}))  # both turns at both steps
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    _run([*launch, str(WORKER), str(cfg), str(sharded), f"train.output_dir={sharded}/run"])
    _run([sys.executable, "-m", "distill", "train", str(cfg), f"train.output_dir={one}", "train.fsdp=false",
          "train.gradient_accumulation_steps=2"])

    _each_rank_holds_half(sharded, modules)
    norms = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in
             (sharded / "run", one)]
    for x, y in zip(*norms):
        for k in (k for k in x if k.endswith("grad_norm")):
            assert x[k] == pytest.approx(y[k], rel=1e-4), (k, x["step"])
    a, c = (load_file(run / "checkpoints" / "step-00000002" / "weights.safetensors") for run in (sharded / "run", one))
    assert set(a) == set(c) and {k.split(".")[0] for k in a} == {"student"} | modules - {"ema", "student"}
    for k in a:
        assert torch.allclose(a[k], c[k], atol=atol, rtol=1e-4), (k, (a[k] - c[k]).abs().max())
    ema = sorted(k for k in a if k.startswith("student.ema."))
    assert len(ema) == ("ema" in modules) * len([k for k in a if k.startswith("student.backbone.")])
    # decay 0.5 over two updates: the EMA is neither the backbone nor where it started
    assert not ema or any(not torch.equal(a[k], a[k.replace(".ema.", ".backbone.")]) for k in ema)
