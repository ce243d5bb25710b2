"""Every numeric param of every method is range-checked (issue #28): NaN, inf and values that train silently wrong
are refused in one line naming the field, exit 2, no run folder. And the method fixes of the same round: teacher
passes in eval mode, LADD's teacher samples drawn once per step, DMD2's default turn ratio, fake-score times,
adapter scale and checkpointing."""
import dataclasses
import json
import math
import typing

import pytest
import torch
import yaml
from peft.tuners.tuners_utils import BaseTunerLayer

from distill import cli, runs
from distill.errors import ConfigError
from distill.methods import METHODS, base
from distill.methods import ladd as ladd_module
from distill.trainer import train

GMM = {"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
       "method": {"params": {"guidance_min": 1.0, "guidance_max": 1.0}},
       "data": {"kind": "teacher", "batch_size": 8, "size": 64}, "train": {"max_steps": 2}}


def m(name: str, params: str, *more: str) -> list[str]:
    return [f"method.name={name}", f"method.params={params}", *more]


# (overrides, the field the one error line must name, and what else it must say)
CASES = [
    # consistency (the default method): the cases, then every other numeric param
    (["method.params.sigma_data=0"], "method.params.sigma_data", "must be a finite number > 0"),
    (["method.params.sigma_data=-0.5"], "method.params.sigma_data", "> 0"),
    (["method.params.sigma_data=.nan"], "method.params.sigma_data", "bad value nan"),
    (["method.params.sigma_data=.inf"], "method.params.sigma_data", "bad value inf"),
    (["method.params.num_teacher_steps=1001"], "method.params.num_teacher_steps", "in [2, 1000]"),
    (["method.params.num_teacher_steps=1"], "method.params.num_teacher_steps", "in [2, 1000]"),
    (["method.params.skip=0"], "method.params.skip", ">= 1"),
    (["method.params.guidance_max=.inf"], "method.params.guidance_max", "must be a finite number >= 1"),
    (["method.params.guidance_min=.nan"], "method.params.guidance_min", "bad value nan"),
    (["method.params.guidance_min=0.5"], "method.params.guidance_min", ">= 1"),
    (["method.params={guidance_min: 6, guidance_max: 3}"], "method.params.guidance_min",
     "<= method.params.guidance_max"),
    (["method.params.huber_c=.nan"], "method.params.huber_c", "bad value nan"),
    (["method.params.huber_c=inf"], "method.params.huber_c", "bad value inf"),
    (["method.params.huber_c=0"], "method.params.huber_c", "> 0"),
    (["method.params.timestep_scaling=0"], "method.params.timestep_scaling", "> 0"),
    (["method.params.timestep_scaling=-inf"], "method.params.timestep_scaling", "bad value -inf"),
    # progressive
    (m("progressive", "{start_steps: 1024}"), "method.params.start_steps", "in [2, 1000]"),
    (m("progressive", "{start_steps: 4, end_steps: 0}"), "method.params.end_steps", ">= 1"),
    (m("progressive", "{start_steps: 4, round_steps: 0}"), "method.params.round_steps", ">= 1"),
    (m("progressive", "{start_steps: 4, guidance_max: .inf}"), "method.params.guidance_max", "finite"),
    # guidance (its range checks come before what it needs of the student)
    (m("guidance", "{guidance_max: .nan}"), "method.params.guidance_max", "bad value nan"),
    (m("guidance", "{guidance_min: 0}"), "method.params.guidance_min", ">= 1"),
    # ADD
    (m("add", "{feature_net: mlp, head_hidden: 0}"), "method.params.head_hidden", "must be an integer >= 1"),
    (m("add", "{feature_net: mlp, teacher_guidance: 0.5}"), "method.params.teacher_guidance", ">= 1"),
    (m("add", "{feature_net: mlp, teacher_guidance: .inf}"), "method.params.teacher_guidance", "bad value inf"),
    (m("add", "{feature_net: mlp, distill_weight: .nan}"), "method.params.distill_weight", "bad value nan"),
    (m("add", "{feature_net: mlp, r1_gamma: -1}"), "method.params.r1_gamma", ">= 0"),
    (m("add", "{feature_net: mlp, feature_size: 0}"), "method.params.feature_size", "in [16, 4096]"),
    (m("add", "{feature_net: mlp, student_steps: 0}"), "method.params.student_steps", "in [1, 1000]"),
    # LADD
    (m("ladd", "{teacher_steps: 0}"), "method.params.teacher_steps", "in [1, 1000]"),
    (m("ladd", "{teacher_steps: 5000}"), "method.params.teacher_steps", "in [1, 1000]"),
    (m("ladd", "{logit_std: .nan}"), "method.params.logit_std", "bad value nan"),
    (m("ladd", "{logit_std: 0}"), "method.params.logit_std", "> 0"),
    (m("ladd", "{logit_mean: .inf}"), "method.params.logit_mean", "must be a finite number"),
    (m("ladd", "{head_hidden: 0}"), "method.params.head_hidden", ">= 1"),
    (m("ladd", "{teacher_guidance: .inf}"), "method.params.teacher_guidance", "bad value inf"),
    (m("ladd", "{distill_weight: .inf}"), "method.params.distill_weight", "bad value inf"),
    (m("ladd", "{student_steps: 1001}"), "method.params.student_steps", "in [1, 1000]"),
    # DMD2
    (m("dmd2", "{real_guidance: .nan}"), "method.params.real_guidance", "bad value nan"),
    (m("dmd2", "{real_guidance: 0.9}"), "method.params.real_guidance", ">= 1"),
    (m("dmd2", "{min_time: .nan}"), "method.params.min_time", "in [0, 1]"),
    (m("dmd2", "{max_time: 1.5}"), "method.params.max_time", "in [0, 1]"),
    (m("dmd2", "{min_time: 0.5, max_time: 0.5}"), "method.params.min_time", "< method.params.max_time"),
    (m("dmd2", "{gan_student_weight: .inf, gan_fake_weight: 1}"), "method.params.gan_student_weight", "finite"),
    (m("dmd2", "{gan_fake_weight: -1}"), "method.params.gan_fake_weight", ">= 0"),
    (m("dmd2", "{fake_rank: -1}"), "method.params.fake_rank", ">= 0"),
    (m("dmd2", "{fake_alpha: 0}", "student.kind=lora"), "method.params.fake_alpha", "> 0"),
    (m("dmd2", "{fake_alpha: .nan}", "student.kind=lora"), "method.params.fake_alpha", "bad value nan"),
    (m("dmd2", "{fake_alpha: 4}"), "method.params.fake_alpha", "this one is a full copy"),  # a full student
    (m("dmd2", "{fake_rank: 4, fake_score: copy}", "student.kind=lora"), "method.params.fake_rank", "full copy"),
    (m("dmd2", "{head_hidden: 0}"), "method.params.head_hidden", ">= 1"),
    # sCM and rCM
    (m("scm", "{tangent: backward}"), "method.params.tangent", "allowed: jvp, finite_difference"),
    (m("rcm", "{real_guidance: 3.0}"), "method.params.real_guidance", "set guidance_min = guidance_max"),
    (m("rcm", "{dmd_weight: 0}"), "method.params.dmd_weight", "> 0"),
    (m("rcm", "{}", "student.guidance_embedding=true"), "student.guidance_embedding", "rcm trains the student"),
    # denoise
    (m("denoise", "{uncond_prob: 1.0}"), "method.params.uncond_prob", "in [0, 1)"),
    (m("denoise", "{uncond_prob: .nan}"), "method.params.uncond_prob", "bad value nan"),
    # progressive: rounds that train.max_steps cannot hold (refused before the first step, once the teacher is in)
    (m("progressive", "{start_steps: 4, round_steps: 2}", "train.max_steps=3"), "train.max_steps",
     "need train.max_steps >= 4, or lower method.params.round_steps"),
    (m("progressive", "{start_steps: 64}", "train.max_steps=100"), "train.max_steps", "6 rounds of method.params"),
]


