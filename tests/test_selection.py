"""Run-time best-of-N selection: it executes each env's best candidate; N = 1 is plain sampling."""

import json

import numpy as np
import torch

import evaluate_policy
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.env import PushTEnv
from diffusion_policy.sources import make_source
from diffusion_policy.selection import BestOf


class CountingPolicy:
    """Candidate i of a call is the constant chunk i (normalised), so the chosen index is visible."""

    def predict_action(self, obs, generator=None):
        b = obs.shape[0]
        chunk = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 16, 2).clone()
        return {"action": chunk[:, :8], "action_pred": chunk, "action_pred_norm": chunk}


class FavouriteSource:
    """Rewards the candidate whose index within its env's group is the env's favourite."""

    needs_env = False

    def __init__(self, favourites, n):
        self.favourites, self.n = favourites, n

    def reward(self, obs, x0, envs=None, n_exec=None):
        index = x0[:, 0, 0].long() % self.n
        env = torch.arange(len(x0)) // self.n
        return (index == torch.as_tensor(self.favourites)[env]).float()


def test_best_of_executes_each_envs_highest_scoring_candidate():
    chooser = BestOf(CountingPolicy(), 4, FavouriteSource([2, 0, 3], 4))
    out = chooser(np.zeros((3, 2, 20), np.float32), envs=[None] * 3, n_exec=8)
    # env e's candidates are chunks 4e .. 4e + 3; its favourite f is chunk 4e + f
    assert out["action_pred_norm"][:, 0, 0].tolist() == [2.0, 4.0, 11.0]
    assert out["action"].shape == (3, 8, 2) and chooser.calls == 1 and chooser.seconds_per_call > 0


def eval_args(root, name, *extra):
    return evaluate_policy.parse_args(["--model_path", str(root / "policy.ckpt"), "--num_eps", "3", "--max_steps", "24",
                                       "--output", str(root / name / "eval.json"), *extra])


def test_best_of_one_is_plain_sampling_and_best_of_n_runs_with_either_source(tiny_models):
    root = tiny_models
    plain = evaluate_policy.main(eval_args(root, "plain"))
    one = evaluate_policy.main(eval_args(root, "one", "--best_of", "1", "--reward_model_path", str(root / "reward.ckpt")))
    assert one["episodes"] == plain["episodes"] and one["best_of"] == 1
    by_model = evaluate_policy.main(eval_args(root, "model", "--best_of", "3", "--reward_model_path",
                                              str(root / "reward.ckpt")))
    by_sim = evaluate_policy.main(eval_args(root, "sim", "--best_of", "3", "--reward_source", "simulator"))
    summary = json.load(open(root / "sim" / "eval.json"))["summary"]
    assert summary["best_of"] == 3 and summary["reward_source"] == "simulator" and summary["wall_s_per_call"] > 0
    assert by_model["reward_model_path"] == str(root / "reward.ckpt")
    assert [e["score"] for e in by_sim["episodes"]] != [e["score"] for e in plain["episodes"]]


class TargetsPolicy:
    """Candidate k of every call heads for targets[k % len(targets)] and stays there (a real policy's
    normaliser and action window, hand-made chunks)."""

    def __init__(self, policy, targets):
        self.policy, self.targets = policy, torch.as_tensor(targets, dtype=torch.float32)
        self.config = policy.config
        self.executed, self.action_normalizer = policy.executed, policy.action_normalizer

    def predict_action(self, obs, generator=None):
        b = obs.shape[0]
        raw = self.targets[torch.arange(b) % len(self.targets)].view(b, 1, 2).expand(b, 16, 2)
        return {"action": self.executed(raw), "action_pred": raw, "action_pred_norm": self.action_normalizer.normalize(raw)}


def test_best_of_by_the_simulator_executes_the_chunk_with_the_highest_true_reward(tiny_models):
    policy = TargetsPolicy(load_policy(str(tiny_models / "policy.ckpt")),
                           [[200.0, 250.0], [240.0, 260.0], [120.0, 120.0], [300.0, 300.0], [250.0, 200.0]])
    envs = [PushTEnv(), PushTEnv()]  # the block partly on the goal, the agent beside it: chunks differ in reward
    obs = np.stack([env.reset(options={"reset_to_state": state})[0] for env, state in
                    zip(envs, ([200.0, 250.0, 270.0, 270.0, 0.9], [300.0, 300.0, 240.0, 250.0, 0.6]))])
    history = np.repeat(obs[:, None], 2, axis=1).astype(np.float32)
    chosen = BestOf(policy, 5, make_source("simulator", policy))(history, envs, 8)
    cands = policy.predict_action(torch.as_tensor(history).repeat_interleave(5, 0))

    def true_reward(env, actions):
        trial = env.clone()
        for a in actions:
            r = trial.step(a)[1]
        return r

    for i, env in enumerate(envs):
        rewards = [true_reward(env, a) for a in cands["action"][5 * i:5 * i + 5].numpy()]
        assert true_reward(env, chosen["action"][i].numpy()) == max(rewards)
        assert max(rewards) > min(rewards)  # a real choice was made
