"""Reward data (layout, rewards against the environment, return-to-go) and the reward model."""

import json
import shutil

import numpy as np
import pytest
import torch

import collect_rewards
import train_reward
from diffusion_policy import reward_metrics
from diffusion_policy.checkpoint import CheckpointError, load_checkpoint
from diffusion_policy.env import PushTEnv
from diffusion_policy.reward_data import (
    RewardDataError,
    discounted_return_to_go,
    load_reward_data,
    save_reward_data,
    sidecar_path,
)
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.common.runtime import UserError
from tests.helpers import META, interrupted_at_call, synthetic_columns

@pytest.fixture(scope="module")
def tiny_policy_path(tiny_models):
    return str(tiny_models / "policy.ckpt")


# ----------------------------------------------------------------------------------------
# the file and its sidecar
# ----------------------------------------------------------------------------------------
def test_sidecar_layout_round_trip(tmp_path):
    cols = synthetic_columns(n_episodes=3, calls=4)
    path = str(tmp_path / "r.npy")
    save_reward_data(path, cols, {**META, "gamma": 0.9})
    loaded, meta = load_reward_data(path)
    assert meta["gamma"] == 0.9 and meta["columns"]["obs"] == {"start": 5, "stop": 45, "shape": [2, 20],
                                                                 "unit": "pixels"}
    for name, values in cols.items():
        np.testing.assert_allclose(loaded[name].reshape(values.shape), values)
    assert np.load(path).shape == (12, meta["width"]) and meta["width"] == 5 + 40 + 32 + 16 + 4 + 20


def test_bad_reward_files_are_refused(tmp_path):
    cols = synthetic_columns(n_episodes=3, calls=4)
    path = str(tmp_path / "r.npy")
    save_reward_data(path, cols, META)
    with pytest.raises(RewardDataError, match="collect_rewards.py"):
        load_reward_data(str(tmp_path / "missing.npy"))
    side = json.load(open(sidecar_path(path)))
    json.dump({**side, "width": side["width"] + 1}, open(sidecar_path(path), "w"))
    with pytest.raises(RewardDataError, match="sidecar says"):
        load_reward_data(path)
    cols["reward_after"][5] = np.nan
    save_reward_data(path, cols, META)
    with pytest.raises(RewardDataError, match=r"NaN or inf in columns \['reward_after'\]"):
        load_reward_data(path)
    cols["reward_after"][5] = 0.5
    cols["return_to_go"][6] = np.nan  # allowed on a branch row only
    save_reward_data(path, cols, META)
    with pytest.raises(RewardDataError, match=r"NaN or inf in columns \['return_to_go'\]"):
        load_reward_data(path)
    cols["branch"][6] = 1
    save_reward_data(path, cols, META)
    assert np.isnan(load_reward_data(path)[0]["return_to_go"][6])
    side = json.load(open(sidecar_path(path)))
    json.dump({**side, "layout_version": 1}, open(sidecar_path(path), "w"))
    with pytest.raises(RewardDataError, match="older collection"):
        load_reward_data(path)
    np.save(str(tmp_path / "bare.npy"), np.zeros((3, 3)))
    with pytest.raises(RewardDataError, match="no layout sidecar"):
        load_reward_data(str(tmp_path / "bare.npy"))
    few = str(tmp_path / "one.npy")
    save_reward_data(few, synthetic_columns(n_episodes=1, calls=4), META)
    with pytest.raises(RewardDataError, match="cannot be split"):
        train_reward.main(train_reward.parse_args(["--action_reward_path", few, "--output",
                                                   str(tmp_path / "m.ckpt"), "--num_epochs", "1"]))


def test_return_to_go_by_hand():
    np.testing.assert_allclose(discounted_return_to_go([1.0, 2.0, 3.0], 0.5), [2.75, 3.5, 3.0])
    np.testing.assert_allclose(discounted_return_to_go([[1.0, 0.0], [0.0, 1.0]], 1.0), [[1.0, 0.0], [1.0, 1.0]])


