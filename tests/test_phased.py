"""Phased consistency (PCM; `method.params.phases`): one phase is LCM exactly, more phases map each point to its
phase's lower edge and sample with deterministic DDIM through the edges."""
import pytest
import torch

from distill import runs
from distill.errors import DistillError
from distill.runs import build_method
from distill.sampling import randn
from distill.solvers import bcast, consistency_scalings, ddim_step


def _method(**params):
    cfg = runs.parse_config({"teacher": {"source": "builtin:gmm-vp"}, "student": {"kind": "full"},
                             "method": {"name": "consistency", "params": {"num_teacher_steps": 8, "loss": "l2",
                                                                          "guidance_min": 1.0, "guidance_max": 1.0,
                                                                          **params}},
                             "data": {"kind": "teacher", "batch_size": 16}})
    torch.manual_seed(0)
    for p in (m := build_method(cfg, "cpu")).student.backbone.parameters():
        p.data.add_(0.1 * torch.randn_like(p))  # the student and its EMA target differ from the teacher, and each other
    return cfg, m


def _batch(method, n=16):
    labels = torch.arange(n) % 4
    cond = method.teacher.encode_prompts([f"class {k}" for k in labels.tolist()])
    return {"latents": method.teacher.sample_data(labels, torch.Generator().manual_seed(3)), "cond": cond,
            "generator": torch.Generator().manual_seed(4)}


def _f(method, backbone, x, t, cond):
    """LCM eq. 5 by hand: c_skip x + c_out x0."""
    x0, _ = method.teacher.predict(x, t, cond, backbone=backbone)
    c_skip, c_out = consistency_scalings(t, method.params.sigma_data, method.params.timestep_scaling)
    return bcast(c_skip, x) * x + bcast(c_out, x) * x0


def test_one_phase_is_lcms_loss_bit_for_bit():
    """LCM's Algorithm 1, written out here, gives the method's loss with phases: 1 exactly."""
    _, m = _method(phases=1)
    batch = _batch(m)
    loss = m.loss(batch, "student").loss
    g, x0, cond, t = torch.Generator().manual_seed(4), batch["latents"], batch["cond"], m.teacher
    n = torch.randint(0, 8, (len(x0),), generator=g)
    t_hi, t_lo = m.grid()[n], m.grid()[(n + 1).clamp(max=8)]
    x_hi = t.add_noise(x0, randn(x0.shape, g, x0), t_hi)
    torch.rand(len(x0), generator=g)  # omega's draw (w = 1 here)
    pred = _f(m, m.student.backbone, x_hi, t_hi, cond)
    with torch.no_grad():
        x0_t, eps_t = t.predict(x_hi, t_hi, cond)
        target = _f(m, m.student.target, ddim_step(x0_t, eps_t, *t.alpha_sigma(t_lo)), t_lo, cond)
    assert torch.equal(loss, (pred - target).pow(2).mean())


def test_phases_map_to_their_edges_and_sample_through_them():
    _, m = _method(phases=4)  # 8 grid points, 4 phases of 2, closed by the teacher's clean time
    t, cond = m.teacher, _batch(m, 4)["cond"]
    grid = m.grid()
    assert grid[-1] == t.end_time
    x = torch.randn(4, 2)
    edge = grid[2].expand(4)
    # the boundary condition: at its phase's lower edge f is the identity
    assert torch.allclose(m.consistency_fn(x, edge, cond, m.student.backbone, None, edge), x, atol=1e-5)
    # in the last phase f is the backbone's clean estimate (PCM: no c_skip / c_out)
    x0, _ = t.predict(x, grid[7].expand(4), cond, backbone=m.student.backbone)
    assert torch.allclose(m.consistency_fn(x, grid[7].expand(4), cond, m.student.backbone, None, grid[-1].expand(4)),
                          x0, atol=1e-6)
    # sampling: 4 DDIM steps of the student from edge to edge, computed here by hand
    assert m.sample_times(4) == grid[[0, 2, 4, 6]].tolist() and not m.renoises
    with pytest.raises(DistillError, match="one step per phase, 4 steps"):
        m.sample_times(2)
    ours = m.sample(cond, 4, torch.Generator().manual_seed(9), (2,))
    x = randn((4, 2), torch.Generator().manual_seed(9), "cpu")
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            x0, eps = t.predict(x, grid[i], cond, backbone=m.student.backbone)
            x = ddim_step(x0, eps, *t.alpha_sigma(grid[i + 2]))
    assert torch.allclose(ours, x, atol=1e-6)


def test_the_solver_step_stops_at_the_phase_edge():
    """With skip larger than a phase, the teacher's step ends at the phase's edge, where the target is x itself."""
    _, m = _method(phases=4, skip=3)
    seen = []
    fn = m.consistency_fn
    m.consistency_fn = lambda x, t, *a, **k: seen.append((t.clone(), a[3].clone())) or fn(x, t, *a, **k)
    m.loss(_batch(m), "student")
    (t_hi, edge_hi), (t_lo, edge_lo) = seen
    assert torch.equal(edge_hi, edge_lo) and (t_lo == edge_lo).all() and (t_hi > edge_hi).all()


def test_phases_must_divide_the_grid_and_set_the_step_count():
    with pytest.raises(Exception, match="must divide num_teacher_steps"):
        _method(phases=3)
    with pytest.raises(Exception, match="set sample.steps=2"):
        _method(phases=2)  # sample.steps defaults to 4
