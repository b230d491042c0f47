"""The noise model, the DDPM sampler against diffusers, the policy and its checkpoints."""

import os

import pytest
import torch

from diffusion_policy import ddpm
from diffusion_policy.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_policy,
    policy_checkpoint,
    policy_from_checkpoint,
    save_checkpoint,
)
from diffusion_policy.ema import EMA
from diffusion_policy.model import ConditionalUnet1D, Mish, UNetConfig, mish
from diffusion_policy.policy import PolicyConfig
from diffusion_policy.common.stats import mean_ci, wilson_ci
from tests.helpers import tiny_policy

TINY = dict(down_dims=(16, 32), diffusion_step_embed_dim=16)


def make_policy(num_inference_steps=5, seed=0):
    return tiny_policy(TINY["down_dims"], TINY["diffusion_step_embed_dim"], num_inference_steps, seed=seed)


# ----------------------------------------------------------------------------------------
# the noise model
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("down_dims", [(16,), (16, 32), (16, 32, 64)])
def test_unet_shapes(down_dims):
    model = ConditionalUnet1D(UNetConfig(down_dims=down_dims, diffusion_step_embed_dim=16))
    x = torch.randn(3, 16, 2)
    out = model(x, torch.tensor([0, 50, 99]), torch.randn(3, 40))
    assert out.shape == (3, 16, 2)
    assert model(x, 7, torch.randn(3, 40)).shape == (3, 16, 2)  # a scalar timestep broadcasts


def test_unet_prediction_depends_on_observation_and_timestep():
    model = ConditionalUnet1D(UNetConfig(**TINY)).eval()
    x, t, cond = torch.randn(4, 16, 2), torch.full((4,), 30), torch.randn(4, 40)
    base = model(x, t, cond)
    assert (model(x, t, cond + 1.0) - base).abs().max() > 1e-4
    assert (model(x, t + 40, cond) - base).abs().max() > 1e-4
    # each sample is conditioned on its own row only
    other = cond.clone()
    other[1:] += 1.0
    torch.testing.assert_close(model(x, t, other)[0], base[0])


def test_mish_is_torchs_mish_to_float_rounding_and_differentiable():
    """Against float64 Mish across the range and its extremes, never overwriting its input; the same
    bits with autograd as without (a model scores the same either way); its first and second
    derivatives checked by finite differences (gradcheck, gradgradcheck) and close to torch's."""
    x = torch.cat([torch.linspace(-120.0, 120.0, 200_001), torch.tensor([-1e4, -88.0, -20.0, 0.0, 19.99, 20.0, 20.01, 1e4])])
    exact = torch.nn.functional.mish(x.double())
    kept = x.clone()
    with torch.no_grad():
        ours = mish(x)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    err = ((ours.double() - exact).abs() / exact.abs().clamp_min(1e-30))[exact.abs() > 1e-30]
    assert err.max() < 5e-7  # torch's own float32 kernel: the same bound
    assert (ours.double() - exact).abs().max() < 2e-6  # and where Mish is tiny, tiny
    with_grad = mish(x.clone().requires_grad_(True))
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), ours)

    y = (torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6).requires_grad_(True)
    assert torch.autograd.gradcheck(mish, (y,)) and torch.autograd.gradgradcheck(mish, (y,))
    z = torch.linspace(-30, 30, 2001, requires_grad=True)
    (ours_grad,) = torch.autograd.grad(mish(z).sum(), z)
    zd = z.detach().double().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(torch.nn.functional.mish(zd).sum(), zd)
    assert (ours_grad.double() - exact_grad).abs().max() < 2e-6


def test_the_unets_call_with_our_mish_equals_torchs_and_old_checkpoints_load():
    """The sampled chunk with the UNet's Mish equals the same UNet with torch's nn.Mish, same noise;
    a state dict of nn.Mish modules (as written before) loads into it: Mish has no parameters."""
    from benchmarks.call_cost import with_torch_mish

    policy = tiny_policy()
    policy.eval()
    assert sum(isinstance(m, Mish) for m in policy.model.modules()) > 10
    reference = with_torch_mish(policy.model)
    assert not any(isinstance(m, Mish) for m in reference.modules())
    cond, noise = torch.randn(8, 40), torch.randn(policy.sampler_config.num_inference_steps + 1, 8, 16, 2)
    with torch.no_grad():
        torch.testing.assert_close(policy.sample(cond, noise=noise), policy.sample(cond, noise=noise, model=reference),
                                   rtol=0, atol=1e-5)
    fresh = ConditionalUnet1D(policy.model.config)
    fresh.load_state_dict(reference.state_dict(), strict=True)


def test_unet_config_validates_itself():
    with pytest.raises(ValueError, match="divisible by n_groups"):
        UNetConfig(down_dims=(12, 24))
    with pytest.raises(ValueError, match="odd"):
        UNetConfig(kernel_size=4)
    with pytest.raises(ValueError, match="at least one"):
        UNetConfig(down_dims=())
    with pytest.raises(ValueError, match="executed window"):
        PolicyConfig(obs_horizon=2, pred_horizon=8, action_horizon=8)
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        ddpm.SamplerConfig(beta_schedule="linear")


