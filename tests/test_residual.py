"""--method residual: a bounded residual on the frozen policy, trained against a chunk critic."""

import json

import numpy as np
import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import rollout as rollout_module
from diffusion_policy.checkpoint import (CheckpointError, load_checkpoint, policy_checkpoint, policy_from_checkpoint,
                                         save_checkpoint)
from diffusion_policy.finetune.critic import ReplayBuffer, nstep_targets, shaped_rewards
from diffusion_policy.finetune.residual import ResidualConfig, ResidualRL
from diffusion_policy.residual_policy import ResidualDiffusionPolicy, ResidualNetConfig
from diffusion_policy.common.runtime import UserError
from tests.helpers import interrupted_at_call

SMALL = ["--method", "residual", "--num_ft_iters", "3", "--num_eps", "2", "--grad_steps_per_iter", "4",
         "--batch_size", "8", "--buffer_size", "64", "--warmup_iters", "1", "--explore_horizon", "6",
         "--warmup_steps", "1", "--lr", "1e-3", "--max_steps", "24"]


def base_policy(root):
    return policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy"))


def run(root, name, *extra):
    return reward_finetuning.main(reward_finetuning.parse_args([
        *SMALL, "--noise_pred_model_path", str(root / "policy.ckpt"), "--reward_model_path", str(root / "reward.ckpt"),
        "--output", str(root / f"{name}.ckpt"), "--run_dir", str(root / f"{name}_run"), *extra]))