@pytest.fixture
def gmm_yaml(tmp_path):
    cfg = tmp_path / "gmm.yaml"
    cfg.write_text(yaml.safe_dump({**GMM, "train": {**GMM["train"], "output_dir": str(tmp_path / "run")}}))
    return cfg


def test_every_bad_param_is_one_line_exit_2_and_no_run_folder(gmm_yaml, tmp_path, capsys):
    failures = []
    for overrides, field, message in CASES:
        try:
            code = cli.main(["train", str(gmm_yaml), *overrides])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith(f"error: config field '{field}' has bad value")
              and message in lines[0] and "Traceback" not in err)
        if not ok or (tmp_path / "run").exists():
            made = (tmp_path / "run").exists()
            failures.append(f"{overrides} -> exit {code}, run folder made: {made}: {err.strip()[-400:]}")
    assert not failures, "\n".join(failures)


def test_every_numeric_param_of_every_method_declares_a_range():
    for name, method in METHODS.items():
        hints = typing.get_type_hints(method.Params)
        for f in dataclasses.fields(method.Params):
            kinds = {hints[f.name]} | set(typing.get_args(hints[f.name]))
            if kinds & {int, float}:
                assert "range" in f.metadata, f"{name}: method.params.{f.name} has no range (base.ranged)"
                default = f.default
                assert default is None or f.metadata["range"].allows(default), (name, f.name)  # defaults pass


