"""Continuous-time consistency distillation (sCM, distill/methods/scm.py): TrigFlow read off every family, the JVP
tangent against a finite difference, training toward the true distribution, and an exact resume."""
import pytest
import torch
from safetensors.torch import load_file

from distill import runs
from distill.runs import build_method
from distill.trainer import train
from teachers.gmm import GMMTeacher, class_energy_distance


def _cfg(tmp_path, source="builtin:gmm-vp", out="run", **params):
    raw = {"teacher": {"source": source}, "student": {"kind": "full"},
           "method": {"name": "scm", "params": {"guidance_min": 1.0, "guidance_max": 1.0,
                                                "warmup": 100, **params}},
           "data": {"kind": "teacher", "batch_size": 256, "size": 20000},
           "train": {"output_dir": str(tmp_path / out), "max_steps": 600, "learning_rate": 1e-3,
                     "checkpoint_every": 100000}, "sample": {"steps": 1}}
    if not source.startswith("builtin:gmm"):
        raw.update(teacher={"source": source, "resolution": 32}, data={"kind": "digits", "batch_size": 2})
    return runs.parse_config(raw)


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_time_at_inverts_the_schedule(schedule):
    t = GMMTeacher(schedule)
    times = torch.tensor([1.0, 10.0, 250.0, 250.5, 998.0]) if schedule == "vp" else torch.tensor([1.0, 10.0, 999.0])
    assert torch.allclose(t.time_at(*t.alpha_sigma(times)), times, atol=1e-3)


@pytest.mark.parametrize("source", ["builtin:gmm-vp", "builtin:gmm-flow", "tiny-sdxl", "tiny-sdxl-v"])
def test_trigflow_reads_the_backbone_and_the_jvp_tangent_matches_a_finite_difference(tmp_path, source, tiny_sdxl_dir):
    """VP-epsilon (tiny SDXL), VP-v (the same read as v-prediction), VP-x0 and flow (the exact teachers)."""
    cfg = _cfg(tmp_path, str(tiny_sdxl_dir) if source.startswith("tiny-sdxl") else source)
    if source == "tiny-sdxl-v":
        cfg.teacher.prediction_type = "v_prediction"
    m = build_method(cfg, "cpu")
    assert (m.teacher.prediction_type == "v_prediction") == (source == "tiny-sdxl-v")
    torch.manual_seed(0)
    for p in m.student.backbone.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    t = m.teacher
    cond = t.encode_prompts(["class 1", "class 2"] if source.startswith("builtin") else ["a 1", "a 2"])
    x = torch.randn(2, *t.latent_shape(*t.size))
    s = torch.tensor([0.3, 1.2])
    # f = cos(s) x - sin(s) sigma_d F is the backbone's x0 at the family point of (x, s)
    F = m.trig_F(m.student.backbone, x, s, cond)
    f = torch.cos(s).view(-1, *[1] * (x.ndim - 1)) * x - (torch.sin(s) * 0.5).view(-1, *[1] * (x.ndim - 1)) * F
    ratio = 0.5 * torch.tan(s)
    alpha = 1 / (1 + ratio) if t.flow else torch.rsqrt(1 + ratio**2)
    x_fam = (alpha / torch.cos(s)).view(-1, *[1] * (x.ndim - 1)) * x
    x0, _ = t.predict(x_fam, t.time_at(alpha, ratio * alpha), cond, backbone=m.student.backbone,
                      scales=(alpha, ratio * alpha))
    assert torch.allclose(f, x0, atol=1e-4)
    dxds = torch.randn_like(x)
    with torch.no_grad():
        jvp = m.tangent(x, s, cond, dxds, None)
        m.params.tangent = "finite_difference"
        fd = m.tangent(x, s, cond, dxds, None)
    assert float((jvp - fd).norm() / jvp.norm()) < 0.05


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_jvp_tangent_equals_a_float64_central_difference(tmp_path, family, kind, tiny_sdxl_dir, tiny_sd3_dir):
    """torch.func.jvp through the whole student (TrigFlow's F, the family's time map, the math attention kernel) in
    float64, against a central difference of step 1e-4: rel 1e-3. Measured: SDXL 6e-5 (LoRA) and 9e-5 (full); SD3
    8e-4 and 7e-4, most of it the float32 time embedding diffusers computes whatever the model's dtype (at h = 1e-3
    the difference's own O(h^2) error is 9e-3 on SDXL)."""
    cfg = _cfg(tmp_path, str(tiny_sdxl_dir if family == "sdxl" else tiny_sd3_dir), fd_step=1e-4)
    cfg.student.kind = kind
    m = build_method(cfg, "cpu").double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.student.backbone.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    t = m.teacher
    cond = t.encode_prompts(["a 1", "a 2"]).to(dtype=torch.float64)
    x = torch.randn(2, *t.latent_shape(*t.size), dtype=torch.float64)
    s, dxds = torch.tensor([0.3, 1.2], dtype=torch.float64), torch.randn_like(x)
    with torch.no_grad():
        jvp = m.tangent(x, s, cond, dxds, None)
        m.params.tangent = "finite_difference"
        fd = m.tangent(x, s, cond, dxds, None)
    assert jvp.dtype == torch.float64 and float((jvp - fd).norm() / jvp.norm()) < 1e-3


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_scm_beats_the_teachers_own_one_and_two_step_sampling(tmp_path, schedule):
    """The untrained student is the teacher sampled by the same re-noising chain: 1-step 1.21 (vp) and 1.38 (flow),
    2-step 0.36 and 0.67; the trained one lands near LCM's (experiments/results/exact_teacher.md)."""
    cfg = _cfg(tmp_path, f"builtin:gmm-{schedule}")
    trained, untrained = train(cfg), build_method(cfg, "cpu")
    labels = torch.arange(4).repeat_interleave(400)
    truth = trained.teacher.sample_data(labels, torch.Generator().manual_seed(9))
    cond = trained.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])

    def distance(method, steps):
        x = method.sample(cond, steps, torch.Generator().manual_seed(5), (2,))
        return class_energy_distance(x, truth, labels)
    for steps in (1, 2):
        before, after = distance(untrained, steps), distance(trained, steps)
        print(f"scm {schedule} {steps}-step energy distance: untrained {before:.3f} -> trained {after:.3f}")
        assert after < 0.6 * before