def randomised(policy, seed=0):
    """The residual's last layer made non-zero, so that it acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.residual.net[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return policy


def test_an_untrained_residual_or_alpha_zero_acts_exactly_as_the_base(tiny_models):
    base = base_policy(tiny_models)
    seeds = [300000, 300001, 300002]
    want = rollout_module.rollout(base, seeds, max_steps=24, generator=torch.Generator().manual_seed(5),
                                  record_calls=True)["calls"]
    for policy in (ResidualDiffusionPolicy.on(base, ResidualNetConfig()),  # zero-initialised last layer
                   randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.0)))):
        got = rollout_module.rollout(policy, seeds, max_steps=24, generator=torch.Generator().manual_seed(5),
                                     record_calls=True)["calls"]
        for key in ("action_pred", "action_exec", "reward_after", "obs_after"):
            np.testing.assert_array_equal(got[key], want[key])
    # and a residual that acts moves each executed action by at most alpha (normalised), nothing else
    acting = randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05)))
    obs = torch.as_tensor(want["obs"][:, 0])
    a = acting.predict_action(obs, generator=torch.Generator().manual_seed(1))
    b = base.predict_action(obs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["base_action_pred_norm"], b["action_pred_norm"], rtol=0, atol=0)
    moved = (a["action_pred_norm"] - b["action_pred_norm"]).abs()
    assert 0 < moved.max() <= 0.05 + 1e-6
    assert moved[:, :1].max() == 0 and moved[:, 9:].max() == 0  # only the executed steps 1..8


def test_shaped_rewards_sum_to_the_discounted_value_at_the_end():
    g = 0.9
    values, start = np.array([0.2, 0.5, 0.9, 1.0]), 0.1
    terminal = np.array([False, False, False, True])
    r = shaped_rewards(values, start, terminal, g)
    np.testing.assert_allclose(r, [0.9 * 0.2 - 0.1, 0.9 * 0.5 - 0.2, 0.9 * 0.9 - 0.5, 1.0 - 0.9])
    np.testing.assert_allclose(sum(g ** k * r[k] for k in range(4)), g ** 3 * 1.0 - start)


def test_nstep_targets_on_a_hand_made_chain():
    g, r = 0.5, np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # the episode ends at call 4 (success): no bootstrap past it
    idx, ret, disc, nxt = nstep_targets(r, 4, g, 2)
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(ret, [1 + 0.5 * 2, 2 + 0.5 * 3, 3 + 0.5 * 4, 4 + 0.5 * 5, 5])
    np.testing.assert_allclose(disc, [0.25, 0.25, 0.25, 0, 0])
    np.testing.assert_array_equal(nxt[:3], [2, 3, 4])
    # the time limit cut it after call 4: call 4 starts no transition, the others bootstrap at most to it
    idx, ret, disc, nxt = nstep_targets(r, None, g, 3)
    np.testing.assert_array_equal(idx, [0, 1, 2, 3])
    np.testing.assert_allclose(ret, [1 + 1 + 0.75, 2 + 1.5 + 1, 3 + 2, 4])
    np.testing.assert_allclose(disc, [0.125, 0.125, 0.25, 0.5])
    np.testing.assert_array_equal(nxt, [3, 4, 4, 4])


def make_method(root, **overrides):
    cfg = ResidualConfig(**{"num_ft_iters": 2, "num_eps": 1, "grad_steps_per_iter": 1, "batch_size": 64,
                            "buffer_size": 64, "warmup_iters": 1, "hidden_dims": (64, 64), **overrides})
    base = base_policy(root).requires_grad_(False)
    ft = ResidualRL.make_policy(base, cfg)
    return ResidualRL(cfg, base, ft, ft.model, None, torch.Generator().manual_seed(0)), cfg


def chain_transitions(method, cfg, rewards, n_step):
    """A deterministic chain of calls 0..L-1 at fixed random states, ending (success) at the last one."""
    g = torch.Generator().manual_seed(3)
    L = len(rewards)
    cond, base = torch.rand((L, method.cond_dim), generator=g) * 2 - 1, torch.rand((L, 8, 2), generator=g) * 2 - 1
    idx, ret, disc, nxt = nstep_targets(rewards, L - 1, cfg.gamma, n_step)
    return {"cond": cond[idx], "base": base[idx], "act": base[idx], "ret": torch.as_tensor(ret), "disc":
            torch.as_tensor(disc), "next_cond": cond[nxt], "next_base": base[nxt]}


@pytest.mark.parametrize("n_step", [1, 3])
def test_the_critic_learns_the_known_q_of_a_tiny_deterministic_task(tiny_models, n_step):
    method, cfg = make_method(tiny_models, gamma=0.8, n_step=n_step, tau=0.1)
    rewards = np.array([0.1, -0.2, 0.3, 0.0, 0.5, 1.0])
    batch = chain_transitions(method, cfg, rewards, n_step)
    method.buffer.add(batch)
    q_true = np.array([sum(0.8 ** k * rewards[c + k] for k in range(len(rewards) - c)) for c in range(len(rewards))])
    opt = torch.optim.Adam(method.critic.parameters(), lr=3e-3)
    method.iteration = 1  # still warming up: the critic alone learns
    for i in range(700):
        loss, metrics = method.loss(method.buffer, i)
        assert "actor_q" not in metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step()
    with torch.no_grad():
        q = method.critic(batch["cond"], batch["act"]).mean(0).numpy()
    np.testing.assert_allclose(q, q_true, atol=0.03)


def test_the_controls_targets_carry_no_information(tiny_models):
    """--control: each target is another transition's (return, bootstrap factor) pair, drawn at random,
    so neither the return nor the factor's zero at a success tells the critic which chunk succeeded."""
    method, cfg = make_method(tiny_models)
    with torch.no_grad():  # the target critics value every next state at 5 (their inputs are all equal below)
        for head in method.target.heads:
            head[-1].weight.zero_()
            head[-1].bias.fill_(5.0)
    success = torch.arange(64) % 4 == 0  # these windows reached the success: no bootstrap
    b = {"ret": torch.arange(64, dtype=torch.float32), "disc": torch.where(success, 0.0, cfg.gamma ** cfg.n_step),
         "next_cond": torch.zeros(64, method.cond_dim), "next_base": torch.zeros(64, 8, 2)}
    method.control = False
    plain = method.td_target(b)
    torch.testing.assert_close(plain, b["ret"] + b["disc"] * 5.0)
    method.control = True
    targets = torch.stack([method.td_target(b) for _ in range(2000)])
    for t in targets[:20]:  # a permutation of the plain targets: each return kept with its own factor
        torch.testing.assert_close(t.sort().values, plain.sort().values)
    # on average a transition's target is the batch's mean target, whatever its own return or success
    np.testing.assert_allclose(targets.mean(0).numpy(), np.full(64, plain.mean().item()), atol=1.5)
    own_success = success.float().repeat(2000)
    assert abs(np.corrcoef(targets.flatten().numpy(), own_success.numpy())[0, 1]) < 0.02
    assert abs(np.corrcoef(targets.flatten().numpy(), b["ret"].repeat(2000).numpy())[0, 1]) < 0.02


