"""--method residual_step: the residual per control step, from that step's window (ResFiT's closed loop)."""

import types

import numpy as np
import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import rollout as rollout_module
from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.common.runtime import UserError
from diffusion_policy.env import PushTEnv
from diffusion_policy.finetune.critic import shaped_rewards, step_values
from diffusion_policy.finetune.residual_step import ResidualStepConfig, ResidualStepRL
from diffusion_policy.residual_policy import ResidualDiffusionPolicy, ResidualNetConfig
from diffusion_policy.reward_model import RewardModel, RewardModelConfig, load_reward_model
from diffusion_policy.sources import make_source
from tests.helpers import interrupted_at_call
from tests.test_residual import SMALL, base_policy, randomised

STEP = ["--method", "residual_step", *SMALL[2:]]


def run(root, name, *extra, method=STEP):
    return reward_finetuning.main(reward_finetuning.parse_args([
        *method, "--noise_pred_model_path", str(root / "policy.ckpt"), "--reward_model_path", str(root / "reward.ckpt"),
        "--output", str(root / f"{name}.ckpt"), "--run_dir", str(root / f"{name}_run"), *extra]))


def test_an_untrained_step_residual_acts_as_the_base_and_a_trained_one_corrects_each_step_from_its_own_window(
        tiny_models):
    base = base_policy(tiny_models)
    seeds = [300000, 300001]
    want = rollout_module.rollout(base, seeds, max_steps=20, generator=torch.Generator().manual_seed(5),
                                  record_calls=True)
    got = rollout_module.rollout(ResidualDiffusionPolicy.on(base, ResidualNetConfig(per_step=True)), seeds,
                                 max_steps=20, generator=torch.Generator().manual_seed(5), record_calls=True)
    for key in ("action_pred", "action_exec", "reward_after", "obs_after"):
        np.testing.assert_array_equal(got["calls"][key], want["calls"][key])
    # an acting residual: every step's action is base + delta(that step's window), |delta| <= alpha, and
    # the windows it saw are the env's own observations (replayed from the seed with the executed actions)
    acting = randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05, per_step=True)))
    seen = []
    step_action = acting.step_action
    acting.step_action = lambda history, out, j: seen.append((history.copy(), out, j)) or step_action(history, out, j)
    res = rollout_module.rollout(acting, seeds, max_steps=20, generator=torch.Generator().manual_seed(5),
                                 record_calls=True)
    calls = res["calls"]
    assert len(seen) == 20 and [j for _, _, j in seen] == [0, 1, 2, 3, 4, 5, 6, 7] * 2 + [0, 1, 2, 3]
    executed = np.concatenate([calls["action_exec"][:, c, :n] for c, n in enumerate(calls["n_exec"])], axis=1)
    for i, seed in enumerate(seeds):
        env = PushTEnv()
        obs, _ = env.reset(seed=seed)
        history = [obs, obs]
        for t, (window, out, j) in enumerate(seen):
            np.testing.assert_allclose(window[i], np.stack(history[-2:]), rtol=0, atol=1e-9)
            base_t = out["action_pred_norm"][i, 1 + j]
            acted = acting.action_normalizer.normalize(torch.as_tensor(executed[i, t], dtype=torch.float32))
            assert (acted - base_t).abs().max() <= 0.05 + 1e-5
            obs = env.step(executed[i, t])[0]
            history.append(obs)
    moved = np.abs(executed - np.concatenate([want["calls"]["action_exec"][:, c, :n]
                                              for c, n in enumerate(want["calls"]["n_exec"])], axis=1))
    assert moved.max() > 0  # it acted
    # the chunk recorded for a call (what collection and the reward model read) holds what was executed
    np.testing.assert_array_equal(calls["action_pred"][:, 0, 1:9], calls["action_exec"][:, 0])