# ----------------------------------------------------------------------------------------
# collection against the environment
# ----------------------------------------------------------------------------------------
def test_collected_rewards_equal_a_replay_of_the_recorded_actions(tiny_policy_path, tmp_path):
    out = str(tmp_path / "reward" / "data.npy")
    result = collect_rewards.main(collect_rewards.parse_args([
        "--num_eps", "3", "--model_path", tiny_policy_path, "--max_steps", "20", "--gamma", "0.8",
        "--output", out, "--run_dir", str(tmp_path / "run"), "--batch_size", "2", "--branches", "2"]))
    cols, meta = load_reward_data(out)
    assert result["episodes"] == 3 and meta["seeds"] == [200000, 200002] and meta["gamma"] == 0.8
    assert result["calls"] == 3 * 3  # 20 steps = calls of 8, 8, 4 (no success)
    assert result["rows"] == len(cols["episode"]) == 3 * 3 * 3 and meta["branches"] == 2

    for episode in range(3):
        check_branches(cols, episode, max_steps=20)
        rows = np.flatnonzero((cols["episode"] == episode) & (cols["branch"] == 0))
        env = PushTEnv()
        obs, info = env.reset(seed=int(cols["seed"][rows[0]]))
        history = [obs, obs]
        previous = min(max(info["coverage"] / 0.95, 0.0), 1.0)
        rewards = []
        for row in rows:
            np.testing.assert_allclose(cols["obs"][row], np.stack(history), atol=1e-3)
            n_exec = min(8, 20 - int(cols["step"][row]))  # the last call runs 4 steps
            np.testing.assert_allclose(cols["action_exec"][row][:n_exec], cols["action_pred"][row][1:1 + n_exec])
            np.testing.assert_allclose(cols["action_exec"][row][n_exec:], cols["action_pred"][row][n_exec:n_exec + 1]
                                       .repeat(8 - n_exec, axis=0))  # padded with the last executed action
            assert cols["reward_before"][row] == pytest.approx(previous)
            for action in cols["action_exec"][row][:n_exec]:
                obs, reward, *_ = env.step(action)
                history = [history[1], obs]
            assert cols["reward_after"][row] == pytest.approx(reward)
            np.testing.assert_allclose(cols["obs_after"][row], obs, atol=1e-3)
            assert cols["reward_diff"][row] == pytest.approx(reward - previous)
            previous = reward
            rewards.append(reward)
        # no success in 20 steps: the horizon has ceil(20 / 8) = 3 calls, all recorded
        expected = [rewards[0] + 0.8 * rewards[1] + 0.64 * rewards[2], rewards[1] + 0.8 * rewards[2], rewards[2]]
        np.testing.assert_allclose(cols["return_to_go"][rows], expected)