# ----------------------------------------------------------------------------------------
# the sampler against diffusers
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [10, 16, 100])
def test_sampler_equals_diffusers_ddpm_step_on_the_same_noise(K, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="epsilon", variance_type="fixed_small")
    scheduler.set_timesteps(K)
    abar = ddpm.alphas_cumprod(100)
    torch.testing.assert_close(abar, scheduler.alphas_cumprod, rtol=0, atol=0)
    timesteps, prev = ddpm.inference_timesteps(100, K)
    assert torch.equal(timesteps, scheduler.timesteps)

    g = torch.Generator().manual_seed(K)
    shape = (4, 16, 2)
    noise = torch.randn((K + 1, *shape), generator=g)
    weight = torch.randn(2, 2, generator=g) * 3  # a noise predictor that pushes x0 past the clip range

    def eps_fn(x, t):
        return torch.tanh(x @ weight + t[:, None, None].float() / 100) * 2

    ours, trajectory = ddpm.sample(eps_fn, shape, abar, timesteps, prev, noise=noise, return_trajectory=True)
    x = noise[0]
    for k, t in enumerate(scheduler.timesteps):
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, _z=noise[k + 1], **kw: _z.clone())
        x = scheduler.step(eps_fn(x, t.expand(4)), t, x).prev_sample
        torch.testing.assert_close(trajectory[k + 1], x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("K", [10, 16, 100])
def test_ddim_equals_diffusers_ddim_step_on_the_same_noise(K):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="epsilon", set_alpha_to_one=True, timestep_spacing="leading")
    scheduler.set_timesteps(K)
    abar = ddpm.alphas_cumprod(100)
    timesteps, prev = ddpm.inference_timesteps(100, K)
    assert torch.equal(timesteps, scheduler.timesteps)
    g = torch.Generator().manual_seed(K)
    shape = (4, 16, 2)
    x_K = torch.randn(shape, generator=g)
    weight = torch.randn(2, 2, generator=g) * 3  # pushes x0 past the clip range, so the clamp is exercised

    def eps_fn(x, t):
        return torch.tanh(x @ weight + t[:, None, None].float() / 100) * 2

    ours, trajectory = ddpm.sample(eps_fn, shape, abar, timesteps, prev, noise=x_K, return_trajectory=True,
                                   sampler="ddim")
    x = x_K
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(eps_fn(x, t.expand(4)), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(trajectory[k + 1], x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


def test_ddim_chunk_is_a_function_of_the_initial_noise_and_noise_scale_scales_it():
    policy = make_policy(num_inference_steps=5)
    cond = torch.randn(3, 40)
    ddim = policy_from_checkpoint(policy_checkpoint(policy), sampler="ddim")
    w = torch.randn(3, 16, 2)
    # DDIM: the initial noise alone fixes the chunk, whatever the generator
    torch.testing.assert_close(ddim.sample(cond, noise=w, generator=torch.Generator().manual_seed(1)),
                               ddim.sample(cond, noise=w, generator=torch.Generator().manual_seed(2)), rtol=0, atol=0)
    assert (policy.sample(cond, noise=w, generator=torch.Generator().manual_seed(1))
            - policy.sample(cond, noise=w, generator=torch.Generator().manual_seed(2))).abs().max() > 1e-3
    # noise_scale s: the drawn x_K is s times the unit draw of the same generator
    for s in (0.0, 0.5):
        cold = policy_from_checkpoint(policy_checkpoint(policy), sampler="ddim", noise_scale=s)
        assert cold.sampler_config.noise_scale == s
        _, traj, _ = cold.sample(cond, generator=torch.Generator().manual_seed(3), return_trajectory=True)
        unit = torch.randn((3, 16, 2), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(traj[0], s * unit, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        ddpm.SamplerConfig(sampler="euler")


def test_step_mean_and_std_are_the_written_formulas():
    abar = ddpm.alphas_cumprod(100)
    t, tp = abar[60], abar[50]
    x, eps = torch.randn(3, 16, 2) * 0.3, torch.randn(3, 16, 2) * 0.3
    x0 = (x - (1 - t).sqrt() * eps) / t.sqrt()
    a, b = t / tp, 1 - t / tp
    mu = tp.sqrt() * b / (1 - t) * x0.clamp(-1, 1) + a.sqrt() * (1 - tp) / (1 - t) * x
    torch.testing.assert_close(ddpm.step_mean(eps, x, t, tp), mu)
    torch.testing.assert_close(ddpm.step_std(t, tp), ((1 - tp) / (1 - t) * b).sqrt())
    assert ddpm.step_std(abar[0], torch.tensor(1.0)) == 0


def test_sampling_noise_generator_and_trajectory():
    policy = make_policy(num_inference_steps=5)
    cond = torch.randn(3, 40)
    a = policy.sample(cond, generator=torch.Generator().manual_seed(1))
    b = policy.sample(cond, generator=torch.Generator().manual_seed(1))
    c = policy.sample(cond, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    noise = torch.randn(6, 3, 16, 2)
    x0, trajectory, timesteps = policy.sample(cond, noise=noise, return_trajectory=True)
    assert trajectory.shape == (6, 3, 16, 2) and timesteps.tolist() == [80, 60, 40, 20, 0]
    torch.testing.assert_close(trajectory[0], noise[0])
    torch.testing.assert_close(trajectory[-1], x0)
    torch.testing.assert_close(policy.sample(cond, noise=noise), x0)
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.sample(cond, noise=torch.randn(2, 16, 2))


def test_predict_action_executes_the_window_after_the_current_observation():
    policy = make_policy()
    obs = torch.rand(2, 2, 20) * 512
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (2, 16, 2) and out["action"].shape == (2, 8, 2)
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:9])
    torch.testing.assert_close(policy.action_normalizer.normalize(out["action_pred"]), out["action_pred_norm"])
    with pytest.raises(ValueError, match="obs_history"):
        policy.predict_action(torch.zeros(2, 3, 20))


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
def test_checkpoint_round_trip_reproduces_actions_exactly(tmp_path):
    policy = make_policy()
    ema = EMA(policy.model)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01)  # live weights differ from the EMA copy
    path = tmp_path / "p.ckpt"
    save_checkpoint(policy_checkpoint(policy, ema.model, provenance={"note": "test"}), path)
    raw = torch.load(path, weights_only=True)  # loads with the safe loader
    assert raw["kind"] == "policy" and raw["format_version"] == 1 and raw["config"]["model"]["down_dims"] == [16, 32]
    obs = torch.rand(3, 2, 20) * 512

    reference = policy_from_checkpoint(policy_checkpoint(policy, ema.model))
    loaded = load_policy(str(path))
    a = reference.predict_action(obs, generator=torch.Generator().manual_seed(5))["action_pred"]
    b = loaded.predict_action(obs, generator=torch.Generator().manual_seed(5))["action_pred"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the EMA weights are what loads by default; the live ones on request
    live = load_policy(str(path), use_ema=False)
    torch.testing.assert_close(live.model.state_dict()["final_conv.1.bias"],
                               policy.model.state_dict()["final_conv.1.bias"])
    assert load_policy(str(path), num_inference_steps=3).sampler_config.num_inference_steps == 3


def test_wrong_checkpoint_kind_is_refused_naming_both(tmp_path):
    path = tmp_path / "reward.ckpt"
    save_checkpoint({"format_version": 1, "kind": "reward", "config": {}}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(path), "policy")
    assert "'reward'" in str(err.value) and "'policy'" in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.ckpt"), "policy")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project") as err:
        load_checkpoint(str(tmp_path / "junk.ckpt"), "policy")
    assert "weights_only" not in str(err.value)  # torch's advice is not the fix here


def test_non_finite_weights_never_overwrite_a_checkpoint(tmp_path):
    """The divergence guard of last resort: a diverged update's weights are refused, the file kept."""
    policy = tiny_policy(high=1.0)
    path = tmp_path / "latest.ckpt"
    save_checkpoint(policy_checkpoint(policy), path)
    good = path.read_bytes()
    with torch.no_grad():
        next(policy.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite values"):
        save_checkpoint(policy_checkpoint(policy), path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["latest.ckpt"]


def test_ema_decay_schedule_and_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, power=0.75)
    assert ema.decay(0) == 0.0
    assert ema.decay(100) == pytest.approx(1 - 101 ** -0.75)
    assert ema.decay(10**9) == 0.9999
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0)  # decay 0: copies
    torch.testing.assert_close(ema.model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 100)
    d = 1 - 101 ** -0.75
    torch.testing.assert_close(ema.model.weight, torch.full((2, 2), d * 1.0 + (1 - d) * 3.0))


def test_confidence_intervals():
    rate, lo, hi = wilson_ci(16, 100)
    assert rate == 0.16 and lo == pytest.approx(0.1007, abs=1e-3) and hi == pytest.approx(0.2440, abs=1e-3)
    mean, lo, hi = mean_ci([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and lo == 0.0 and hi == 1.0  # clipped to the metric's [0, 1]
    mean, lo, hi = mean_ci([0.0, 1.0, 0.0, 1.0], bounds=None)
    assert lo == pytest.approx(0.5 - 1.96 * 0.57735 / 2, abs=1e-3) and hi == pytest.approx(0.5 + 1.96 * 0.57735 / 2, abs=1e-3)
    assert mean_ci([0.9, 0.9, 0.9])[1:] == (0.9, 0.9)


def test_constant_decay_ema_starts_from_the_initial_weights():
    # fine-tuning's --ema_decay: power 0 means the decay is max_decay from the first update on,
    # so the average starts at the pre-trained weights instead of copying the first update
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, power=0.0, max_decay=0.9)
    assert ema.decay(0) == ema.decay(1) == ema.decay(10**6) == 0.9
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 1)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 2), 0.9 * 1.0 + 0.1 * 3.0))
