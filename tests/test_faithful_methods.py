"""The methods as their papers define them (issue #10): gradient checkpointing through a LoRA student's teacher
pass, useful student times on flow teachers, the hinge per head and token, the first student time trained from
pure noise, progressive students' output parameterisation, and progressive rounds after a skipped step."""
import math

import pytest
import torch

from distill import checkpoint, data, runs
from distill.errors import ConfigError
from distill.methods import progressive as progressive_module
from distill.schedules import flow_shift
from distill.runs import build_method
from distill.trainer import encode_batch, select_turn, step_generator, train

ADD_PARAMS = "{feature_net: vit_tiny_patch16_224, feature_size: 32}"


def tiny_cfg(tmp_path, source, **over):
    raw = {"teacher": {"source": str(source), "resolution": 32},
           "student": {"kind": "lora", "lora_rank": 4},
           "method": {"name": "ladd", "params": {"student_steps": 2}},
           "data": {"kind": "digits", "batch_size": 2},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-3}}
    return runs.parse_config(raw, [f"{k}={v}" for k, v in over.items()])


def gmm_cfg(tmp_path, schedule, method, params, **over):
    raw = {"teacher": {"source": f"builtin:gmm-{schedule}"},
           "student": {"kind": "full", "lora_rank": 4},
           "method": {"name": method, "params": params},
           "data": {"kind": "teacher", "batch_size": 8, "size": 64},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "learning_rate": 1e-3, "log_every": 1}}
    return runs.parse_config(raw, [f"{k}={v}" for k, v in over.items()])


def student_grads(method, cfg):
    """The student turn's gradients for one fixed batch."""
    turn_params = {turn: method.parameters_for(turn) for turn in method.turns}
    raw = data.collate([data.build(cfg.data, 32)[i] for i in range(2)])
    select_turn(turn_params, "student")
    method.discriminator.eval()  # spectral norm's power iteration would change ADD's heads between calls
    method.zero_grad(set_to_none=True)
    method.loss(encode_batch(raw, method.teacher, step_generator(0, 0, 0, 1)), "student").loss.backward()
    return [p.grad.clone() for p in turn_params["student"]]


# --- 1. gradient checkpointing recomputes the teacher pass as the teacher ---------------------------------------
def _checkpointing_cases():
    """LADD with a LoRA student is where the teacher pass carries gradients (the crash of issue #10); the other
    cases (ADD's teacher pass is no-grad, a full student's teacher is another module) are slow-marked."""
    for fixture in ("tiny_sdxl_dir", "tiny_sd3_dir"):
        for kind in ("lora", "full"):
            for name, params in (("ladd", "{student_steps: 2}"), ("add", ADD_PARAMS)):
                fast = kind == "lora" and name == "ladd"
                yield pytest.param(fixture, kind, name, params, marks=() if fast else pytest.mark.slow,
                                   id=f"{fixture.split('_')[1]}-{kind}-{name}")


@pytest.mark.parametrize("teacher_fixture,kind,name,params", _checkpointing_cases())
def test_gradient_checkpointing_gives_the_same_gradients(request, tmp_path, teacher_fixture, kind, name, params):
    cfg = tiny_cfg(tmp_path, request.getfixturevalue(teacher_fixture), **{
        "method.name": name, "method.params": params, "student.kind": kind, "student.gradient_checkpointing": "true",
        "teacher.resolution": 16})
    method = build_method(cfg, "cpu")
    backbone = method.student.backbone
    assert backbone.is_gradient_checkpointing
    with_ckpt = student_grads(method, cfg)
    backbone.disable_gradient_checkpointing()
    without = student_grads(method, cfg)
    assert len(with_ckpt) == len(without) > 0
    scale = max(g.abs().max() for g in without)
    assert scale > 0
    for a, b in zip(with_ckpt, without):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


# --- 2. n distinct useful student times on flow teachers ----------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("add", {"student_steps": 4, "feature_net": "mlp"}), ("ladd", {"student_steps": 4}),
    ("consistency", {}), ("progressive", {"start_steps": 8, "end_steps": 1, "round_steps": 1})])
