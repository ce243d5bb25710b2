"""Bad input fails before any model loads: one line naming field, value and what is allowed; exit code 2."""
from pathlib import Path

import pytest
import yaml

from distill import cli, runs

GOOD = {"teacher": {"source": "builtin:gmm-vp"}, "data": {"kind": "teacher", "batch_size": 8},
        "train": {"max_steps": 2}}

CASES = [
    ({"train": {"max_steps": "many"}}, "'train.max_steps' has bad value 'many': expected int"),
    ({"train": {"max_step": 3}}, "unknown field; did you mean 'train.max_steps'?"),
    ({"method": {"name": "consistancy"}}, "allowed: denoise, consistency, guidance, progressive, add, ladd, dmd2, scm, rcm (did you mean 'consistency'?)"),
    ({"teacher": {"family": "sd15"}}, "'teacher.family' has bad value 'sd15': allowed: sdxl, sd3, flux, gmm"),
    ({"teacher": {"source": "./no/such/folder"}}, "'teacher.source' has bad value './no/such/folder': no such file"),
    ({"data": {"kind": "images", "path": "/no/such/images"}}, "'data.path' has bad value '/no/such/images'"),
    ({"student": {"lora_rank": 0}}, "'student.lora_rank' has bad value 0: must be a positive integer"),
    ({"data": {"batch_size": 0}}, "'data.batch_size' has bad value 0: must be a positive integer"),
    ({"student": {"ema_decay": 1.5}}, "'student.ema_decay' has bad value 1.5: must be in [0, 1)"),
    ({"method": {"params": {"skip": 80}}}, "'method.params.skip' has bad value 80: must be in [1, 49]"),
    ({"method": {"params": {"loss": "l1"}}}, "allowed: l2, huber"),
    ({"method": {"params": {"guidanse_min": 2}}}, "did you mean 'method.params.guidance_min'?"),
    ({"train": {"mixed_precision": "fp8"}}, "allowed: no, fp16, bf16"),
    ({"student": {"kind": "lora", "guidance_embedding": True}}, "needs student.kind=full"),
    ({"method": {"name": "progressive", "params": {"start_steps": 4, "guidance_min": 2, "guidance_max": 6}},
      "student": {"kind": "full"}}, "a range of w needs a student that reads w"),
    ({"method": {"name": "dmd2"}, "student": {"kind": "full", "guidance_embedding": True}},
     "dmd2 trains the student without a w input"),
]


def _merge(a, b):
    out = {**a}
    for k, v in b.items():
        out[k] = _merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


@pytest.mark.parametrize("bad,message", CASES)
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, bad, message):
    cfg = tmp_path / "bad.yaml"
    out_dir = tmp_path / "run"
    cfg.write_text(yaml.safe_dump(_merge(_merge(GOOD, {"train": {"output_dir": str(out_dir)}}), bad)))
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out_dir.exists()  # nothing written for a run that never started


def test_override_errors_and_missing_config(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump(GOOD))
    assert cli.main(["train", str(cfg), "train.max_steps"]) == 2
    assert "overrides look like section.field=value" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "train.learning_rate=-1"]) == 2
    assert "'train.learning_rate' has bad value -1.0: must be a number in (0, 3.4e+38]" in capsys.readouterr().err


def test_subprocess_shows_no_traceback_unless_debug(tmp_path, cli):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_merge(GOOD, {"teacher": {"source": "builtin:tiny-sd15"}})))
    proc = cli("train", cfg, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "allowed builtins: builtin:digits-sdxl, builtin:digits-sd3, builtin:digits-flux," in proc.stderr and "Traceback" not in proc.stderr
    debug = cli("--debug", "train", cfg, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_unreachable_hub_teacher_through_the_cli(tmp_path, cli):
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"source": "someone/not-a-model"},
                                   "train": {"output_dir": str(tmp_path / "run")}}))
    proc = cli("train", cfg, check=False)
    assert proc.returncode == 2 and "could not fetch teacher 'someone/not-a-model'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["make-teacher"], ["cache"]])
def test_help_on_every_command(cli, command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0 and "usage: distill" in proc.stdout


EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(p for p in EXPERIMENTS.glob("*.yaml") if not p.name.startswith("bench_")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    if not Path(raw["teacher"]["source"]).exists() and not raw["teacher"]["source"].startswith("builtin:"):
        raw["teacher"]["source"] = "builtin:tiny-sdxl"  # real-weight configs: check everything but the paths
    if raw["student"].get("init_from"):
        raw["student"]["init_from"] = str(path.parent)
    cfg = runs.parse_config(raw, for_training=False)
    from distill.methods import METHODS

    assert cfg.method.name in METHODS


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("bench_*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_matrix_is_valid(path, monkeypatch):
    from distill.bench import load_matrix

    monkeypatch.chdir(EXPERIMENTS.parent)  # matrices name configs relative to the repository
    matrix, configs = load_matrix(path)
    assert matrix.teachers and len(configs) == len(matrix.runs)


def test_turn_settings_must_name_the_methods_turns(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_merge(GOOD, {"train": {"turn_every": {"discriminator": 2}}})))
    assert cli.main(["train", str(cfg)]) == 2
    assert "has bad value 'discriminator': method consistency has turns student" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "method.name=ladd", "train.turn_every={discriminator: 0}"]) == 2
    assert "'train.turn_every.discriminator' has bad value 0" in capsys.readouterr().err