def test_scm_resumes_bit_identically_through_its_warm_up(tmp_path):
    """The tangent warm-up's step count and the adaptive weight are restored: 2 + 2 steps end where 4 do."""
    whole = _cfg(tmp_path, out="whole", **{"tangent": "finite_difference"})
    whole.train.max_steps, whole.train.checkpoint_every = 4, 2
    train(whole)
    split = _cfg(tmp_path, out="split", **{"tangent": "finite_difference"})
    split.train.max_steps, split.train.checkpoint_every = 4, 2
    train(split, stop_after=2)
    train(split, resume="latest")
    a = load_file(tmp_path / "whole/checkpoints/step-00000004/weights.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step-00000004/weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("weighting.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3", "tiny-flux-dev"])
def test_scm_trains_a_lora_student_on_each_family(tmp_path, name):
    """Two JVP steps with CFG on a tiny SDXL and SD3 (two passes) and a guidance-embedded FLUX (the scale as an
    input): finite losses, and the LoRA moves."""
    from teachers import tiny

    cfg = _cfg(tmp_path, str(tiny.build(name, tmp_path / name)), guidance_min=2.0, guidance_max=3.0)
    cfg.student.kind, cfg.train.max_steps, cfg.teacher.resolution = "lora", 2, 16
    method = train(cfg)
    lora = {k: v for k, v in method.student.backbone.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())
    logs = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert logs and "nan" not in " ".join(logs).lower()


def test_prior_weighting_divides_each_samples_loss_by_sigma_d_tan_s(tmp_path):
    """SANA-Sprint's prior weighting: one sample's loss, with and without it, differs by sigma_d tan(s) of the
    time drawn for it (the first draw of the step's generator)."""
    m = build_method(_cfg(tmp_path), "cpu")
    cond, x0 = m.teacher.encode_prompts(["class 1"]), torch.tensor([[1.5, 0.0]])
    losses = []
    for prior in (False, True):
        m.params.prior_weighting = prior
        losses.append(float(m.loss({"latents": x0, "cond": cond, "generator": torch.Generator().manual_seed(3)},
                                   "student").loss.detach()))
    tau = m.params.p_mean + m.params.p_std * torch.randn(1, generator=torch.Generator().manual_seed(3))
    s = torch.atan(tau.exp() / m.params.sigma_d).clamp(*m.s_range)
    assert losses[1] == pytest.approx(losses[0] / float(m.params.sigma_d * torch.tan(s)), rel=1e-5)
