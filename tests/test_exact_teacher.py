"""The exact (Gaussian-mixture) teacher, and consistency distillation judged against the true distribution."""
import math

import pytest
import torch

from distill import checkpoint, runs
from distill.sampling import ddim_sample
from distill.runs import build_method
from distill.trainer import train
from teachers.gmm import GMMTeacher, class_energy_distance, energy_distance


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_denoiser_is_the_posterior_mean(schedule):
    """Closed form against a self-normalised importance-sampling estimate of E[x0 | x_t]."""
    teacher = GMMTeacher(schedule)
    g = torch.Generator().manual_seed(0)
    prior = teacher.sample_data(torch.full((400_000,), 2), g)
    for t in (100.0, 500.0, 900.0):
        a, s = teacher.alpha_sigma(torch.tensor(t))
        x_t = a * teacher.sample_data(torch.tensor([2]), g) + s * torch.randn(1, 2, generator=g)
        logw = -((x_t - a * prior) ** 2).sum(1) / (2 * s**2)
        mc = (torch.softmax(logw.double(), 0)[:, None] * prior.double()).sum(0)
        x0, eps = teacher.predict(x_t, t, teacher.encode_prompts(["class 2"]))
        assert torch.allclose(x0[0].double(), mc, atol=2e-2), (t, x0, mc)
        assert torch.allclose(a * x0 + s * eps, x_t, atol=1e-5)


def test_flux_gmm_embeds_guidance_and_shifts_by_size():
    """gmm-flux: a guided prediction is one pass that equals two-pass CFG of the exact posterior means, and the
    shift follows the notional image's token count as FLUX.1's scheduler has it (256 px: e^0.5, 1024 px: e^1.15)."""
    from distill.solvers import cfg_combine

    assert GMMTeacher("flux", resolution=256).shift == pytest.approx(math.exp(0.5))
    big = GMMTeacher("flux", resolution=1024)
    assert big.shift == pytest.approx(math.exp(1.15)) and big.timesteps(2)[1] > GMMTeacher("flux").timesteps(2)[1]
    calls, forward = [], big.backbone.forward
    big.backbone.forward = lambda x, *a: calls.append(len(x)) or forward(x, *a)
    cond, x = big.encode_prompts(["class 1", "class 3"]), torch.randn(2, 2)
    x0 = big.predict(x, 600.0, cond, 4.0)[0]
    alpha, sigma = (v.expand(2) for v in big.alpha_sigma(torch.tensor(600.0)))
    exact = [big.backbone.exact(x, alpha, sigma, c["label"]) for c in (cond.pos, cond.neg)]
    assert calls == [2] and torch.allclose(x0, cfg_combine(*exact, 4.0), atol=1e-6)
    assert torch.allclose(big.predict(x, 600.0, cond)[0], exact[0], atol=1e-6)  # w = 1: the class's posterior mean


def test_teacher_sampler_reaches_the_true_distribution():
    teacher = GMMTeacher("vp")
    labels = torch.arange(4).repeat_interleave(300)
    cond = teacher.encode_prompts([f"class {k}" for k in labels.tolist()])
    truth = teacher.sample_data(labels, torch.Generator().manual_seed(1))
    many = ddim_sample(teacher, cond, 50, torch.Generator().manual_seed(2), (2,))
    one = ddim_sample(teacher, cond, 1, torch.Generator().manual_seed(2), (2,))
    assert energy_distance(many, truth) < 0.02 < 0.5 < energy_distance(one, truth)


def _distance(method, steps, labels, truth):
    cond = method.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])
    x = method.sample(cond, steps, torch.Generator().manual_seed(5), (2,))
    return class_energy_distance(x, truth, labels)


def _assert_closer_to_truth(trained, untrained, steps, name):
    """Each n-step sample set of the trained student is measurably closer to the true distribution."""
    labels = torch.arange(4).repeat_interleave(400)
    truth = trained.teacher.sample_data(labels, torch.Generator().manual_seed(9))
    for n in steps:
        before, after = _distance(untrained, n, labels, truth), _distance(trained, n, labels, truth)
        print(f"{name} {n}-step energy distance: untrained {before:.3f} -> trained {after:.3f}")
        assert after < 0.7 * before, (n, before, after)


@pytest.mark.parametrize("schedule,kind", [("vp", "full"), ("flow", "full"), ("vp", "lora"), ("flux", "lora")])
def test_consistency_distillation_moves_few_step_student_toward_truth(tmp_path, schedule, kind):
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"},
        "student": {"kind": kind, "lora_rank": 8},
        "method": {"name": "consistency", "params": {"guidance_min": 1.0, "guidance_max": 1.0, "loss": "l2"}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1200, "learning_rate": 1e-3,
                  "checkpoint_every": 100000}})
    trained, untrained = train(cfg), build_method(cfg, "cpu")
    resumed = build_method(cfg, "cpu")
    resumed.load_saved(checkpoint.load(checkpoint.find(tmp_path / "run", "latest"))[0])
    assert all(torch.equal(a, b) for a, b in zip(trained.student.parameters(), resumed.student.parameters()))
    _assert_closer_to_truth(trained, untrained, (1, 2), f"consistency {schedule}/{kind}")