def test_flow_student_times_are_distinct_and_useful(tmp_path, name, params):
    method = build_method(gmm_cfg(tmp_path, "flow", name, params), "cpu")
    teacher = method.teacher
    grids = {n: method.sample_times(n) for n in (1, 2, 4)}
    if hasattr(method.params, "student_steps"):
        grids["training grid"] = method.student_times(method.params.student_steps).tolist()
    for n, times in grids.items():
        steps = len(times)
        floor = flow_shift(1.0 / steps, teacher.shift) * teacher.num_train_timesteps
        assert len(set(times)) == steps, (n, times)
        assert min(times) >= floor - 1e-3, (n, times, floor)  # no near-identity step at sigma_min
        assert max(times) == pytest.approx(teacher.num_train_timesteps)  # starts from pure noise


def test_vp_adversarial_times_are_adds():
    from teachers.gmm import GMMTeacher

    assert GMMTeacher("vp").student_timesteps(4).tolist() == [999, 749, 499, 249]  # ADD sec. 4


# --- 3. the hinge acts on every head's (and token's) logit --------------------------------------------------------
def _far_fakes(logits):
    if isinstance(logits, torch.Tensor):
        return torch.full_like(logits, -10.0).detach()
    return [torch.full_like(x, -10.0).detach() for x in logits]


@pytest.mark.parametrize("heads_kind", ["add", "ladd"])
def test_a_head_past_the_margin_does_not_silence_the_others(heads_kind):
    from discriminators.feature_net import FeatureHeads
    from discriminators.losses import hinge_d
    from discriminators.teacher_heads import TeacherHeads

    torch.manual_seed(0)
    feats, cond = [torch.randn(2, 5, 6), torch.randn(2, 5, 6)], torch.randn(2, 3)
    if heads_kind == "add":
        heads = FeatureHeads([6, 6], 3, 8)
        logits = lambda: heads(feats, cond)  # noqa: E731
    else:
        heads = TeacherHeads([6, 6], 3, 8)
        logits = lambda: heads(feats, cond, torch.tensor([500.0, 500.0]))  # noqa: E731
    with torch.no_grad():
        heads.heads[0].out.bias.fill_(10.0)  # head 0 is far past the margin on every real token
        heads.heads[1].out.bias.fill_(0.0)
    real = logits()
    hinge_d(real, _far_fakes(real)).backward()  # fakes far below -1: only the real term acts
    grad = lambda head: sum(p.grad.abs().sum() for p in head.parameters() if p.grad is not None)  # noqa: E731
    assert grad(heads.heads[0]) == 0
    assert grad(heads.heads[1]) > 0


def test_hinge_is_elementwise():
    from discriminators.losses import hinge_d, hinge_g

    real, fake = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5]])], [torch.tensor([[-2.0, 0.0]]), torch.tensor([[0.0]])]
    assert hinge_d(real, fake).item() == pytest.approx((0 + 1) / 2 + 0.5 + (0 + 1) / 2 + 1)
    assert hinge_g(fake).item() == pytest.approx(1.0)


# --- 5. the first student time: trained from pure noise, as sampled ----------------------------------------------
@pytest.mark.parametrize("name,params", [("add", {"student_steps": 4, "feature_net": "mlp"}),
                                         ("ladd", {"student_steps": 4})])
def test_first_student_time_is_trained_from_pure_noise(tmp_path, name, params):
    method = build_method(gmm_cfg(tmp_path, "vp", name, params), "cpu")
    seen = []
    predict = method.teacher.predict

    def spy(x, t, *args, **kw):
        seen.append((x.detach().clone(), torch.as_tensor(t).expand(len(x)).clone()))
        return predict(x, t, *args, **kw)

    method.teacher.predict = spy
    x0 = torch.full((64, 2), 1000.0)  # any trace of the data at the first time would stand out
    cond = method.teacher.encode_prompts(["class 0"] * 64)
    method.generate(x0, cond, torch.Generator().manual_seed(0))
    x_t, t = seen[0]
    first = t == method.student_times(method.params.student_steps)[0]
    assert first.any() and (~first).any()
    assert x_t[first].abs().max() < 10  # pure noise, as the sampler starts (abar_999 would leave 68 here)
    assert x_t[~first].abs().min() > 100  # the other times keep the data