def test_a_step_count_beyond_the_loaded_teachers_schedule_is_refused(tmp_path):
    """A teacher whose schedule has fewer train timesteps than the 1,000 checked before it loads."""
    from teachers.gmm import GMMTeacher

    teacher = GMMTeacher("vp")
    teacher.num_train_timesteps = 100
    for name, params, field in [("consistency", {"num_teacher_steps": 200}, "num_teacher_steps"),
                                ("progressive", {"start_steps": 128}, "start_steps"),
                                ("ladd", {"teacher_steps": 101}, "teacher_steps")]:
        cfg = runs.parse_config({**GMM, "method": {"name": name, "params": params},
                                 "train": {"output_dir": str(tmp_path / "run"), "max_steps": 10_000}})
        with pytest.raises(ConfigError, match=rf"'method.params.{field}' .* the teacher has 100 train timesteps"):
            runs.build_method(cfg, "cpu", teacher=teacher)


# --- finding 7: with a LoRA student, teacher passes run the shared backbone in eval mode -------------------------
def modes_seen(backbone, run) -> dict[str, bool]:
    """{module name: .training} for every module of `backbone` that ran inside run()."""
    seen, hooks = {}, []

    def hook(name):
        def record(module, args):
            seen.setdefault(name, module.training)
        return record

    for name, module in backbone.named_modules():
        hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_teacher_passes_stay_in_eval_mode_beside_a_lora_student(tmp_path):
    cfg = runs.parse_config({**GMM, "student": {"kind": "lora", "lora_rank": 4}, "method": {"name": "consistency"},
                             "train": {"output_dir": str(tmp_path / "run")}})
    method = runs.build_method(cfg, "cpu")
    method.train()
    backbone, teacher = method.student.backbone, method.teacher
    assert backbone is teacher.backbone
    x, cond = teacher.probe()
    seen = modes_seen(backbone, lambda: teacher.predict(x, 500, cond, guidance=3.0))
    assert seen and not any(seen.values()), [k for k, v in seen.items() if v]
    student = modes_seen(backbone, lambda: teacher.predict(x, 500, cond, backbone=backbone))
    adapters = {k: v for k, v in student.items() if ".lora_A." in k}
    assert adapters and all(adapters.values())  # the adapters' own modules train
    assert not any(v for k, v in student.items() if "lora_" not in k)  # the frozen base does not
    assert not any(isinstance(mod, BaseTunerLayer) and mod.training for mod in backbone.modules())
    method.eval()
    assert not any(modes_seen(backbone, lambda: teacher.predict(x, 500, cond, backbone=backbone)).values())


def test_a_progressive_round_teacher_stays_in_eval_mode(tmp_path):
    cfg = runs.parse_config({**GMM, "method": {"name": "progressive", "params": {"start_steps": 4, "round_steps": 1}},
                             "train": {"output_dir": str(tmp_path / "run")}})
    method = runs.build_method(cfg, "cpu").train()
    assert method.student.backbone.training and not method.round_backbone.training


# --- finding 8: LADD with real: teacher samples the teacher once per step, not once per turn ----------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ladd_draws_the_teachers_samples_once_per_step(tmp_path, monkeypatch, accumulate):
    calls = []
    sample = ladd_module.ddim_sample

    def counted(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    monkeypatch.setattr(ladd_module, "ddim_sample", counted)
    raw = {**GMM, "method": {"name": "ladd", "params": {"student_steps": 2, "real": "teacher", "teacher_steps": 4}},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "gradient_accumulation_steps": accumulate,
                     "log_every": 1}}
    method = train(runs.parse_config(raw))
    assert len(calls) == 2 * accumulate  # one per step and micro-batch, shared by both turns (was two per step)
    assert not method.step_samples.samples  # forgotten at the step's end
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["discriminator/loss"]) and math.isfinite(r["student/loss"]) for r in rows)