def test_step_values_carry_the_last_finished_chunks_value_and_the_succeeding_chunks_own():
    u = step_values(np.array([0.2, 0.5, 0.9]), np.array([0, 8, 16]), 20, 0.1, success_step=17)
    np.testing.assert_allclose(u, [0.1] * 7 + [0.2] * 8 + [0.5, 0.5, 0.9, 0.5, 0.9])
    u = step_values(np.array([0.2, 0.5]), np.array([0, 8]), 12, 0.1, success_step=-1)
    np.testing.assert_allclose(u, [0.1] * 7 + [0.2] * 4 + [0.5])
    # the per-step returns telescope: sum_t gamma_s^t r_t = gamma_s^T u_T - u_(-1) at the succeeding step T
    g = 0.9 ** (1 / 8)
    r = shaped_rewards(u := step_values(np.array([0.2, 0.5, 0.9]), np.array([0, 8, 16]), 20, 0.1, 17)[:18], 0.1,
                       np.arange(18) == 17, g)
    assert sum(g ** t * r[t] for t in range(18)) == pytest.approx(g ** 17 * u[17] - 0.1)


def test_collected_transitions_are_the_executed_steps_with_their_windows(tiny_models):
    cfg = ResidualStepConfig(num_ft_iters=2, num_eps=1, grad_steps_per_iter=1, batch_size=8, buffer_size=512,
                             warmup_iters=0, hidden_dims=(64, 64), n_step=1, alpha=0.05, explore_horizon=1)
    base = base_policy(tiny_models).requires_grad_(False)
    ft = randomised(ResidualStepRL.make_policy(base, cfg))
    method = ResidualStepRL(cfg, base, ft, ft.model, None, torch.Generator().manual_seed(0))
    method.source, method.explored = types.SimpleNamespace(name="simulator"), 1  # the residual on at every call
    method.collect([300000, 300001], 24)
    b, n = method.buffer.data, method.buffer.size
    # two episodes of 24 steps cut by the time limit: steps 0..22 start a transition (the last has no next window)
    assert n == 2 * 23 and b["act"].shape[1:] == (1, 2) and method.critic.shape["exec_dim"] == 2
    moved = (b["act"][:n] - b["base"][:n]).abs()
    assert 0.01 < moved.max() <= 0.05 + 1e-6  # the residual (with its exploration noise), within alpha
    # n_step 1 is one call: a target sums 8 steps (fewer before the time limit), each discounted by gamma ** (1 / 8)
    torch.testing.assert_close(b["next_cond"][:15], b["cond"][8:23])
    torch.testing.assert_close(b["disc"][:15], torch.full((15,), 0.9))
    torch.testing.assert_close(b["disc"][15:23], torch.as_tensor(0.9 ** (np.arange(8, 0, -1) / 8), dtype=torch.float32))


def test_the_frame_potential_is_the_reward_models_value_of_each_observed_frame(tiny_models, monkeypatch):
    cfg = ResidualStepConfig(num_ft_iters=2, num_eps=1, grad_steps_per_iter=1, batch_size=8, buffer_size=512,
                             warmup_iters=0, hidden_dims=(64, 64), n_step=1, alpha=0.05, explore_horizon=1,
                             step_potential="frame")
    base = base_policy(tiny_models).requires_grad_(False)
    ft = randomised(ResidualStepRL.make_policy(base, cfg))
    direct = load_reward_model(str(tiny_models / "reward.ckpt"))
    torch.manual_seed(1)
    model = RewardModel(RewardModelConfig(hidden_dims=(32,), structure="dynamics"), direct.obs_normalizer,
                        direct.action_normalizer, 0.5, 0.2)
    method = ResidualStepRL(cfg, base, ft, ft.model, make_source("model", ft, model), torch.Generator().manual_seed(0))
    method.explored = 1  # the residual on at every call
    seen = {}
    real = rollout_module.rollout
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **k: seen.setdefault("res", real(*a, **k)))
    seeds = [300000, 300001]
    metrics = method.collect(seeds, 24)[1]
    calls, b, g = seen["res"]["calls"], method.buffer.data, 0.9 ** (1 / 8)
    errors, potentials = [], []
    assert not seen["res"]["success"].any() and method.buffer.size == 2 * 23
    for i, seed in enumerate(seeds):  # the frames, replayed from the seed with the executed actions
        env = PushTEnv()
        frames = [env.reset(seed=seed)[0]]
        for c, n in enumerate(calls["n_exec"]):
            frames += [env.step(a)[0] for a in calls["action_exec"][i, c, :n]]
        with torch.no_grad():
            v = (model.value(model.obs_normalizer.normalize(torch.as_tensor(np.stack(frames), dtype=torch.float32)))
                 .squeeze(-1) * 0.2 + 0.5).double().numpy()  # v[0] the start, v[t + 1] after step t
        # step t's target sums 8 steps (m before the time limit) of shaped rewards: g^m v(after t+m-1) - v(before t)
        m = np.minimum(8, 23 - np.arange(23))
        want = g ** m * v[np.arange(23) + m] - v[np.arange(23)]
        np.testing.assert_allclose(b["ret"][23 * i:23 * (i + 1)].double().numpy(), want, rtol=1e-5, atol=1e-6)
        errors.append(v[1:] - seen["res"]["rewards"][i])
        potentials.append(v[1:])
    # the logged error of the potential against the simulator's reward per step, and its mean (report.md's curve)
    assert metrics["potential_rmse"] == pytest.approx(np.sqrt(np.mean(np.concatenate(errors) ** 2)), rel=1e-5)
    assert metrics["step_value"] == pytest.approx(np.mean(np.concatenate(potentials)), rel=1e-5)
    # where it cannot apply, refused in one line
    with pytest.raises(UserError, match="--reward_source model"):
        ResidualStepRL(cfg, base, ft, ft.model, make_source("simulator", ft), torch.Generator())
    with pytest.raises(UserError, match="values a frame.*this one is direct"):
        ResidualStepRL(cfg, base, ft, ft.model, make_source("model", ft, direct), torch.Generator())
    with pytest.raises(SystemExit):
        reward_finetuning.parse_args([*STEP, "--step_potential", "pixels"])


