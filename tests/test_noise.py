"""--method noise: the noise policy, its tilt target against the analytic one, its control, and its
checkpoint (the frozen denoiser and the noise policy) loaded like any policy."""

import math

import numpy as np
import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import ddpm
from diffusion_policy import rollout as rollout_module
from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.finetune.noise import NoiseConfig, NoiseSteering, tilted_noise_mean
from diffusion_policy.noise_policy import NoisePolicy, NoisePolicyConfig
from diffusion_policy.runtime import UserError
from tests.helpers import interrupted_at_call

LAM = 1.0
CENTRES = torch.tensor([[0.5, -0.5], [1.0, 0.0], [-1.2, 0.6], [3.0, -3.0]])  # the last beyond the bound


def toy_batch(samples, seed):
    """Four states (one-hot conditions), prior noises w (S, M, 1, 2, 1) and the quadratic reward of an
    identity decoder, r = -|w - c_s|^2. The exact tilt N(0, I) exp(LAM r) has mean 2 LAM c / (1 + 2 LAM)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((4, samples, 1, 2, 1), generator=g)
    r = -((w.view(4, samples, 2) - CENTRES[:, None]) ** 2).sum(-1)
    return {"cond": torch.eye(4), "w": w, "r": r}


def test_the_noise_policy_lands_on_the_analytic_tilted_mean_within_its_bound():
    config = NoiseConfig(reward_scale=LAM, num_candidates=8192, batch_states=4, lr=3e-2, hidden=32, bound=1.5)
    net = NoisePolicy(NoisePolicyConfig(4, 1, 2, 1, config.hidden, config.bound, config.spread))
    method = NoiseSteering(config, None, None, net, None, torch.Generator().manual_seed(0))
    batch = method.prepare(toy_batch(8192, seed=1))
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    for i in range(400):
        loss, _ = method.loss(batch, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    analytic = 2 * LAM * CENTRES / (1 + 2 * LAM)
    expected = analytic.clamp(-config.bound, config.bound)  # beyond the bound: held at it
    learned = net(torch.eye(4)).detach().view(4, 2)
    torch.testing.assert_close(learned, expected, atol=0.08, rtol=0)
    assert learned.abs().max() <= config.bound  # tanh: never beyond it (at it in float32 when saturated)


def test_the_controls_expected_target_is_zero_and_the_informed_one_is_the_tilt():
    batch = toy_batch(4096, seed=2)
    informed, _ = tilted_noise_mean(batch["w"], batch["r"], LAM)
    torch.testing.assert_close(informed.view(4, 2)[:3], 2 * LAM * CENTRES[:3] / (1 + 2 * LAM), atol=0.08, rtol=0)
    g = torch.Generator().manual_seed(3)
    draws = [toy_batch(256, seed=100 + i) for i in range(400)]  # fresh prior noises each time, as each iteration
    controls = torch.stack([tilted_noise_mean(b["w"], b["r"], LAM, control=True, generator=g)[0] for b in draws])
    own = torch.stack([tilted_noise_mean(b["w"], b["r"], LAM)[0] for b in draws[:20]])
    # each draw hands every state another state's rewards, never its own
    assert not any(torch.allclose(c.view(4, 2)[s], o.view(4, 2)[s]) for c, o in zip(controls, own) for s in range(4))
    # its expected target is zero (the mean over draws, within its standard error), the informed one's is not
    mean = controls.mean(0).view(4, 2)
    assert (mean.abs() < 4 * controls.view(400, 8).std(0).view(4, 2) / 20).all()
    assert mean.abs().max() < 0.05 and informed.abs().max() > 0.6


def tiny_policy():
    from diffusion_policy.model import UNetConfig
    from diffusion_policy.normalizer import MinMaxNormalizer
    from diffusion_policy.policy import DiffusionPolicy, PolicyConfig

    torch.manual_seed(0)
    norm = MinMaxNormalizer(torch.zeros(20), torch.ones(20))
    return DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16),
                           ddpm.SamplerConfig(num_inference_steps=4), norm,
                           MinMaxNormalizer(torch.zeros(2), torch.ones(2) * 512)).eval()


def test_an_untrained_noise_policy_is_the_pre_trained_sampler_and_a_trained_one_feeds_it():
    policy = tiny_policy()
    cond = torch.rand(5, 40)
    net = NoisePolicy(NoisePolicyConfig(40, 4, 16, 2, hidden=8))
    policy.attach_noise_policy(net)
    steered = policy.sample(cond, generator=torch.Generator().manual_seed(7))
    plain = policy.sample(cond, noise=torch.randn((5, 5, 16, 2), generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(steered, plain, rtol=0, atol=0)  # mean 0, spread 1: N(0, I), draw for draw
    with torch.no_grad():
        net.net[-1].bias.fill_(0.3)
    noise = net.draw(cond, torch.Generator().manual_seed(7))
    assert torch.allclose(noise[:4] - torch.randn((5, 5, 16, 2), generator=torch.Generator().manual_seed(7))[:4],
                          torch.full((4, 5, 16, 2), 1.5 * math.tanh(0.3)))
    torch.testing.assert_close(policy.sample(cond, generator=torch.Generator().manual_seed(7)),
                               policy.sample(cond, noise=noise), rtol=0, atol=0)
    with pytest.raises(ValueError, match="steers 4 sampler steps"):
        policy.sample(cond, num_inference_steps=2)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_policy().attach_noise_policy(NoisePolicy(NoisePolicyConfig(40, 4, 8, 2)))


def noise_argv(root, name, *extra):
    return ["--method", "noise", "--num_ft_iters", "2", "--num_eps", "2", "--num_candidates", "3", "--lr", "1e-2",
            "--reward_scale", "30", "--warmup_steps", "1", "--max_steps", "16",
            "--noise_pred_model_path", str(root / "policy.ckpt"), "--reward_model_path", str(root / "reward.ckpt"),
            "--output", str(root / f"{name}.ckpt"), "--run_dir", str(root / name), *extra]


@pytest.mark.usefixtures("small_finetune")
def test_the_steered_checkpoint_holds_the_frozen_denoiser_loads_like_any_policy_and_resumes(tiny_models, monkeypatch):
    root = tiny_models
    out = reward_finetuning.main(reward_finetuning.parse_args(noise_argv(root, "noise", "--tilt_every", "1")))
    ckpt, base = load_checkpoint(out["output"], "policy"), load_checkpoint(str(root / "policy.ckpt"), "policy")
    assert ckpt["provenance"]["method"] == "noise" and ckpt["noise_policy"]["config"]["num_noises"] == 4
    for slot in ("model_state_dict", "ema_model_state_dict"):  # the denoiser is the pre-trained one, bit for bit
        assert all(torch.equal(ckpt[slot][k], base["ema_model_state_dict"][k]) for k in ckpt[slot])
    assert any(v.abs().max() > 0 for k, v in ckpt["noise_policy"]["state_dict"].items() if k.startswith("net.4"))
    policy = policy_from_checkpoint(ckpt)
    for k, v in ckpt["noise_policy"]["state_dict"].items():
        assert torch.equal(policy.noise_policy.state_dict()[k], v)

    # it acts with its noise policy: the same draws fed to the plain denoiser give the same chunk
    obs = torch.rand(3, 2, 20) * 100
    cond = policy.obs_cond(obs)
    noise = policy.noise_policy.draw(cond, torch.Generator().manual_seed(1))
    acted = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))["action_pred_norm"]
    torch.testing.assert_close(acted, policy_from_checkpoint(base).sample(cond, noise=noise), rtol=0, atol=0)
    result = evaluate_policy.main(evaluate_policy.parse_args([
        "--model_path", out["output"], "--num_eps", "2", "--max_steps", "8", "--output", str(root / "ne" / "e.json")]))
    assert result["num_eps"] == 2
    with pytest.raises(UserError, match="noise policy steers its own sampler"):
        policy_from_checkpoint(ckpt, sampler="ddim")
    with pytest.raises(UserError, match="steered by a noise policy"):  # another method would drop it
        reward_finetuning.main(reward_finetuning.parse_args(
            noise_argv(root, "w_on_noise", "--noise_pred_model_path", out["output"])[2:] + ["--method", "weighted"]))

    # interrupted in iteration 2 and resumed: the same noise policy as a run left alone
    straight = reward_finetuning.main(reward_finetuning.parse_args(noise_argv(root, "na")))
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 2):
        reward_finetuning.main(reward_finetuning.parse_args(noise_argv(root, "nb")))
    resumed = reward_finetuning.main(reward_finetuning.parse_args(noise_argv(root, "nb", "--resume")))
    a, b = (load_checkpoint(r["output"], "policy")["noise_policy"]["state_dict"] for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a later round continues the noise policy it starts from
    second = reward_finetuning.main(reward_finetuning.parse_args(
        noise_argv(root, "round2", "--noise_pred_model_path", out["output"], "--num_ft_iters", "1")))
    assert second["output"] and np.isfinite(second["loss"])


def test_noise_settings_check_themselves():
    with pytest.raises(ValueError, match="keeps no EMA"):
        NoiseConfig(ema_decay=0.9)
    with pytest.raises(ValueError, match="spread must be > 0"):
        NoiseConfig(spread=0.0)
    with pytest.raises(ValueError, match="bound must be > 0"):
        NoiseConfig(bound=-1.0)