def test_ladd_step_samples_are_reused_by_the_other_turn_and_then_forgotten():
    samples, drawn = ladd_module.StepSamples(), []

    def draw():
        drawn.append(torch.randn(1))
        return drawn[-1]

    for step in range(3):  # no step_done between steps, as a caller outside the trainer may do
        a0, a1 = samples.get("discriminator", ("p0",), draw), samples.get("discriminator", ("p1",), draw)
        assert samples.get("student", ("p0",), draw) is a0 and samples.get("student", ("p1",), draw) is a1
        assert len(samples.samples) == 2
    assert len(drawn) == 6
    assert samples.get("discriminator", ("p0",), draw) is drawn[-1] and len(samples.samples) == 1  # a new step
    assert samples.get("student", ("other",), draw) is drawn[-1] and len(drawn) == 8  # prompts differ: drawn anew


# --- finding 9: DMD2 takes five fake-score updates per generator update unless told otherwise --------------------
def test_dmd2_defaults_to_five_fake_updates_per_generator_update(tmp_path):
    raw = {**GMM, "method": {"name": "dmd2", "params": {"student_steps": 1}},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "log_every": 1}}
    cfg = runs.parse_config(raw)
    assert cfg.train.turn_every == {"student": 5}
    assert runs.parse_config(raw, ["train.turn_every={student: 1}"]).train.turn_every == {"student": 1}
    assert runs.parse_config(raw, ["train.turn_every={fake: 2}"]).train.turn_every == {"fake": 2}  # set: kept
    assert runs.parse_config(raw, for_training=False).train.turn_every == {}  # a saved config keeps what ran
    assert runs.parse_config({**GMM, "train": {"output_dir": "x"}}).train.turn_every == {}  # only DMD2 has one
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "student/loss" in r] == [1, 6]  # steps 0 and 5 (0-based)
    assert all("fake/loss" in r for r in rows)
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["train"]["turn_every"] == {"student": 5}  # the saved config says what ran
    from distill.runs import load_run

    assert load_run(tmp_path / "run")[1].train.turn_every == {"student": 5}


# --- finding 2: the fake adapter's scale is a param; by default 1, whatever the student's -------------------------
@pytest.mark.parametrize("params,scale", [({}, 1.0), ({"fake_alpha": 2.0}, 0.5), ({"fake_rank": 8}, 1.0),
                                          ({"fake_rank": 8, "fake_alpha": 2.0}, 0.25)])
def test_the_fake_adapters_alpha(tmp_path, params, scale):
    cfg = runs.parse_config({**GMM, "student": {"kind": "lora", "lora_rank": 4, "lora_alpha": 1.0},
                             "method": {"name": "dmd2", "params": {"student_steps": 1, **params}},
                             "train": {"output_dir": str(tmp_path / "run")}})
    method = runs.build_method(cfg, "cpu")
    layers = [mod for mod in method.student.backbone.modules() if isinstance(mod, BaseTunerLayer)]
    assert layers and all(mod.scaling["default"] == 0.25 for mod in layers)  # the student's own: 1/4
    assert all(mod.scaling["fake"] == pytest.approx(scale) for mod in layers)


# --- finding 3: a full student's fake-score copy is checkpointed when the student is ------------------------------
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_fake_score_copy_checkpoints_as_the_student_does(tmp_path, checkpointing):
    cfg = runs.parse_config({"teacher": {"source": "builtin:tiny-sdxl", "resolution": 16},
                             "student": {"kind": "full", "gradient_checkpointing": checkpointing},
                             "method": {"name": "dmd2", "params": {"student_steps": 1}},
                             "data": {"kind": "digits", "batch_size": 2},
                             "train": {"output_dir": str(tmp_path / "run")}})
    method = runs.build_method(cfg, "cpu")
    assert method.fake.copy is not None
    assert method.student.backbone.is_gradient_checkpointing == checkpointing
    assert method.fake.copy.is_gradient_checkpointing == checkpointing


def test_range_texts():
    assert base.Range(ge=1).describe(True) == "must be an integer >= 1"
    assert base.Range(ge=0, lt=1).describe(False) == "must be a finite number in [0, 1)"
    assert base.Range(gt=0, le=2.5).describe(False) == "must be a finite number in (0, 2.5]"
    assert base.Range(lt=0.001).describe(False) == "must be a finite number < 0.001"
    assert base.Range().describe(False) == "must be a finite number"
    assert not base.Range().allows(float("nan")) and not base.Range(ge=0).allows(float("inf"))