def test_a_step_run_evaluates_resumes_to_the_same_weights_and_is_not_continued_as_a_chunk_residual(
        tiny_models, monkeypatch):
    root = tiny_models
    straight = run(root, "st_a", "--reward_source", "simulator")
    ckpt = load_checkpoint(straight["output"], "policy")
    assert ckpt["residual"]["config"]["per_step"] is True and ckpt["critic"]["config"]["exec_dim"] == 2
    policy = policy_from_checkpoint(ckpt)
    assert policy.per_step and policy.residual.net[-1].weight.abs().max() > 0
    ev = evaluate_policy.main(evaluate_policy.parse_args(["--model_path", straight["output"], "--num_eps", "2",
                                                         "--max_steps", "8", "--output", str(root / "sev" / "e.json")]))
    assert ev["num_eps"] == 2
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(root, "st_b", "--reward_source", "simulator")
    resumed = run(root, "st_b", "--reward_source", "simulator", "--resume")
    b = load_checkpoint(resumed["output"], "policy")
    for key in ckpt["residual"]["state_dict"]:
        torch.testing.assert_close(ckpt["residual"]["state_dict"][key], b["residual"]["state_dict"][key], rtol=0, atol=0)
    # the learned reward's run too (chunk values spread over the steps)
    assert load_checkpoint(run(root, "st_m")["output"], "policy")["residual"]["config"]["per_step"] is True
    with pytest.raises(UserError, match="same --method"):
        reward_finetuning.main(reward_finetuning.parse_args([
            *SMALL, "--noise_pred_model_path", straight["output"], "--reward_model_path", str(root / "reward.ckpt"),
            "--output", str(root / "st_c.ckpt"), "--run_dir", str(root / "st_c_run")]))
    # best of N by the critic needs a chunk critic: a per-step one is refused in one line that says so
    with pytest.raises(UserError, match=r"per-step critic \(--method residual_step, or qam --critic_unit step\), which values one action"):
        evaluate_policy.main(evaluate_policy.parse_args([
            "--model_path", straight["output"], "--num_eps", "1", "--max_steps", "8", "--best_of", "2",
            "--reward_source", "critic", "--output", str(root / "sev" / "c.json")]))


def goal_windows(obs_horizon, shifts):
    """Observation windows (len(shifts), obs_horizon, 20) from the env itself: the block at the goal pose moved
    right by each shift (px), the agent away from it."""
    from diffusion_policy.env.geometry import GOAL_POSE
    frames = []
    for dx in shifts:
        obs, _ = PushTEnv().reset(options={"reset_to_state": [100.0, 100.0, GOAL_POSE[0] + dx, GOAL_POSE[1],
                                                              GOAL_POSE[2]]})
        frames.append(np.repeat(obs[None], obs_horizon, axis=0))
    return np.stack(frames)