def climbed(method, critic, steps):
    """The residual at a zero window after `steps` actor updates (Adam) against the fixed `critic`."""
    method.critic = critic
    base = torch.zeros(64, 8, 2)
    method.buffer.add({"cond": torch.zeros(64, method.cond_dim), "base": base, "act": base, "ret": torch.zeros(64),
                       "disc": torch.zeros(64), "next_cond": torch.zeros(64, method.cond_dim), "next_base": base})
    opt = torch.optim.Adam(method.ft.residual.parameters(), lr=1e-2)
    for i in range(steps):
        loss, _ = method.loss(method.buffer, 2 * i)  # even steps: the actor updates (actor_every 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return method.ft.residual(torch.zeros(4, method.cond_dim), torch.zeros(4, 8, 2))


def test_the_actor_moves_the_residual_up_the_critics_gradient_within_its_bound(tiny_models):
    method, cfg = make_method(tiny_models, alpha=0.05, l2=0.0)
    method.iteration = 2  # past warm-up
    target = torch.full((8, 2), 0.3)  # Q = -|a - target|^2: best where a = target, out of reach (alpha 0.05)

    class Known(torch.nn.Module):
        def forward(self, cond, act):
            return -((act - target) ** 2).flatten(1).sum(1).unsqueeze(0)

    delta = climbed(method, Known(), 300)
    assert delta.min() > 0.049 and delta.max() <= 0.05  # pushed to the bound, towards the target


def test_the_replay_buffer_keeps_the_newest_and_round_trips():
    buf = ReplayBuffer(5, {"cond": (2,), "base": (1,), "act": (1,), "ret": (), "disc": (), "next_cond": (2,),
                           "next_base": (1,)})
    for start in (0, 3):
        n = 3
        buf.add({k: torch.full((n, *v.shape[1:]), 0.0) + torch.arange(start, start + n).view(-1, *[1] * (v.ndim - 1))
                 for k, v in buf.data.items()})
    assert buf.size == 5 and sorted(buf.data["ret"].tolist()) == [1, 2, 3, 4, 5]  # 0 went out first
    other = ReplayBuffer(5, {k: v.shape[1:] for k, v in buf.data.items()})
    other.load_state_dict(buf.state_dict())
    assert other.size == 5 and torch.equal(other.data["ret"], buf.data["ret"]) and other.pos == buf.pos


def test_a_run_writes_a_policy_checkpoint_that_evaluates_and_pins_its_base(tiny_models):
    root = tiny_models
    out = run(root, "res")
    rows = [json.loads(line) for line in open(root / "res_run" / "metrics.jsonl")]
    assert [r["residual_on_prob"] for r in rows] == [0.0, 0.0, pytest.approx(rows[2]["residual_on_prob"])]
    assert 0 < rows[2]["residual_on_prob"] <= 1 and "actor_q" in rows[1] and "actor_q" not in rows[0]
    ckpt = load_checkpoint(out["output"], "policy")
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")
    for key in base["ema_model_state_dict"]:  # the base is frozen, bit for bit
        assert torch.equal(ckpt["ema_model_state_dict"][key], base["ema_model_state_dict"][key])
    assert ckpt["provenance"]["config"]["method"] == "residual"
    policy = policy_from_checkpoint(ckpt)
    assert isinstance(policy, ResidualDiffusionPolicy) and policy.residual.net[-1].weight.abs().max() > 0
    ev = evaluate_policy.main(evaluate_policy.parse_args(["--model_path", out["output"], "--num_eps", "2",
                                                         "--max_steps", "8", "--output", str(root / "rev" / "e.json")]))
    assert ev["num_eps"] == 2
    # the checkpoint round-trips; a base whose weights changed under its residual is refused
    again = policy_checkpoint(policy)
    for key, value in ckpt["residual"]["state_dict"].items():
        assert torch.equal(again["residual"]["state_dict"][key], value)
    first = next(iter(ckpt["ema_model_state_dict"]))
    ckpt["ema_model_state_dict"][first] = ckpt["ema_model_state_dict"][first] + 1e-3
    with pytest.raises(CheckpointError, match="not the ones its residual was trained on"):
        policy_from_checkpoint(ckpt)
    # a later round continues the residual on the same frozen base
    save_checkpoint(again, str(root / "round1.ckpt"))
    cont = reward_finetuning.main(reward_finetuning.parse_args([
        *SMALL, "--num_ft_iters", "2", "--noise_pred_model_path", str(root / "round1.ckpt"),
        "--reward_model_path", str(root / "reward.ckpt"), "--output", str(root / "round2.ckpt"),
        "--run_dir", str(root / "round2_run"), "--start_seed", "300100"]))
    assert load_checkpoint(cont["output"], "policy")["residual"]["base_sha256"] == ckpt["residual"]["base_sha256"]


