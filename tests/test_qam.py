"""--method qam: Adjoint Matching toward a chunk critic, against the analytic tilt and by hand."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import rollout as rollout_module
from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.env import PushTEnv
from diffusion_policy.finetune.critic import TDCritic, nstep_targets, shaped_rewards
from diffusion_policy.finetune.qam import QAM, QAMConfig
from diffusion_policy.policy import DiffusionPolicy
from diffusion_policy.residual_policy import FrameValue, ResidualDiffusionPolicy, critic_from_checkpoint
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.sources import CriticValue, StepCriticValue, make_source
from tests.helpers import interrupted_at_call
from tests.test_gate import dynamics_reward  # noqa: F401 (a fixture)
from tests.test_adjoint_matching import GOAL, LAM_QUAD, RHO, fine_tune, quadratic_target

SMALL = ["--method", "qam", "--num_ft_iters", "3", "--num_eps", "2", "--grad_steps_per_iter", "4", "--batch_size", "8",
         "--buffer_size", "64", "--warmup_iters", "1", "--am_every", "2", "--am_batch", "4", "--warmup_steps", "1",
         "--lr", "1e-3", "--max_steps", "24", "--hidden_dims", "32", "32"]


def run(root, name, *extra):
    return reward_finetuning.main(reward_finetuning.parse_args([
        *SMALL, "--noise_pred_model_path", str(root / "policy.ckpt"), "--reward_model_path", str(root / "reward.ckpt"),
        "--output", str(root / f"{name}.ckpt"), "--run_dir", str(root / f"{name}_run"), *extra]))


# ---- the analytic case: a quadratic Q on a Gaussian base ---------------------------------------
class QuadraticCritic(torch.nn.Module):
    """Two identical heads Q(cond, a) = -|a - GOAL|^2 / (2 rho^2): the exact tilt p_base exp(lam Q) of the
    Gaussian base is the Gaussian that test_adjoint_matching's quadratic reward tilts to."""

    shape = {"cond_dim": 1, "exec_dim": 8}

    def forward(self, cond, act):
        q = -((act - GOAL.to(act.dtype)) ** 2).flatten(1).sum(1) / (2 * RHO**2)
        return torch.stack([q, q])


class WholeChunk:
    """A policy whose call executes its whole (4, 2) chunk, with a one-number window: what CriticValue needs."""

    config = SimpleNamespace(obs_horizon=1, obs_dim=1, action_horizon=4, action_dim=2)
    device = torch.device("cpu")

    def obs_cond(self, obs):
        return obs.flatten(1)

    def executed(self, x):
        return x[:, :4]


@pytest.fixture(scope="module")
def moments():
    from tests.test_adjoint_matching import base_moments
    return base_moments()


def test_a_quadratic_q_gives_the_exact_gradient_and_the_fine_tuned_sampler_reaches_the_gaussian_tilt(moments):
    """QAM's terminal adjoint is -lam grad Q by CriticValue (the source --method qam climbs); with it the
    library's Adjoint Matching lands on the analytic tilt of the Gaussian base, as with a reward."""
    source = CriticValue(QuadraticCritic(), WholeChunk())
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    q, grad = source.reward_and_grad(torch.zeros(5, 1, 1, dtype=torch.float64), x)
    torch.testing.assert_close(grad, -(x - GOAL) / RHO**2)
    torch.testing.assert_close(q, -((x - GOAL) ** 2).flatten(1).sum(1) / (2 * RHO**2))

    def grad_q(x0):
        return source.reward_and_grad(torch.zeros(len(x0), 1, 1, dtype=x0.dtype), x0)[1]

    target_mean, target_var = quadratic_target(*moments)
    mean, var = fine_tune(grad_q, LAM_QUAD)
    assert (mean - target_mean).abs().max() < 0.03, (mean, target_mean)
    assert torch.allclose(var, target_var, rtol=0.1), (var, target_var)


# ---- the method on a tiny policy --------------------------------------------------------------
def make_method(root, control=False, reward="reward.ckpt", **overrides):
    base = policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy"))
    cfg = QAMConfig(**{"num_ft_iters": 3, "num_eps": 2, "grad_steps_per_iter": 4, "batch_size": 8, "buffer_size": 256,
                       "warmup_iters": 0, "am_every": 2, "am_batch": 4, "hidden_dims": (32, 32), **overrides})
    ft = QAM.make_policy(base, cfg)
    gen = torch.Generator().manual_seed(0)
    source = make_source("model", ft, load_reward_model(str(root / reward)), gen)
    return QAM(cfg, base, ft, ft.model, source, gen, control=control), cfg


