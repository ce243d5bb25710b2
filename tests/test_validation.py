"""Validation while training (distill/validation.py) through the real trainer on the built-in digits teacher: grids
and validate/* records at the right steps, tensorboard and wandb logs holding the images, weights bit-identical
with and without validation and across a resume, and `distill curves` in a subprocess."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from distill import runs, validation
from distill.errors import ConfigError, DistillError
from distill.trainer import train

TRACKERS = [t for t in ("tensorboard", "wandb") if importlib.util.find_spec(t)]
GRID = (2 + 10 * (16 + 2), 2 + 16 + 2)  # ten 16 px digits in one row, torchvision's 2 px padding: (width, height)


def digits_cfg(out, **over):
    raw = {"teacher": {"source": "builtin:digits-sdxl", "resolution": 16},
           "student": {"kind": "lora", "lora_rank": 4},
           "method": {"name": "consistency"},
           "data": {"kind": "digits", "batch_size": 2},
           "train": {"output_dir": str(out), "max_steps": 4, "learning_rate": 1e-3, "checkpoint_every": 2,
                     "log_every": 1}}
    return runs.parse_config(raw, [f"{k}={v}" for k, v in over.items()])


VALIDATE = {"train.validate_every": 2, "train.validate_samples": 10, "train.validate_steps": "[1]"}  # the cheapest


def records(run):
    return validation.read_records(run)


def last_checkpoint(run):
    folder = run / "checkpoints" / "step-00000004"
    return {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}


def assert_same_weights(a, b):
    wa, wb = last_checkpoint(a), last_checkpoint(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        assert all(torch.equal(wa[name][k], wb[name][k]) for k in wa[name]), name


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """One run validating every 2 of 4 steps, logged to every installed tracker (wandb offline, in tmp)."""
    tmp = tmp_path_factory.mktemp("validated")
    if "wandb" in TRACKERS:  # wandb keeps the settings of its first run in this process (WANDB_DIR included)
        import wandb

        wandb.teardown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        method = train(digits_cfg(tmp / "run", **VALIDATE, **{"train.trackers": json.dumps(TRACKERS)}))
    return tmp, method


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    train(digits_cfg(tmp / "run"))
    return tmp / "run"


def test_grids_and_records_at_the_validation_steps(validated):
    run = validated[0] / "run"
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-00000002-1steps.png",
                                                                    "step-00000004-1steps.png"]
    for png in (run / "validation").iterdir():
        with Image.open(png) as img:
            assert img.size == GRID
    rows = records(run)
    assert [(r["step"], r["validate/steps"]) for r in rows] == [(2, 1), (4, 1)]
    for r in rows:
        assert r["validate/samples"] == 10 and r["validate/grid"] == f"validation/step-{r['step']:08d}-1steps.png"
        assert 0 <= r["validate/fid_lo"] <= r["validate/fid"] <= r["validate/fid_hi"]
        assert 0 <= r["validate/adherence_lo"] <= r["validate/adherence"] <= r["validate/adherence_hi"] <= 1
        assert r["validate/kid_std"] >= 0
    # the scores are of the student as it was at each step: it trained in between, so its samples changed
    assert rows[0]["validate/fid"] != rows[1]["validate/fid"]


def test_tensorboard_holds_the_grids_and_scores(validated):
    if "tensorboard" not in TRACKERS:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, scalars = {}, {}
    for events in (validated[0] / "run" / "logs").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(acc.Images(tag))
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    grids = images["validate/1steps/grid"]
    assert sorted(e.step for e in grids) == [2, 4] and all((e.width, e.height) == GRID for e in grids)
    assert sorted(e.step for e in scalars["validate/1steps/fid"]) == [2, 4]
    assert sorted(e.step for e in scalars["validate/1steps/adherence"]) == [2, 4]


def test_wandb_offline_holds_the_grids(validated):
    if "wandb" not in TRACKERS:
        pytest.skip("wandb is not installed")
    pngs = sorted((validated[0] / "wandb").glob("offline-run-*/files/media/images/validate/1steps/grid_*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as img:
            assert img.size == GRID


def test_validation_changes_no_weight(validated, plain):
    assert_same_weights(validated[0] / "run", plain)
    assert not (plain / "validation").exists() and records(plain) == []


def test_validation_leaves_rng_and_modes_as_they_were(validated, tmp_path):
    """Scoring reads images through a DataLoader, which draws from the global generator; validation must not."""
    method = validated[1]
    cfg = digits_cfg(tmp_path / "again", **VALIDATE)
    p = validation.plan(cfg, method, None, tmp_path / "again")
    (tmp_path / "again").mkdir()
    method.train()
    method.student.backbone.eval()  # a mixed state, to be put back as it was
    modes = [m.training for m in method.modules()]
    torch.manual_seed(123)
    np.random.seed(123)
    before, before_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    assert len(validation.validate(p, method, Accelerator(cpu=True), 2)) == 1
    assert torch.equal(torch.get_rng_state(), before) and np.array_equal(np.random.get_state()[1], before_np)
    assert [m.training for m in method.modules()] == modes
    # without set_apart the same scoring moves the global generator: the check above has something to catch
    validation.measure(p, method, 2, 1)
    assert not torch.equal(torch.get_rng_state(), before)
    assert validation.validate(p, method, Accelerator(cpu=True), 2) == []  # a step already recorded: not again


def test_resume_matches_and_validates_each_step_once(validated, tmp_path):
    cfg = digits_cfg(tmp_path / "split", **VALIDATE)
    train(cfg, stop_after=2)
    assert [r["step"] for r in records(tmp_path / "split")] == [2]
    train(cfg, resume="latest")
    assert [r["step"] for r in records(tmp_path / "split")] == [2, 4]
    assert_same_weights(validated[0] / "run", tmp_path / "split")
    # a run resumed from before a recorded validation (a crash that lost the later checkpoints) does not repeat it
    assert validation.plan(cfg, validated[1], None, tmp_path / "split").recorded == {2, 4}


def test_curves_command_plots_a_validated_run(validated, plain, cli):
    run = validated[0] / "run"
    proc = cli("curves", run)
    with Image.open(run / "curves.png") as img:
        assert img.info.get("Software") == validation.CURVES_MARK and img.size[0] > 300
    rows = [line.split() for line in proc.stdout.splitlines()[1:-1]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(2, 1), (4, 1)]
    assert proc.stdout.splitlines()[-1] == f"wrote {run / 'curves.png'}"
    bad = cli("curves", plain, check=False)
    assert bad.returncode == 2 and "holds no validation records" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (plain / "curves.png").exists()
    assert validation.curves(run)[0] == run / "curves.png"  # its own plot it replaces
    mine = plain / "mine.png"  # an image distill did not write never
    Image.new("RGB", (4, 4)).save(mine)
    with pytest.raises(DistillError, match="did not write it"):
        validation.curves(run, mine)
    assert Image.open(mine).size == (4, 4)


@pytest.mark.parametrize("over,field,says", [
    ({"train.validate_every": -1}, "train.validate_every", "must be >= 0"),
    ({"train.validate_every": 2, "train.validate_steps": "[]"}, "train.validate_steps", "at least one"),
    ({"train.validate_every": 2, "train.validate_steps": "[0]"}, "train.validate_steps", "in [1, 1000]"),
    ({"train.validate_every": 2, "train.validate_samples": 1}, "train.validate_samples", "FID needs 2"),
    ({"train.validate_every": 2, "teacher.source": "builtin:gmm-vp", "data.kind": "teacher"},
     "train.validate_every", "2-D points"),
])
def test_bad_validation_fields_are_refused_in_one_line(tmp_path, over, field, says):
    with pytest.raises(ConfigError) as e:
        digits_cfg(tmp_path / "run", **over)
    assert e.value.field == field and says in str(e.value) and "\n" not in str(e.value)


def test_a_step_count_the_student_cannot_sample_is_refused_before_training(tmp_path):
    cfg = digits_cfg(tmp_path / "run", **{**VALIDATE, "train.validate_steps": "[4, 51]"})  # a 50-point grid
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert e.value.field == "train.validate_steps" and e.value.value == 51 and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_validation_does_not_change_the_recipe_hash(tmp_path):
    assert digits_cfg(tmp_path, **VALIDATE).hash() == digits_cfg(tmp_path).hash()