def test_resume_matches_an_uninterrupted_run_and_refuses_another_base(tiny_models, monkeypatch):
    root = tiny_models
    straight = run(root, "rs_a", "--reward_source", "simulator")
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(root, "rs_b", "--reward_source", "simulator")
    resumed = run(root, "rs_b", "--reward_source", "simulator", "--resume")
    a, b = load_checkpoint(straight["output"], "policy"), load_checkpoint(resumed["output"], "policy")
    for key in a["residual"]["state_dict"]:
        torch.testing.assert_close(a["residual"]["state_dict"][key], b["residual"]["state_dict"][key], rtol=0, atol=0)
    # the base file changed under an interrupted run: its residual is not continued on it
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(root, "rs_c", "--reward_source", "simulator")
    other = base_policy(root)
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    save_checkpoint(policy_checkpoint(other), str(root / "policy.ckpt.changed"))
    import shutil
    shutil.copy(root / "policy.ckpt", root / "policy.ckpt.orig")
    shutil.copy(root / "policy.ckpt.changed", root / "policy.ckpt")
    try:
        with pytest.raises(UserError, match="trained on another base"):
            run(root, "rs_c", "--reward_source", "simulator", "--resume")
    finally:
        shutil.copy(root / "policy.ckpt.orig", root / "policy.ckpt")


@pytest.mark.parametrize("pessimism", [0.0, 1.0])
def test_a_pessimistic_actor_does_not_climb_where_only_one_critic_sees_value(tiny_models, pessimism):
    """Two critics agree along w and disagree along v (one sees much value there, the other a small loss):
    the mean's actor climbs both; with --actor_pessimism 1 (mean - std: the minimum of two) only w."""
    method, cfg = make_method(tiny_models, alpha=0.05, l2=0.0, actor_pessimism=pessimism)
    method.iteration = 2  # past warm-up
    w, v = torch.zeros(8, 2), torch.zeros(8, 2)
    w[:, 0], v[:, 1] = 1.0, 1.0

    class Disagree(torch.nn.Module):
        def forward(self, cond, act):
            agreed = (act * w).flatten(1).sum(1)
            along = (act * v).flatten(1).sum(1)
            return torch.stack([agreed + 3.0 * along, agreed - along])

    delta = climbed(method, Disagree(), 200)
    assert delta[..., 0].min() > 0.045  # the agreed direction: climbed to the bound either way
    if pessimism == 0.0:
        assert delta[..., 1].min() > 0.045  # the mean follows the optimistic critic
    else:
        assert delta[..., 1].abs().max() < 0.01  # the minimum sees nothing to gain there


