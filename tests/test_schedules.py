"""Schedules and solver steps checked numerically against diffusers' own schedulers."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

from distill.schedules import (flow_alpha_sigma, flow_timesteps, subsample, vp_alpha_sigma, vp_alphas_cumprod,
                               vp_timesteps)
from distill.solvers import consistency_scalings, ddim_step, guidance_embedding, to_x0_eps

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(schedule):
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule).alphas_cumprod
    assert torch.equal(vp_alphas_cumprod(1000, 0.00085, 0.012, schedule), ref)


@pytest.mark.parametrize("n", [1, 4, 25, 50])
def test_vp_grid_is_trailing_ddim_and_lcm_origin(n):
    ddim = DDIMScheduler(**SD, timestep_spacing="trailing")
    ddim.set_timesteps(n)
    assert torch.equal(vp_timesteps(n), ddim.timesteps)
    if 1000 % n == 0:  # LCM's origin grid: (1..n) * 1000/n - 1
        assert vp_timesteps(n).tolist() == list(np.arange(1, n + 1)[::-1] * (1000 // n) - 1)


@pytest.mark.parametrize("n", [1, 2, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_matches_flow_match_euler(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    assert torch.allclose(flow_timesteps(n, shift), sched.timesteps, atol=1e-4)
    assert torch.allclose(flow_alpha_sigma(flow_timesteps(n, shift))[1], sched.sigmas[:-1], atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_ddim_scheduler(prediction_type):
    sched = DDIMScheduler(**SD, timestep_spacing="trailing", prediction_type=prediction_type, set_alpha_to_one=True,
                          clip_sample=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ac = vp_alphas_cumprod()
    ts = sched.timesteps.tolist() + [-1]
    for t, s in zip(ts[:-1], ts[1:]):
        ref = sched.step(out, t, x).prev_sample
        x0, eps = to_x0_eps(out, x, *vp_alpha_sigma(ac, torch.tensor(t)), prediction_type)
        mine = ddim_step(x0, eps, *vp_alpha_sigma(ac, torch.tensor(s)))
        assert torch.allclose(mine, ref, atol=1e-5), (t, (mine - ref).abs().max())
        x = ref


def test_ddim_step_equals_euler_discrete_in_ve_scaling():
    """EulerDiscreteScheduler steps x/alpha in sigma_VE = sigma/alpha; our VP DDIM step is the same move."""
    sched = EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(8)
    ac = vp_alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(1, 4, 8, 8, generator=g)
    x_vp = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps.tolist()):
        a, s = vp_alpha_sigma(ac, torch.tensor(t))
        x_ve = x_vp / a
        ref_ve = sched.step(eps, t, x_ve).prev_sample
        t_next = sched.timesteps[i + 1].item() if i + 1 < len(sched.timesteps) else -1
        a2, s2 = vp_alpha_sigma(ac, torch.tensor(t_next))
        x0, e = to_x0_eps(eps, x_vp, a, s, "epsilon")
        mine = ddim_step(x0, e, a2, s2)
        # Euler's sigma grid is interpolated in log-sigma; at the grid points it is exactly sigma/alpha.
        sig_next = sched.sigmas[i + 1].item()
        if sig_next > 0:
            assert abs(sig_next - (s2 / a2).item()) < 1e-4
        assert torch.allclose(mine / a2, ref_ve, atol=1e-4)
        x_vp = mine


def test_ddim_step_is_flow_match_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(v, t, x).prev_sample
        x0, eps = to_x0_eps(v, x, *flow_alpha_sigma(t), "flow")
        s_next = sched.sigmas[i + 1] * 1000
        mine = ddim_step(x0, eps, *flow_alpha_sigma(s_next))
        assert torch.allclose(mine, ref, atol=1e-5)
        x = ref


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_consistency_grid_and_scalings_match_lcm_scheduler(steps):
    sched = LCMScheduler(**SD, original_inference_steps=50)
    sched.set_timesteps(steps)
    assert subsample(vp_timesteps(50), steps).tolist() == sched.timesteps.tolist()
    for t in [0, 19, 259, 999]:
        c_skip, c_out = consistency_scalings(torch.tensor(t))
        ref = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert abs(c_skip.item() - float(ref[0])) < 1e-7 and abs(c_out.item() - float(ref[1])) < 1e-7
    assert consistency_scalings(torch.tensor(0.0)) == (1.0, 0.0)


def test_guidance_embedding_matches_pipeline():
    w = torch.tensor([2.0, 7.5]) - 1
    ref = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-6)