def test_collection_stores_the_executed_chunks_with_their_shaped_n_step_returns(tiny_models):
    method, cfg = make_method(tiny_models)
    seeds = [300000, 300001]
    calls_seen = {}
    original = rollout_module.rollout

    def spy(*args, **kwargs):
        calls_seen["res"] = res = original(*args, **kwargs)
        return res

    rollout_module.rollout = spy
    try:
        batch, metrics = method.collect(seeds, 48)
    finally:
        rollout_module.rollout = original
    res = calls_seen["res"]
    calls = res["calls"]
    x0 = torch.from_numpy(calls["trajectory"][:, :, -1])  # the clean chunk of every call's chain
    executed = x0[:, :, 1:9]  # obs_horizon 2: a call executes steps 1..8 of its chunk
    values = method.source.reward(torch.from_numpy(calls["obs"]).flatten(0, 1), x0.flatten(0, 1)).view(2, -1).numpy()
    buf = method.td.buffer
    rows = 0
    for i in range(2):  # by hand: the episode's shaped rewards, n-step returns, next calls
        L = int(calls["active"][i].sum())
        assert res["steps_to_success"][i] < 0  # a random tiny policy: both episodes run out of time
        r = shaped_rewards(values[i, :L], calls["reward_before"][i, 0], np.zeros(L, bool), cfg.gamma)
        idx, ret, disc, nxt = nstep_targets(r, None, cfg.gamma, cfg.n_step)
        sl = slice(rows, rows + len(idx))
        np.testing.assert_allclose(buf.data["ret"][sl].numpy(), ret, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(buf.data["disc"][sl].numpy(), disc, rtol=1e-6)
        torch.testing.assert_close(buf.data["act"][sl], executed[i, idx])
        torch.testing.assert_close(buf.data["base"][sl], executed[i, idx])
        torch.testing.assert_close(buf.data["next_base"][sl], executed[i, nxt])  # what the policy did next
        torch.testing.assert_close(buf.data["cond"][sl], torch.from_numpy(calls["obs_cond"][i, idx]))
        rows += len(idx)
    assert buf.size == rows == metrics["buffer_size"]
    assert batch["traj"].shape[1] == int(calls["active"].sum())  # every chain made before success


def test_the_terminal_adjoint_is_minus_lambda_times_the_target_critics_gradient(tiny_models):
    method, cfg = make_method(tiny_models, reward_scale=7.0)
    with torch.no_grad():  # a critic whose gradient is far from zero
        for p in method.td.target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    batch, _ = method.collect([300000, 300001], 48)
    prepared = method.prepare(batch)
    x0 = prepared["traj"][-1].detach().requires_grad_(True)
    cond = method.ft.obs_cond(prepared["obs"])
    q = method.td.target(cond, x0[:, 1:9]).mean(0)  # by hand: the targets' mean on the executed steps
    (grad,) = torch.autograd.grad(q.sum(), x0)
    torch.testing.assert_close(prepared["terminal"], -7.0 * grad)
    assert prepared["terminal"][:, 1:9].abs().max() > 0 and prepared["terminal"][:, [0, 9, 15]].abs().max() == 0
    assert prepared["traj"].shape[1] == min(batch["traj"].shape[1], method.loss_updates() * cfg.am_batch)


def test_the_backup_is_the_ensembles_mean_less_its_spread_or_its_minimum():
    for pessimism, expected in ((0.5, 2.0 - 0.5 * 1.0), (None, 1.0), (0.0, 2.0)):
        td = TDCritic(3, (2, 2), (8,), 2, 16, 0.1, torch.device("cpu"), backup_pessimism=pessimism)
        with torch.no_grad():
            for head, level in zip(td.target.heads, (1.0, 3.0)):  # the target heads value everything at 1 and 3
                head[-1].weight.zero_()
                head[-1].bias.fill_(level)
        b = {"ret": torch.tensor([0.5, -1.0]), "disc": torch.tensor([0.81, 0.0]), "next_cond": torch.zeros(2, 3)}
        target = td.td_target(b, torch.zeros(2, 2, 2))
        torch.testing.assert_close(target, torch.tensor([0.5 + 0.81 * expected, -1.0]))


def test_the_controls_critic_targets_carry_no_information_about_the_chunks_own_return(tiny_models):
    method, cfg = make_method(tiny_models, control=True)
    assert method.shuffle_gradients is False  # the control's information is taken out of the critic, once
    with torch.no_grad():
        for head in method.td.target.heads:
            head[-1].weight.zero_()
            head[-1].bias.fill_(5.0)
    success = torch.arange(64) % 4 == 0
    b = {"ret": torch.arange(64, dtype=torch.float32), "disc": torch.where(success, 0.0, 0.729),
         "next_cond": torch.zeros(64, method.td.critic.shape["cond_dim"]), "next_base": torch.zeros(64, 8, 2)}
    plain = method.td.td_target(b, b["next_base"])
    targets = torch.stack([method.td.td_target(b, b["next_base"], True, method.generator) for _ in range(2000)])
    for t in targets[:20]:  # a permutation of the plain targets: each return with its own factor
        torch.testing.assert_close(t.sort().values, plain.sort().values)
    assert abs(np.corrcoef(targets.flatten().numpy(), b["ret"].repeat(2000).numpy())[0, 1]) < 0.02
    assert abs(np.corrcoef(targets.flatten().numpy(), success.float().repeat(2000).numpy())[0, 1]) < 0.02


def test_a_run_writes_a_plain_diffusion_policy_that_evaluates_and_carries_its_critic(tiny_models):
    root = tiny_models
    out = run(root, "qam")
    rows = [json.loads(line) for line in open(root / "qam_run" / "metrics.jsonl")]
    trained = [r for r in rows if "am_loss" in r]
    assert trained and all("critic_loss" in r for r in rows if "loss" in r)
    ckpt = load_checkpoint(out["output"], "policy")
    assert "residual" not in ckpt and ckpt["provenance"]["config"]["method"] == "qam"
    policy = policy_from_checkpoint(ckpt)
    assert type(policy) is DiffusionPolicy and not isinstance(policy, ResidualDiffusionPolicy)
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")
    moved = [k for k in base["ema_model_state_dict"]
             if not torch.equal(base["ema_model_state_dict"][k], ckpt["ema_model_state_dict"][k])]
    assert moved  # the denoiser itself was fine-tuned
    critic = critic_from_checkpoint(ckpt, out["output"])
    assert critic.shape["num_critics"] == QAMConfig.num_critics and critic.shape["exec_dim"] == 16
    ev = evaluate_policy.main(evaluate_policy.parse_args(["--model_path", out["output"], "--num_eps", "2",
                                                         "--max_steps", "8", "--output", str(root / "qev" / "e.json")]))
    assert ev["num_eps"] == 2


@pytest.mark.parametrize("extra", [[], ["--correction_dims", "16"]], ids=["unet", "correction"])
def test_resume_gives_the_same_denoiser_and_critic(tiny_models, monkeypatch, extra):
    root, name = tiny_models, "qam" + ("c" if extra else "")
    straight = run(root, f"{name}_a", "--reward_source", "simulator", *extra)
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(root, f"{name}_b", "--reward_source", "simulator", *extra)
    resumed = run(root, f"{name}_b", "--reward_source", "simulator", *extra, "--resume")
    a, b = load_checkpoint(straight["output"], "policy"), load_checkpoint(resumed["output"], "policy")
    assert set(a["ema_model_state_dict"]) == set(b["ema_model_state_dict"])
    for key in a["ema_model_state_dict"]:
        torch.testing.assert_close(a["ema_model_state_dict"][key], b["ema_model_state_dict"][key], rtol=0, atol=0)
    for key in a["critic"]["state_dict"]:
        torch.testing.assert_close(a["critic"]["state_dict"][key], b["critic"]["state_dict"][key], rtol=0, atol=0)


def test_a_pessimistic_gradient_climbs_where_the_critics_agree():
    """Two critics agree along the first entry and disagree along the second: the mean's gradient has both,
    the mean - 1 x std (--grad_pessimism 1: the minimum of two) the first alone."""

    class TwoCritics(torch.nn.Module):
        shape = {"cond_dim": 1, "exec_dim": 8}

        def forward(self, cond, act):
            a = act.flatten(1)
            return torch.stack([a[:, 0] + a[:, 1], a[:, 0] - a[:, 1]])

    x = torch.zeros(3, 4, 2)
    plain = CriticValue(TwoCritics(), WholeChunk()).reward_and_grad(torch.zeros(3, 1, 1), x)[1]
    torch.testing.assert_close(plain[:, 0, 0], torch.ones(3))
    x = torch.full((3, 4, 2), 0.1)  # away from the tie: the upper critic's second entry counts +, the lower's -
    pess = CriticValue(TwoCritics(), WholeChunk(), pessimism=1.0).reward_and_grad(torch.zeros(3, 1, 1), x)[1]
    torch.testing.assert_close(pess[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(pess[:, 0, 1], -torch.ones(3))  # min(a0 + a1, a0 - a1) = a0 - |a1|: pushed to 0
    assert plain[:, 0, 1].abs().max() == 0


# ---- QAM's correction option: a small MLP added to the frozen UNet ----------------------------------
def test_a_fresh_correction_leaves_the_unet_bit_for_bit_and_only_it_takes_gradients(tiny_models):
    base = policy_from_checkpoint(load_checkpoint(str(tiny_models / "policy.ckpt"), "policy"))
    ft = QAM.make_policy(base, QAMConfig(correction_dims=(16, 16)))
    x, t = torch.randn(5, 16, 2), torch.tensor([0, 3, 50, 99, 7])
    cond = torch.randn(5, base.config.obs_horizon * base.config.obs_dim)
    assert torch.equal(ft.model(x, t, cond), base.model(x, t, cond))  # zero at the start, exactly
    trainable = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("correction.") for n in trainable)
    ft.model(x, t, cond).square().sum().backward()
    assert all(p.grad is None for n, p in ft.model.named_parameters() if not n.startswith("correction."))
    assert ft.model.correction.net[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads chunks of 16 steps"):
        ft.model(torch.randn(5, 8, 2), t, cond)


def test_a_policy_without_a_correction_writes_the_config_it_always_wrote(tiny_models):
    ckpt = load_checkpoint(str(tiny_models / "policy.ckpt"), "policy")
    policy = policy_from_checkpoint(ckpt)
    assert set(policy.unet_config.to_dict()) == set(ckpt["config"]["model"])
    assert "correction_dims" not in policy.unet_config.to_dict() and policy.model.correction is None


def test_a_run_with_a_correction_keeps_the_base_unet_and_writes_a_plain_policy_that_evaluates(tiny_models):
    root = tiny_models
    out = run(root, "qam_corr", "--correction_dims", "16")
    ckpt = load_checkpoint(out["output"], "policy")
    assert ckpt["config"]["model"]["correction_dims"] == [16] and ckpt["config"]["model"]["correction_horizon"] == 16
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")["ema_model_state_dict"]
    weights = ckpt["ema_model_state_dict"]
    for key in base:  # the UNet is the base's, bit for bit
        assert torch.equal(base[key], weights[key]), key
    assert weights["correction.net.2.weight"].abs().sum() > 0  # the correction's last layer moved off zero
    policy = policy_from_checkpoint(ckpt)
    assert type(policy) is DiffusionPolicy and policy.model.correction is not None
    obs = torch.randn(3, policy.config.obs_horizon, policy.config.obs_dim)
    noise = torch.randn(policy.sampler_config.num_inference_steps + 1, 3, 16, 2)
    plain = policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy"))
    assert not torch.equal(policy.predict_action(obs, noise=noise)["action"], plain.predict_action(obs, noise=noise)["action"])
    ev = evaluate_policy.main(evaluate_policy.parse_args(["--model_path", out["output"], "--num_eps", "2",
                                                         "--max_steps", "8", "--output", str(root / "qcev" / "e.json")]))
    assert ev["num_eps"] == 2


def test_tilt_value_draws_the_adjoint_matching_chains_only_where_the_frame_value_reaches_the_level(
        tiny_models, dynamics_reward):
    probe, _ = make_method(tiny_models, reward=dynamics_reward.name)
    batch, _ = probe.collect([300000, 300001, 300002], 48)
    values = FrameValue.of(load_reward_model(str(dynamics_reward)))(batch["obs"][:, -1])
    level = float(values.median())
    gated = values >= level
    assert 0 < int(gated.sum()) < len(values)  # the level splits the calls
    method, cfg = make_method(tiny_models, reward=dynamics_reward.name, tilt_value=level, am_batch=64)
    method.iteration = 1  # past warm-up: the batch is this run's first iteration
    prepared = method.prepare(batch)
    assert prepared["tilt_chains"] == int(gated.sum())
    chosen = prepared["traj"][-1]  # every gated chain (am_updates x am_batch is more than there are), and no other
    assert chosen.shape[0] == int(gated.sum())
    by_hand = batch["traj"][-1][gated]
    assert sorted(map(tuple, chosen.flatten(1).tolist())) == sorted(map(tuple, by_hand.flatten(1).tolist()))
    # a level no call reaches: no Adjoint Matching this iteration, the critic trains alone
    method, _ = make_method(tiny_models, reward=dynamics_reward.name, tilt_value=min(1.0, float(values.max()) + 1e-3))
    method.iteration, method.td.buffer = 1, probe.td.buffer
    empty = method.prepare(batch)
    assert empty["adj"] is None and empty["tilt_chains"] == 0
    before = [p.clone() for p in method.ft.model.parameters()]
    loss, metrics = method.loss(empty, 0)
    assert "am_loss" not in metrics and "critic_loss" in metrics
    loss.backward()
    assert all(p.grad is None or not p.grad.abs().sum() for p in method.ft.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, method.ft.model.parameters()))


def test_a_tilt_value_run_writes_a_plain_policy_without_a_gate(tiny_models, dynamics_reward):
    out = run(tiny_models, "qam_tilt", "--reward_model_path", str(dynamics_reward), "--tilt_value", "0.05")
    rows = [json.loads(line) for line in open(tiny_models / "qam_tilt_run" / "metrics.jsonl")]
    assert any("tilt_chains" in r for r in rows)
    ckpt = load_checkpoint(out["output"], "policy")
    assert "residual" not in ckpt and ckpt["provenance"]["config"]["params"]["tilt_value"] == 0.05
    assert type(policy_from_checkpoint(ckpt)) is DiffusionPolicy


# ---- a per-step critic (--critic_unit step): the residual per step's critic carried into the chunk -----------------
class QuadraticStepCritic(torch.nn.Module):
    """Q(cond, a) = -|a - GOAL_j|^2 / (2 rho^2) for one action, GOAL_j read from the window (cond = j): summed over
    the executed steps it is QuadraticCritic's Q, so its chunk carries the same Gaussian tilt."""

    shape = {"cond_dim": 1, "exec_dim": 2}

    def forward(self, cond, act):
        goal = GOAL.to(act.dtype)[cond[:, 0].long()]  # (B, 2): the goal of the step the window says
        q = -((act[:, 0] - goal) ** 2).sum(1) / (2 * RHO**2)
        return torch.stack([q, q])


def test_a_quadratic_step_q_sums_to_the_chunks_gradient_and_reaches_the_same_gaussian_tilt(moments):
    source = StepCriticValue(QuadraticStepCritic(), WholeChunk())
    steps = torch.arange(4, dtype=torch.float64).view(1, 4, 1)  # the window of step j says j

    def value_and_grad(x0, mask=None):
        mask = torch.ones(len(x0), 4, dtype=x0.dtype) if mask is None else mask
        return source.steps_and_grad(steps.expand(len(x0), 4, 1), x0, mask)

    x = torch.randn(5, 4, 2, dtype=torch.float64)
    q, grad = value_and_grad(x)
    torch.testing.assert_close(grad, -(x - GOAL) / RHO**2)
    torch.testing.assert_close(q, -((x - GOAL) ** 2).flatten(1).sum(1) / (2 * RHO**2))
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64).expand(5, 4)  # two steps executed
    q2, grad2 = value_and_grad(x, mask)
    torch.testing.assert_close(grad2[:, :2], grad[:, :2])
    assert grad2[:, 2:].abs().max() == 0
    target_mean, target_var = quadratic_target(*moments)
    mean, var = fine_tune(lambda x0: value_and_grad(x0)[1], LAM_QUAD)
    assert (mean - target_mean).abs().max() < 0.03, (mean, target_mean)
    assert torch.allclose(var, target_var, rtol=0.1), (var, target_var)


def test_a_per_step_critic_learns_each_executed_step_as_residual_step_does(tiny_models):
    method, cfg = make_method(tiny_models, critic_unit="step")
    spy, original = {}, rollout_module.rollout

    def keep(*args, **kwargs):
        spy["res"] = res = original(*args, **kwargs)
        return res

    rollout_module.rollout = keep
    try:
        batch, metrics = method.collect([300000, 300001], 44)  # the last call executes 4 of its 8 steps
    finally:
        rollout_module.rollout = original
    res = spy["res"]
    calls, T, H = res["calls"], res["steps"], 8
    assert T == 44 and list(calls["n_exec"]) == [8] * 5 + [4]
    x0 = torch.from_numpy(calls["trajectory"][:, :, -1])
    # by hand, step by step: step t is entry 1 + t % 8 of call t // 8's clean chunk (obs_horizon 2), as executed
    actions = torch.stack([x0[:, t // H, 1 + t % H] for t in range(T)], 1)
    executed = method.ft.action_normalizer.normalize(torch.from_numpy(calls["action_exec"]).float())
    torch.testing.assert_close(actions, torch.stack([executed[:, t // H, t % H] for t in range(T)], 1), atol=1e-5, rtol=0)
    values = method.source.reward(torch.from_numpy(calls["obs"]).flatten(0, 1), x0.flatten(0, 1)).view(2, -1).numpy()
    gamma = cfg.gamma ** (1 / H)
    buf, rows = method.td.buffer, 0
    for i in range(2):
        assert res["steps_to_success"][i] < 0  # a random tiny policy: both episodes run out of time
        start = calls["reward_before"][i, 0]  # the potential: the last finished chunk's value, the start's before
        u = np.array([start if t < H - 1 else values[i, 5 if t == T - 1 else (t + 1) // H - 1] for t in range(T)])
        r = shaped_rewards(u, start, np.zeros(T, bool), gamma)
        idx, ret, disc, nxt = nstep_targets(r, None, gamma, cfg.n_step * H)
        sl = slice(rows, rows + len(idx))
        np.testing.assert_allclose(buf.data["ret"][sl].numpy(), ret, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(buf.data["disc"][sl].numpy(), disc, rtol=1e-6)
        torch.testing.assert_close(buf.data["act"][sl, 0], actions[i, idx])
        torch.testing.assert_close(buf.data["next_base"][sl, 0], actions[i, nxt])  # what the policy did next
        env = PushTEnv()  # by hand, the window of every step: the env replayed with the executed actions
        frames = [env.reset(seed=300000 + i)[0]]
        frames += [env.step(a)[0] for c, n in enumerate(calls["n_exec"]) for a in calls["action_exec"][i, c, :n]]
        windows = torch.as_tensor(np.stack([np.stack([frames[max(t - 1, 0)], frames[t]]) for t in range(T)]),
                                  dtype=torch.float32)
        conds = method.ft.obs_cond(windows)
        torch.testing.assert_close(buf.data["cond"][sl], conds[idx])
        torch.testing.assert_close(buf.data["next_cond"][sl], conds[nxt])
        torch.testing.assert_close(batch["step_cond"].view(2, 6, H, -1)[i, :5].flatten(0, 1), conds[:40])
        rows += len(idx)
    assert buf.size == rows == metrics["buffer_size"]
    mask = batch["step_mask"].view(2, -1, H)  # every call active: the chains in order, episode by episode
    assert mask[:, :5].all() and mask[:, 5, :4].all() and not mask[:, 5, 4:].any()
    torch.testing.assert_close(batch["step_cond"].view(2, 6, H, -1)[:, :, 0], torch.from_numpy(calls["obs_cond"]))


def test_a_per_step_critics_terminal_adjoint_is_each_steps_action_gradient_at_its_window(tiny_models, dynamics_reward):
    method, cfg = make_method(tiny_models, reward=dynamics_reward.name, critic_unit="step", reward_scale=7.0,
                              am_batch=64)
    with torch.no_grad():  # a critic whose gradient is far from zero
        for p in method.td.target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    batch, _ = method.collect([300000, 300001, 300002], 44)
    method.iteration = 1  # past warm-up
    prepared = method.prepare(batch)
    x0 = prepared["traj"][-1].detach().requires_grad_(True)
    q = 0  # by hand, one executed step at a time: the targets' mean at the step's own window
    for j in range(8):
        q = q + method.td.target(prepared["step_cond"][:, j], x0[:, 1 + j][:, None]).mean(0) * prepared["step_mask"][:, j]
    (grad,) = torch.autograd.grad(q.sum(), x0)
    torch.testing.assert_close(prepared["terminal"], -7.0 * grad)
    assert prepared["terminal"][:, [0, 9, 15]].abs().max() == 0
    short = prepared["step_mask"][:, 4:].sum(1) == 0  # the last calls: 4 steps executed, the rest not counted
    assert short.any() and prepared["terminal"][short][:, 5:9].abs().max() == 0
    # gated per step: a step counts where the frame it was taken from reaches the level
    values = FrameValue.of(load_reward_model(str(dynamics_reward)))(batch["step_frame"].flatten(0, 1)).view(-1, 8)
    level = float(values[batch["step_mask"] > 0].median())
    gated, cfg = make_method(tiny_models, reward=dynamics_reward.name, critic_unit="step", tilt_value=level, am_batch=64)
    gated.iteration = 1
    counted = batch["step_mask"] * (values >= level)
    prepared = gated.prepare(batch)
    assert prepared["tilt_chains"] == int((counted.sum(1) > 0).sum()) < len(counted)
    by_hand = sorted(map(tuple, counted[counted.sum(1) > 0].tolist()))
    assert sorted(map(tuple, prepared["step_mask"].tolist())) == by_hand


def test_a_per_step_critic_run_writes_a_plain_policy_with_its_per_step_critic_and_resumes(tiny_models, monkeypatch):
    out = run(tiny_models, "qam_step", "--critic_unit", "step")
    ckpt = load_checkpoint(out["output"], "policy")
    assert type(policy_from_checkpoint(ckpt)) is DiffusionPolicy
    assert critic_from_checkpoint(ckpt, out["output"]).shape["exec_dim"] == 2  # one action
    with pytest.raises(ValueError, match="per-step critic"):  # run-time selection reads chunk critics only
        CriticValue(critic_from_checkpoint(ckpt, out["output"]), policy_from_checkpoint(ckpt))
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(tiny_models, "qam_step_b", "--critic_unit", "step")
    resumed = load_checkpoint(run(tiny_models, "qam_step_b", "--critic_unit", "step", "--resume")["output"], "policy")
    for key in ckpt["ema_model_state_dict"]:
        torch.testing.assert_close(ckpt["ema_model_state_dict"][key], resumed["ema_model_state_dict"][key], rtol=0, atol=0)
    for key in ckpt["critic"]["state_dict"]:
        torch.testing.assert_close(ckpt["critic"]["state_dict"][key], resumed["critic"]["state_dict"][key], rtol=0, atol=0)


def test_a_per_step_critic_counts_the_steps_taken_before_success_and_no_later_ones(tiny_models):
    method, _ = make_method(tiny_models, critic_unit="step")
    T, H = 24, 8
    record = [(torch.full((2, 40), float(t)), torch.full((2, 20), float(t))) for t in range(T)]  # step t's window: t
    res = {"calls": {"step": np.array([0, 8, 16]), "n_exec": np.array([8, 8, 8]), "reward_before": np.zeros((2, 3))},
           "steps": T, "steps_to_success": np.array([10, -1]), "rewards": np.zeros((2, T))}
    parts, steps = method.step_parts(record, res, np.array([[0.1, 0.9, 0.9], [0.1, 0.2, 0.3]]), torch.zeros(2, 3, H, 2))
    counted = steps["step_mask"]
    assert counted[0, 0].all() and counted[0, 1, :2].all() and not counted[0, 1, 2:].any() and not counted[0, 2].any()
    assert counted[1].all()  # no success: every step of the episode
    assert torch.equal(steps["step_cond"][1, :, :, 0], torch.arange(T, dtype=torch.float32).view(3, H))
    assert len(parts["ret"][0]) == 10 and parts["disc"][0][-1] == 0  # up to and with the step that succeeded