def test_target_smoothing_adds_bounded_zero_mean_noise_to_the_next_chunk(tiny_models):
    method, cfg = make_method(tiny_models, target_noise=0.02)
    with torch.no_grad():  # target critics linear in the action: Q = sum of the next chunk's entries
        for head in method.target.heads:
            head[-1].weight.zero_()
            head[-1].bias.zero_()
    method.target = type(method.target).__new__(type(method.target))
    torch.nn.Module.__init__(method.target)

    def linear(cond, act):
        return act.flatten(1).sum(1).expand(2, -1)

    method.target.forward = linear
    b = {"ret": torch.zeros(64), "disc": torch.ones(64), "next_cond": torch.zeros(64, method.cond_dim),
         "next_base": torch.zeros(64, 8, 2)}  # the untrained residual adds nothing: the plain target is 0
    targets = torch.stack([method.td_target(b) for _ in range(200)])
    assert targets.abs().max() <= 16 * 2 * 0.02 + 1e-6  # 16 entries, each clipped at 2 std
    assert abs(targets.mean().item()) < 0.003 and 0.05 < targets.std().item() < 0.08  # sqrt(16) x 0.02 x ~0.88
    method.config.target_noise = 0.0
    assert method.td_target(b).abs().max() == 0.0


def test_the_residual_ema_is_the_saved_policy_and_the_live_one_is_resumed(tiny_models, monkeypatch):
    root = tiny_models
    straight = run(root, "ema_a", "--reward_source", "simulator", "--residual_ema", "0.5")
    saved = load_checkpoint(straight["output"], "policy")
    latest = load_checkpoint(str(root / "ema_a_run" / "latest.ckpt"), "policy")
    live, ema = latest["train_state"]["method"]["live_residual"], latest["train_state"]["method"]["residual_ema"]
    for key in ema:
        assert torch.equal(saved["residual"]["state_dict"][key], ema[key])
    assert not torch.equal(ema["net.4.weight"], live["net.4.weight"])  # the average lags the live weights
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        run(root, "ema_b", "--reward_source", "simulator", "--residual_ema", "0.5")
    resumed = load_checkpoint(run(root, "ema_b", "--reward_source", "simulator", "--residual_ema", "0.5",
                                  "--resume")["output"], "policy")
    for key in ema:
        assert torch.equal(resumed["residual"]["state_dict"][key], ema[key])
    method, cfg = make_method(root, residual_ema=0.75)  # the update: ema <- 0.75 ema + 0.25 live
    before = {k: v.clone() for k, v in method.ema.state_dict().items()}
    with torch.no_grad():
        for p in method.ft.residual.parameters():
            p.add_(1.0)
    method.after_step()
    for key, value in method.ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[key] + 0.25)


def test_the_critic_is_saved_with_the_policy_and_best_of_n_by_it_acts_with_the_highest_q(tiny_models):
    """Deployment by the critic (issue #37, item 6): the policy checkpoint of a run carries its critic,
    the same one its resumable checkpoint holds; best of N by it executes, per env, the candidate
    (base chunk + residual) of the highest mean Q among the N drawn; a checkpoint without a critic
    is refused in one line naming what to give."""
    from diffusion_policy.residual_policy import critic_from_checkpoint
    from diffusion_policy.selection import BestOf
    from diffusion_policy.sources import CriticValue

    root = tiny_models
    out = run(root, "crit")
    ckpt = load_checkpoint(out["output"], "policy")
    latest = load_checkpoint(str(root / "crit_run" / "latest.ckpt"), "policy")
    saved, resumable = critic_from_checkpoint(ckpt, "a"), critic_from_checkpoint(latest, "b")
    older = critic_from_checkpoint({k: v for k, v in latest.items() if k != "critic"}, "c")  # from the method state
    policy = randomised(policy_from_checkpoint(ckpt), seed=3)
    cond, act = torch.randn(5, 40), torch.rand(5, policy.config.action_horizon, 2) * 2 - 1
    q = saved(cond, act)
    assert q.shape == (2, 5) and torch.equal(q, resumable(cond, act)) and torch.equal(q, older(cond, act)) and q.std() > 0

    obs = torch.as_tensor(np.random.default_rng(0).uniform(50, 450, (3, 2, 20)), dtype=torch.float32)
    chooser = BestOf(policy, 4, CriticValue(saved, policy))
    chosen = chooser(obs, None, 8, generator=torch.Generator().manual_seed(7))
    cand = policy.predict_action(obs.repeat_interleave(4, dim=0), generator=torch.Generator().manual_seed(7))
    values = saved(policy.obs_cond(obs.repeat_interleave(4, dim=0)), policy.executed(cand["action_pred_norm"]))
    best = values.mean(0).view(3, 4).argmax(1) + torch.arange(3) * 4
    assert torch.equal(chosen["action_pred_norm"], cand["action_pred_norm"][best])
    assert (best % 4 != 0).any()  # the choice is not simply the first draw: the test tells them apart

    ev = evaluate_policy.main(evaluate_policy.parse_args([
        "--model_path", out["output"], "--best_of", "2", "--reward_source", "critic", "--num_eps", "2",
        "--max_steps", "8", "--output", str(root / "crit_ev" / "e.json")]))
    assert ev["best_of"] == 2 and ev["reward_source"] == "critic" and ev["critic_path"] == out["output"]
    with pytest.raises(UserError, match="carries no chunk critic"):
        evaluate_policy.main(evaluate_policy.parse_args([
            "--model_path", str(root / "policy.ckpt"), "--best_of", "2", "--reward_source", "critic",
            "--num_eps", "1", "--output", str(root / "crit_ev2" / "e.json")]))