# --- 6. progressive: the student's output parameterisation -------------------------------------------------------
def test_progressive_student_output_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="student_output.*allowed: teacher, x, v"):
        gmm_cfg(tmp_path, "vp", "progressive", {"start_steps": 4, "student_output": "eps2"})
    with pytest.raises(ConfigError, match="teacher_from_student needs student_output: teacher"):
        gmm_cfg(tmp_path, "vp", "progressive", {"start_steps": 4, "student_output": "x", "teacher_from_student": True})
    with pytest.raises(ConfigError, match="variance-preserving"):
        build_method(gmm_cfg(tmp_path, "flow", "progressive", {"start_steps": 4, "round_steps": 2, "student_output": "v"}),
                     "cpu")


@pytest.mark.parametrize("output,expect_zero", [("x", True), ("v", False), ("teacher", False)])
def test_progressive_student_output_is_how_it_samples_and_trains(tiny_sdxl_dir, tmp_path, output, expect_zero):
    cfg = tiny_cfg(tmp_path, tiny_sdxl_dir, **{
        "method.name": "progressive", "student.kind": "full", "train.max_steps": 4,
        "method.params": f"{{start_steps: 4, round_steps: 2, student_output: {output}}}"})
    method = build_method(cfg, "cpu")
    forward = method.teacher._forward
    student = method.student.backbone
    # A student whose backbone outputs zeros: read as x it samples exactly zeros; read as eps or v it does not.
    method.teacher._forward = lambda b, x, *a: torch.zeros_like(x) if b is student else forward(b, x, *a)
    cond = method.teacher.encode_prompts(["a handwritten digit 3"])
    for steps in (1, 2):
        sample = method.sample(cond, steps, torch.Generator().manual_seed(0), method.teacher.latent_shape(32, 32))
        assert (sample.abs().max() == 0) == expect_zero
    raw = data.collate([data.build(cfg.data, 32)[i] for i in range(2)])
    loss = method.loss(encode_batch(raw, method.teacher, step_generator(0, 0, 0, 0)), "student").loss
    assert math.isfinite(loss.item())


# --- 8. progressive rounds switch on the step count, even after a skipped step ----------------------------------
def test_progressive_round_teacher_after_a_skipped_last_step(tmp_path, monkeypatch):
    cfg = gmm_cfg(tmp_path, "vp", "progressive", {"start_steps": 4, "end_steps": 1, "round_steps": 2},
                  **{"student.kind": "lora", "train.max_steps": 4, "train.checkpoint_every": 100})
    calls = []
    loss = progressive_module.Progressive.loss

    def poisoned(self, batch, turn):
        out = loss(self, batch, turn)
        calls.append(1)
        if len(calls) == 2:  # step 2 of 2 in round 0: non-finite, so the trainer skips its update
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(progressive_module.Progressive, "loss", poisoned)
    train(cfg, stop_after=2)
    monkeypatch.setattr(progressive_module.Progressive, "loss", loss)
    ckpt = checkpoint.find(tmp_path / "run", "latest")
    assert ckpt.name == "step-00000002"
    weights = checkpoint.load(ckpt)[0]
    student = {k.removeprefix("student.lora."): v for k, v in weights.items() if k.startswith("student.lora.")}
    previous = {k.removeprefix("previous_lora."): v for k, v in weights.items() if k.startswith("previous_lora.")}
    assert previous, "the milestone must hold round 1's teacher: round 0's final student"
    for name, v in previous.items():  # parameter names carry peft's adapter name, saved LoRA keys do not
        assert torch.equal(v, student[name.replace(".default.", ".")]), name
    method = train(cfg, resume="latest")
    assert method.round == 1
    assert method.previous.keys() == previous.keys()
    assert all(torch.equal(method.previous[k], v) for k, v in previous.items())