def test_collection_interrupted_and_resumed_writes_the_same_data(tiny_policy_path, tmp_path, monkeypatch):
    policy = tmp_path / "policy.ckpt"
    shutil.copy(tiny_policy_path, policy)

    def collect(name, *extra):
        return collect_rewards.main(collect_rewards.parse_args([
            "--num_eps", "4", "--model_path", str(policy), "--max_steps", "16", "--batch_size", "2",
            "--branches", "1", "--output", str(tmp_path / f"{name}.npy"), "--run_dir", str(tmp_path / name), *extra]))

    collect("a")
    with interrupted_at_call(monkeypatch, collect_rewards, "rollout", 2):  # in the second batch
        collect("b")
    assert not (tmp_path / "b.npy").exists() and (tmp_path / "b" / "partial.pt").exists()
    with pytest.raises(UserError, match="other settings"):
        collect("b", "--resume", "--gamma", "0.5")
    ckpt = torch.load(policy, weights_only=True)  # another policy under the same file name
    torch.save({**ckpt, "provenance": {"note": "replaced"}}, policy)
    with pytest.raises(UserError, match="other settings.*model_sha256"):
        collect("b", "--resume")
    shutil.copy(tiny_policy_path, policy)
    resumed = collect("b", "--resume")
    a, _ = load_reward_data(str(tmp_path / "a.npy"))
    b, _ = load_reward_data(str(tmp_path / "b.npy"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed["episodes"] == 4 and not (tmp_path / "b" / "partial.pt").exists()


def check_branches(cols, episode, max_steps):
    """Each branch row's reward equals replaying the executed path up to its call, then its chunk."""
    main = np.flatnonzero((cols["episode"] == episode) & (cols["branch"] == 0))
    branch_rows = np.flatnonzero((cols["episode"] == episode) & (cols["branch"] > 0))
    assert len(branch_rows) == 2 * len(main)
    assert np.isnan(cols["return_to_go"][branch_rows]).all()
    differs = 0
    for row in branch_rows:
        call = int(cols["call"][row])
        env = PushTEnv()
        env.reset(seed=int(cols["seed"][row]))
        for earlier in main[:call]:
            for action in cols["action_exec"][earlier]:
                env.step(action)
        np.testing.assert_allclose(cols["obs"][row], cols["obs"][main[call]])
        n_exec = min(8, max_steps - int(cols["step"][row]))
        for action in cols["action_exec"][row][:n_exec]:
            obs, reward = env.step(action)[:2]
        assert cols["reward_after"][row] == pytest.approx(reward, abs=1e-4)  # see PushTEnv.clone
        np.testing.assert_allclose(cols["obs_after"][row], obs, atol=1e-2)
        assert cols["reward_diff"][row] == pytest.approx(reward - cols["reward_before"][main[call]])
        differs += not np.allclose(cols["action_pred"][row], cols["action_pred"][main[call]])
    assert differs == len(branch_rows)  # every branch is a fresh sample, not the executed chunk


def test_env_clone_steps_like_the_original():
    env = PushTEnv()
    env.reset(seed=3)
    agent, block = np.array(env.state[:2]), np.array(env.state[2:4])
    path = np.linspace(agent, block + 0.6 * (block - agent), 60)  # drive through the block: contact
    for action in path[:20]:
        env.step(action)
    copy = env.clone()
    original = [env.step(a)[:2] for a in path[20:]]
    copied = [copy.step(a)[:2] for a in path[20:]]
    assert np.linalg.norm(env.state[2:4] - block) > 5  # the block was pushed after the copy
    # exact up to the contact solver's warm-start cache, which a fresh space does not carry:
    # measured differences are below 1e-3 px over 40 steps of pushing
    for (o1, r1), (o2, r2) in zip(original, copied):
        np.testing.assert_allclose(o1, o2, atol=1e-2)
        assert r1 == pytest.approx(r2, abs=1e-4)
    free = PushTEnv()
    free.reset(seed=5)
    twin = free.clone()  # no contact: bit for bit
    for a in np.linspace(free.state[:2], free.state[:2] + 20, 10):
        assert np.array_equal(free.step(a)[0], twin.step(a)[0])


def test_successful_episode_holds_its_terminal_reward(tmp_path):
    calls = {
        "active": np.array([[True, True, False, False]]),
        "reward_after": np.array([[0.5, 1.0, 1.0, 1.0]]),
        "reward_before": np.array([[0.2, 0.5, 1.0, 1.0]]),
        "step": np.array([0, 8, 16, 24]), "obs": np.zeros((1, 4, 2, 20)),
        "action_pred": np.zeros((1, 4, 16, 2)), "action_exec": np.zeros((1, 4, 8, 2)),
        "obs_after": np.zeros((1, 4, 20)),
    }
    rows = collect_rewards.episode_rows(calls, [7], 0, 0.5, horizon_calls=5)
    np.testing.assert_allclose(rows["return_to_go"][0], [0.5 + 0.5 * (1 + 0.5 + 0.25 + 0.125),
                                                         1 + 0.5 + 0.25 + 0.125])
    np.testing.assert_allclose(rows["reward_diff"][0], [0.3, 0.5])


# ----------------------------------------------------------------------------------------
# the reward model
# ----------------------------------------------------------------------------------------
def test_tiny_training_fits_a_known_synthetic_reward(tmp_path):
    path = str(tmp_path / "synthetic.npy")
    save_reward_data(path, synthetic_columns(n_episodes=60, calls=10), META)
    out = train_reward.main(train_reward.parse_args([
        "--action_reward_path", path, "--num_epochs", "60", "--lr", "3e-3", "--batch_size", "64",
        "--target", "reward_after",  # the synthetic reward is a function of obs and chunk
        "--structure", "direct",  # ... of the chunk's last step, which never runs: no observation shows it
        "--output", str(tmp_path / "reward_model_rd0.ckpt"), "--run_dir", str(tmp_path / "run")]))
    assert out["val_r2"] > 0.9 and out["val_spearman"] > 0.9, out
    assert {"val_pick_gain_cov_lt80", "val_rank_corr_cov_ge90", "val_states_cov_80_90"} <= set(out)  # logged
    assert (tmp_path / "run" / "reward_fit_val.png").stat().st_size > 1000
    ckpt = load_checkpoint(str(tmp_path / "reward_model_rd0.ckpt"), "reward")
    assert ckpt["target"]["name"] == "reward_after" and ckpt["metrics"]["val_r2"] == out["val_r2"]
    with pytest.raises(CheckpointError, match="'reward' checkpoint, but a 'policy'"):
        load_checkpoint(str(tmp_path / "reward_model_rd0.ckpt"), "policy")

    model = load_reward_model(str(tmp_path / "reward_model_rd0.ckpt"))
    cols = synthetic_columns(n_episodes=2, calls=5, seed=1)
    obs = torch.tensor(cols["obs"], dtype=torch.float32)
    chunk = torch.tensor(cols["action_pred"], dtype=torch.float32)
    raw = model.reward(obs, chunk)
    normalized_chunk = model.action_normalizer.normalize(chunk).requires_grad_(True)
    via_norm = model.reward(model.obs_normalizer.normalize(obs), normalized_chunk, normalized=True)
    torch.testing.assert_close(raw, via_norm)
    (grad,) = torch.autograd.grad(via_norm.sum(), normalized_chunk)
    assert torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0


def pushed_block_columns(n_episodes, calls, branches, seed=0):
    """A push task whose dynamics are known: the agent moves from p to the chunk's executed end e
    and drags the block along by 0.5 (e - p) exp(-|p - block| / 100), more the nearer it starts;
    the reward is how close the block then is to a goal. The same state is tried with `branches`
    more chunks, as collect_rewards.py --branches does."""
    rng = np.random.default_rng(seed)
    n = n_episodes * calls
    b = rng.uniform(150, 350, size=(n, 2))
    p = b + rng.uniform(-80, 80, size=(n, 2))
    pattern = rng.normal(scale=30, size=(9, 2))
    goal = np.array([256.0, 256.0])
    value = lambda block: np.exp(-np.linalg.norm(block - goal, axis=-1) / 100)  # noqa: E731
    frame = lambda block, agent: np.concatenate([(block[:, None] + pattern).reshape(len(block), 18), agent], 1)  # noqa: E731
    cols = {k: [] for k in ("episode", "seed", "call", "branch", "step", "obs", "action_pred", "action_exec",
                            "reward_before", "reward_after", "reward_diff", "return_to_go", "obs_after")}
    for k in range(1 + branches):
        end = p + rng.uniform(-70, 70, size=(n, 2))
        action = p[:, None] + (end - p)[:, None] * np.clip(np.arange(16) / 8.0, 0, 1)[None, :, None]
        after = b + 0.5 * (end - p) * np.exp(-np.linalg.norm(p - b, axis=-1) / 100)[:, None]
        cols["episode"].append(np.repeat(np.arange(n_episodes), calls))
        cols["seed"].append(np.repeat(200000 + np.arange(n_episodes), calls))
        cols["call"].append(np.tile(np.arange(calls), n_episodes))
        cols["branch"].append(np.full(n, k))
        cols["step"].append(np.tile(np.arange(calls) * 8, n_episodes))
        cols["obs"].append(np.stack([frame(b, p), frame(b, p)], 1))
        cols["action_pred"].append(action)
        cols["action_exec"].append(action[:, 1:9])
        cols["reward_before"].append(value(b))
        cols["reward_after"].append(value(after))
        cols["reward_diff"].append(value(after) - value(b))
        cols["return_to_go"].append(value(after) if k == 0 else np.full(n, np.nan))
        cols["obs_after"].append(frame(after, end))
    return {k: np.concatenate(v) for k, v in cols.items()}


def test_dynamics_structure_learns_what_a_chunk_does_and_scores_its_result(tmp_path):
    """--structure dynamics on a push task with known dynamics: the composed reward fits, the
    effect part predicts the observation each chunk leads to, the reward is the value part read at
    that prediction, differentiable in the chunk, and the checkpoint reloads to the same numbers."""
    path = str(tmp_path / "pushed.npy")
    save_reward_data(path, pushed_block_columns(n_episodes=30, calls=8, branches=3), META)
    args = ["--action_reward_path", path, "--num_epochs", "20", "--lr", "3e-3", "--batch_size", "128",
            "--output", str(tmp_path / "dyn.ckpt"), "--run_dir", str(tmp_path / "run")]
    out = train_reward.main(train_reward.parse_args(args + ["--structure", "dynamics"]))
    assert out["val_r2"] > 0.8 and out["val_branch_pick_gain"] > 0.8, out
    model = load_reward_model(str(tmp_path / "dyn.ckpt"))
    assert model.config.structure == "dynamics" and model.effect_scale.min() > 0

    test = pushed_block_columns(n_episodes=5, calls=10, branches=0, seed=1)
    obs, chunk = torch.tensor(test["obs"], dtype=torch.float32), torch.tensor(test["action_pred"], dtype=torch.float32)
    o, a = model.obs_normalizer.normalize(obs), model.action_normalizer.normalize(chunk).requires_grad_(True)
    predicted = model.obs_normalizer.unnormalize(model.next_obs(o, a))
    after = torch.tensor(test["obs_after"], dtype=torch.float32)
    change, predicted_change = (after - obs[:, -1])[:, :18], (predicted - obs[:, -1])[:, :18]  # the block's keypoints
    explained = 1 - ((predicted_change - change) ** 2).sum() / ((change - change.mean(0)) ** 2).sum()
    assert explained > 0.8 and (predicted_change - change).abs().mean() < 0.4 * change.abs().mean(), explained
    reward = model.reward(o, a, normalized=True)
    torch.testing.assert_close(reward, model.value(model.next_obs(o, a)).squeeze(-1) * model.target_std
                               + model.target_mean)
    (grad,) = torch.autograd.grad(reward.sum(), a)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(load_reward_model(str(tmp_path / "dyn.ckpt")).reward(obs, chunk), model.reward(obs, chunk))

    with pytest.raises(UserError, match="its target is reward_after, not return_to_go"):
        train_reward.main(train_reward.parse_args(args + ["--structure", "dynamics", "--target", "return_to_go",
                                                          "--force"]))


def test_branch_pick_gain_against_hand_values():
    states = np.array([0, 0, 0, 1, 1, 2])  # state 2 has one chunk only: not counted
    true = np.array([0.1, 0.4, 0.1, 0.5, 0.3, 0.9])
    # state 0: mean 0.2, best +0.2; state 1: mean 0.4, best +0.1
    assert reward_metrics.branch_pick_gain(np.array([0, 1, 0, 1, 0, 5.0]), true, states) == pytest.approx(1.0)
    picks_worst = np.array([1, 0, 0, 0, 1, 0.0])  # -0.1 and -0.1 of +0.3 possible
    assert reward_metrics.branch_pick_gain(picks_worst, true, states) == pytest.approx(-0.2 / 0.3)
    assert reward_metrics.branch_pick_gain(true, true, np.arange(6)) is None


def test_within_state_metrics_by_coverage_band_against_hand_values():
    """Three states, one per coverage band, with a known order of their chunks: a model that ranks
    the first state right, the second reversed and the third half right reads so, band by band."""
    states = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])  # state 3 has one chunk: counted nowhere
    coverage = np.array([0.5, 0.5, 0.5, 0.85, 0.85, 0.85, 0.93, 0.93, 0.97])
    true = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.6, 0.4, 1.0])
    pred = np.array([1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.5, 0.0])  # state 2: a tie, the first picked
    m = reward_metrics.within_state_metrics(pred, true, states, coverage)
    assert m["pick_gain_cov_lt80"] == pytest.approx(1.0) and m["rank_corr_cov_lt80"] == pytest.approx(1.0)
    assert m["pick_gain_cov_80_90"] == pytest.approx(-1.0) and m["rank_corr_cov_80_90"] == pytest.approx(-1.0)
    assert m["pick_gain_cov_ge90"] == pytest.approx(1.0)  # picks 0.6 of (0.6, 0.4): the best
    assert m["rank_corr_cov_ge90"] is None  # tied predictions: no rank correlation
    assert (m["states_cov_lt80"], m["states_cov_80_90"], m["states_cov_ge90"]) == (1, 1, 1)
    empty = reward_metrics.within_state_metrics(pred[:3], true[:3], states[:3], coverage[:3])
    assert empty["pick_gain_cov_ge90"] is None and empty["states_cov_ge90"] == 0


