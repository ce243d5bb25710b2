"""DMD2 (issue #13): one copy of the base weights serves teacher, student and fake score; each turn trains only
its own part; checkpointing recomputes each pass with the right adapter; bad input fails before any model loads."""
import json

import pytest
import torch

from distill import data, runs
import students
from students import checkpoint_with_adapter_state
from distill.runs import build_method
from distill.trainer import encode_batch, select_turn, step_generator, train
from test_faithful_methods import tiny_cfg

DMD2 = {"method.name": "dmd2", "method.params": "{student_steps: 2}"}


def turn_grads(method, cfg, turn):
    """{parameter: gradient} of one turn's loss on a fixed batch, as the trainer runs it (other turns frozen)."""
    turn_params = {t: method.parameters_for(t) for t in method.turns}
    raw = data.collate([data.build(cfg.data, 16)[i] for i in range(2)])
    select_turn(turn_params, turn)
    method.zero_grad(set_to_none=True)
    method.loss(encode_batch(raw, method.teacher, step_generator(0, 0, 0, 1)), turn).loss.backward()
    return {p: p.grad.clone() for p in method.parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.fixture
def lora_dmd2(tmp_path, tiny_sdxl_dir):
    cfg = tiny_cfg(tmp_path, tiny_sdxl_dir, **DMD2, **{"teacher.resolution": 16})
    return build_method(cfg, "cpu"), cfg


def test_the_fake_score_adapter_never_changes_the_teacher_or_the_student(lora_dmd2):
    method, _ = lora_dmd2
    assert method.fake.copy is None and method.student.backbone is method.teacher.backbone  # one copy of the weights
    x = torch.randn(2, *method.teacher.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    cond = method.teacher.encode_prompts(["a handwritten digit 1", "a handwritten digit 7"])
    teacher, student = method.teacher.predict(x, 500, cond)[0], method.teacher.predict(
        x, 500, cond, backbone=method.student.backbone)[0]

    def fake_predict():
        with method.fake.active() as backbone:
            return method.teacher.predict(x, 500, cond, backbone=backbone)[0]

    assert torch.equal(fake_predict(), teacher)  # the fake score starts as the teacher
    with torch.no_grad():
        for p in students.adapter_parameters(method.teacher.backbone, "fake"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(method.teacher.predict(x, 500, cond)[0], teacher)
    assert torch.equal(method.teacher.predict(x, 500, cond, backbone=method.student.backbone)[0], student)
    assert (fake_predict() - teacher).abs().max() > 1e-3
    # the student's own saved weights and its diffusers LoRA carry no fake-score tensors
    assert not [k for k in method.student.state_to_save() if ".fake." in k]
    assert [k for k in method.state_to_save() if k.startswith("fake.")]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_each_turn_reaches_only_its_own_parameters(tmp_path, tiny_sdxl_dir, kind):
    cfg = tiny_cfg(tmp_path, tiny_sdxl_dir, **DMD2, **{"teacher.resolution": 16, "student.kind": kind})
    method = build_method(cfg, "cpu")
    student, fake = method.parameters_for("student"), method.parameters_for("fake")
    assert not {id(p) for p in student} & {id(p) for p in fake}
    assert {id(p) for p in method.discriminator.parameters()} <= {id(p) for p in fake}
    for turn, own in (("student", student), ("fake", fake)):
        reached = {id(p) for p in turn_grads(method, cfg, turn)}
        assert reached and reached <= {id(p) for p in own}, turn
    assert reached & {id(p) for p in method.discriminator.parameters()}  # the head learns in the fake turn


def test_gradient_checkpointing_recomputes_each_pass_with_its_own_adapter(lora_dmd2):
    """Student, teacher and fake score are one backbone: a block recomputed in backward must run with the adapter
    its forward ran with, in both turns."""
    method, cfg = lora_dmd2
    with torch.no_grad():  # a fake score that differs from the teacher, so a wrong adapter would show
        for p in students.adapter_parameters(method.teacher.backbone, "fake"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    backbone = method.student.backbone
    for turn in method.turns:
        backbone.enable_gradient_checkpointing(checkpoint_with_adapter_state)
        with_ckpt = turn_grads(method, cfg, turn)
        backbone.disable_gradient_checkpointing()
        without = turn_grads(method, cfg, turn)
        assert with_ckpt.keys() == without.keys() and without, turn
        scale = max(g.abs().max() for g in without.values())
        for p, g in without.items():
            torch.testing.assert_close(with_ckpt[p], g, atol=1e-5 * scale, rtol=1e-4)


def test_a_turn_run_every_k_steps_ends_its_schedule_with_the_run(tmp_path):
    """Five fake-score updates per generator update under a cosine schedule: both learning rates reach zero at the
    last step (the generator's schedule counts its own updates), and warm up over the same global steps."""
    cfg = runs.parse_config({"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
                        "method": {"name": "dmd2", "params": {"student_steps": 1}},
                        "data": {"kind": "teacher", "batch_size": 8, "size": 64},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 20, "learning_rate": 1e-3,
                                  "lr_scheduler": "cosine", "warmup_steps": 5, "turn_every": {"student": 5},
                                  "log_every": 1}})
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    student = [r["student/lr"] for r in rows if "student/lr" in r]
    assert len(student) == 4 and student[-1] == rows[-1]["fake/lr"] == 0.0
    assert student[0] == pytest.approx(1e-3) and rows[4]["fake/lr"] == pytest.approx(1e-3)  # warm after 5 steps