@pytest.mark.parametrize("schedule,kind,student_steps", [("vp", "full", 2), ("flow", "full", 1), ("vp", "lora", 1),
                                                               pytest.param("flux", "full", 1, marks=pytest.mark.slow)])
def test_ladd_moves_few_step_student_toward_truth(tmp_path, schedule, kind, student_steps):
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"},
        "student": {"kind": kind, "lora_rank": 8},
        # A 2-D toy is best judged at low noise, so the renoising time leans low here (the paper's m is 1).
        "method": {"name": "ladd", "params": {"student_steps": student_steps, "logit_mean": -1.0}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 600, "learning_rate": 1e-3,
                  "adam_beta1": 0.0, "adam_beta2": 0.99, "checkpoint_every": 100000}})
    _assert_closer_to_truth(train(cfg), build_method(cfg, "cpu"), range(1, student_steps + 1),
                            f"ladd {schedule}/{kind}")


@pytest.mark.parametrize("schedule,kind", [("vp", "full"), ("flow", "lora"), ("flux", "full")])
def test_progressive_halvings_track_the_teacher_and_approach_truth(tmp_path, schedule, kind):
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"},
        "student": {"kind": kind, "lora_rank": 8},
        "method": {"name": "progressive", "params": {"start_steps": 8, "end_steps": 1, "round_steps": 250}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 750, "learning_rate": 1e-3,
                  "checkpoint_every": 100000, "keep_checkpoints": 1}})
    train(cfg)
    labels = torch.arange(4).repeat_interleave(400)
    teacher = build_method(cfg, "cpu")
    truth = teacher.teacher.sample_data(labels, torch.Generator().manual_seed(9))
    cond = teacher.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])

    def dist(x, y):
        return class_energy_distance(x, y, labels)

    rounds = sorted((tmp_path / "run/checkpoints").glob("step-*"))
    assert [p.name for p in rounds] == ["step-00000250", "step-00000500", "step-00000750"]  # milestones kept
    for ckpt, n in zip(rounds, (4, 2, 1)):
        method = build_method(cfg, "cpu")
        weights, _, state = checkpoint.load(ckpt)
        method.load_saved(weights)
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        student = method.sample(cond, n, gen(), (2,))
        teacher_n = ddim_sample(method.teacher, cond, n, gen(), (2,), times=method.grid()[:: 8 // n].tolist())
        teacher_2n = ddim_sample(method.teacher, cond, 2 * n, gen(), (2,), times=method.grid()[:: 4 // n].tolist())
        print(f"progressive {schedule}/{kind} n={n}: student-to-teacher(2n) {dist(student, teacher_2n):.3f}, "
              f"teacher(n)-to-teacher(2n) {dist(teacher_n, teacher_2n):.3f}")
        assert dist(student, teacher_2n) < dist(teacher_n, teacher_2n)
    assert dist(student, truth) < 0.5 * dist(teacher_n, truth)  # the 1-step student beats 1-step sampling


@pytest.mark.parametrize("schedule,student_steps", [("vp", 2), ("flow", 1),
                                                          pytest.param("flux", 1, marks=pytest.mark.slow)])
def test_add_moves_few_step_student_toward_truth(tmp_path, schedule, student_steps):
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"},
        "student": {"kind": "full"},
        # 2-D points are not images: a frozen random MLP stands in for the ViT; R1 keeps the toy GAN stable.
        "method": {"name": "add", "params": {"student_steps": student_steps, "feature_net": "mlp", "r1_gamma": 1.0}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 400, "learning_rate": 1e-3,
                  "adam_beta1": 0.0, "adam_beta2": 0.99, "checkpoint_every": 100000}})
    _assert_closer_to_truth(train(cfg), build_method(cfg, "cpu"), range(1, student_steps + 1), f"add {schedule}")


@pytest.mark.parametrize("schedule", ["vp", "flow", pytest.param("flux", marks=pytest.mark.slow)])
def test_dmd2_moves_one_step_student_toward_truth(tmp_path, schedule):
    """The recipe of experiments/results/exact_teacher.md: five fake-score updates per generator update."""
    cfg = runs.parse_config({
        "teacher": {"source": f"builtin:gmm-{schedule}"},
        "student": {"kind": "full"},
        "method": {"name": "dmd2", "params": {"student_steps": 1, "real_guidance": 1.0}},
        "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1200, "learning_rate": 1e-2,
                  "turn_every": {"student": 5}, "lr_scheduler": "cosine", "adam_beta1": 0.0, "adam_beta2": 0.99,
                  "checkpoint_every": 100000}})
    _assert_closer_to_truth(train(cfg), build_method(cfg, "cpu"), (1,), f"dmd2 {schedule}")