def test_spearman_and_r2_against_hand_values():
    m = reward_metrics.regression_metrics([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert m["spearman"] == pytest.approx(1.0)
    m = reward_metrics.regression_metrics([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert m["spearman"] == pytest.approx(-1.0) and m["r2"] == pytest.approx(1 - 5.0 / 1.25)
    np.testing.assert_allclose(reward_metrics.rank(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0.0, 2.5, 1.0])



def fit_synthetic(tmp_path, path, name, epochs, *flags):
    """train_reward.main on a synthetic file, target reward_after, into tmp_path/{name}.ckpt."""
    return train_reward.main(train_reward.parse_args([
        "--action_reward_path", path, "--num_epochs", str(epochs), "--lr", "3e-3", "--batch_size", "64",
        "--target", "reward_after", *flags, "--output", str(tmp_path / f"{name}.ckpt"),
        "--run_dir", str(tmp_path / f"run_{name}"), "--seed", "0"]))


def test_reward_training_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    path = str(tmp_path / "synthetic.npy")
    save_reward_data(path, synthetic_columns(n_episodes=12, calls=5), META)
    straight = fit_synthetic(tmp_path, path, "a", 5, "--save_every", "2")
    assert not (tmp_path / "run_a" / "latest.pt").exists()  # a finished run leaves nothing to resume

    with interrupted_at_call(monkeypatch, train_reward, "validation_metrics", 4):  # in epoch 4's validation
        fit_synthetic(tmp_path, path, "b", 5, "--save_every", "2")
    assert not (tmp_path / "b.ckpt").exists() and (tmp_path / "run_b" / "latest.pt").exists()
    with pytest.raises(UserError, match="other settings"):
        fit_synthetic(tmp_path, path, "b", 5, "--save_every", "2", "--resume", "--batch_size", "32")
    resumed = fit_synthetic(tmp_path, path, "b", 5, "--save_every", "2", "--resume")
    a, b = load_checkpoint(str(tmp_path / "a.ckpt"), "reward"), load_checkpoint(str(tmp_path / "b.ckpt"), "reward")
    for key in a["model_state_dict"]:
        torch.testing.assert_close(a["model_state_dict"][key], b["model_state_dict"][key], rtol=0, atol=0)
    assert resumed["val_mse"] == straight["val_mse"] and resumed["epoch"] == straight["epoch"]
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "run_b" / "metrics.jsonl")]
    assert epochs == [1, 2, 3, 4, 5]  # epoch 3 was done again after the interruption, from epoch 2's state
    with pytest.raises(UserError, match="cannot resume"):
        fit_synthetic(tmp_path, path, "b", 5, "--resume")