def test_deploy_critic_pairs_each_row_with_the_base_on_the_same_starts(tiny_models, tmp_path, monkeypatch):
    """benchmarks/deploy_critic on a tiny residual run: the rows alone and critic, each an evaluation on
    the same starts with sampling seed 0 (alone: the run's policy as evaluate_policy.py scores it),
    paired start by start with the base; cached: a second call evaluates nothing."""
    import contextlib
    import importlib
    import os

    from benchmarks import deploy_critic
    from benchmarks.finetune_protocol import episodes

    calls = []

    def in_process(cmd, log_path):
        calls.append(cmd)
        module = importlib.import_module(os.path.splitext(os.path.basename(cmd[1]))[0])
        with open(log_path, "a") as log, contextlib.redirect_stdout(log):
            module.main(module.parse_args(cmd[2:]))

    monkeypatch.setattr(deploy_critic, "run_job", in_process)
    run(tiny_models, "dep")
    argv = ["--runs", str(tiny_models / "dep.ckpt"), "--rows", "alone", "critic", "--best_of", "2", "--num_eval", "3",
            "--base", str(tiny_models / "policy.ckpt"), "--out_dir", str(tmp_path / "dep"), "--parallel", "1",
            "--json", str(tmp_path / "dep.json")]
    result = deploy_critic.main(deploy_critic.parse_args(argv))
    assert len(calls) == 3 and sorted(r["row"] for r in result["rows"]) == ["alone", "critic"]
    alone = next(r for r in result["rows"] if r["row"] == "alone")
    base_success, base_score = episodes(next(c[c.index("--output") + 1] for c in calls if str(tiny_models / "policy.ckpt") in c), 3, 400_000)
    success, score = episodes(alone["eval"], 3, 400_000)
    assert alone["score_diff"] == pytest.approx(float((score - base_score).mean()))
    assert alone["success_diff"] == pytest.approx(float((success - base_success).mean()))
    critic = next(r for r in result["rows"] if r["row"] == "critic")
    assert critic["flags"][:4] == ["--best_of", "2", "--reward_source", "critic"] and critic["wall_s_per_call"] > 0
    saved = json.load(open(tmp_path / "dep.json"))
    assert saved["git_commit"] and saved["config"]["best_of"] == 2
    deploy_critic.main(deploy_critic.parse_args(argv))
    assert len(calls) == 3  # every evaluation reused
    # a policy written before the critic was saved with it: the critic of its run's latest.ckpt
    assert deploy_critic.critic_path_of(str(tiny_models / "dep.ckpt")) == str(tiny_models / "dep.ckpt")
    old = {k: v for k, v in load_checkpoint(str(tiny_models / "dep.ckpt"), "policy").items() if k != "critic"}
    save_checkpoint(old, str(tmp_path / "old.ckpt"))
    with pytest.raises(SystemExit, match="carries no critic"):
        deploy_critic.critic_path_of(str(tmp_path / "old.ckpt"))
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "latest.ckpt").write_bytes((tiny_models / "dep_run" / "latest.ckpt").read_bytes())
    assert deploy_critic.critic_path_of(str(tmp_path / "old.ckpt")) == str(tmp_path / "old_run" / "latest.ckpt")