def first_actions(policy, windows, per_step=False):
    """The first executed action of a call from each window, under sampling noise seed 3 (per step: as corrected at that step)."""
    out = policy.predict_action(torch.from_numpy(windows), generator=torch.Generator().manual_seed(3))
    return policy.step_action(windows, out, 0) if per_step else out["action"][:, 0]


@pytest.mark.parametrize("per_step", [True, False])
def test_act_within_lets_the_residual_act_only_near_the_goal_and_the_base_alone_elsewhere(tiny_models, per_step):
    base = base_policy(tiny_models)
    windows = goal_windows(base.config.obs_horizon, [0.0, 40.0, 40.0])  # mean keypoint distance 0, 40, 40 px
    gated = randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05, per_step=per_step,
                                                                          act_within=30.0)))
    everywhere = ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05, per_step=per_step))
    everywhere.residual.load_state_dict(gated.residual.state_dict())
    np.testing.assert_array_equal(gated.acting(windows[:, -1]).numpy(), [True, False, False])
    gated.residual.config.act_within = 50.0
    np.testing.assert_array_equal(gated.acting(windows[:, -1]).numpy(), [True, True, True])
    gated.residual.config.act_within = 30.0

    plain = first_actions(base, windows)
    got, corrected = first_actions(gated, windows, per_step), first_actions(everywhere, windows, per_step)
    assert (corrected - plain).abs().amax(-1).min() > 1e-3  # the residual corrects every one of them
    torch.testing.assert_close(got[0], corrected[0], rtol=0, atol=0)  # at the goal: the residual acts
    torch.testing.assert_close(got[1:], plain[1:], rtol=0, atol=0)  # 40 px away: the base alone


@pytest.mark.parametrize("method", ["residual_step", "residual"])
def test_act_within_is_written_with_the_policy_while_collection_corrects_everywhere(tiny_models, method):
    root = tiny_models
    flags = ["--method", method, *SMALL[2:]]
    out = run(root, f"aw_{method}", "--reward_source", "simulator", "--act_within", "0.5", "--explore_std", "0",
              method=flags)  # no exploration noise: what moved an action is the residual's own delta
    ckpt = load_checkpoint(out["output"], "policy")
    assert ckpt["residual"]["config"]["act_within"] == 0.5
    policy = policy_from_checkpoint(ckpt)
    assert policy.residual.config.act_within == 0.5 and policy.residual.net[-1].weight.abs().max() > 0
    assert policy_from_checkpoint(ckpt, act_within=0.0).residual.config.act_within == 0.0  # evaluation's override

    def buffer(name):
        state = torch.load(str(root / f"{name}_run" / "latest.ckpt"), weights_only=True)["train_state"]["method"]
        n = int(state["buffer"]["size"])
        return state["buffer"]["data"]["act"][:n], state["buffer"]["data"]["base"][:n]

    # a deployment setting: the run trains exactly as it does without the gate, weight for weight
    plain = run(root, f"awp_{method}", "--reward_source", "simulator", "--explore_std", "0", method=flags)
    for key, value in load_checkpoint(plain["output"], "policy")["residual"]["state_dict"].items():
        torch.testing.assert_close(ckpt["residual"]["state_dict"][key], value, rtol=0, atol=0)
    # the run's collection (every start far from the goal, where the written policy never acts) was corrected
    act, base = buffer(f"aw_{method}")
    assert (act - base.clamp(-1, 1)).abs().max() > 1e-3
    # with --gate_collection the rollouts act as the written policy does: the base alone, far from the goal
    run(root, f"awg_{method}", "--reward_source", "simulator", "--act_within", "0.5", "--gate_collection", method=flags)
    act, base = buffer(f"awg_{method}")
    torch.testing.assert_close(act, base.clamp(-1, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gate_collection collects with the written policy's gate: give act_within > 0"):
        ResidualStepConfig(gate_collection=True)
    with pytest.raises(SystemExit):  # the same, one line from the command line
        run(root, f"awx_{method}", "--reward_source", "simulator", "--gate_collection", method=flags)
    # a residual checkpoint written before act_within existed loads with the residual everywhere
    del ckpt["residual"]["config"]["act_within"]
    assert policy_from_checkpoint(ckpt).residual.config.act_within == 0.0
    with pytest.raises(UserError, match="act_within gates a residual.*has no residual"):
        policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy"), act_within=30.0)
