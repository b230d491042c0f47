"""The rollout loop that evaluation, reward collection and fine-tuning share.

All episodes of a batch step together through `PushTVectorEnv`, so every control step of
the policy is one batched model call. Each call sees the last `obs_horizon` observations
(the first one repeated at the start of an episode) and executes `action_horizon` actions.
An episode's score is the maximum reward it reaches (the paper's metric); it succeeds if its
coverage exceeds 0.95 at any step. A batch stops early once every episode has succeeded.
"""

import numpy as np
import torch
from tqdm import tqdm

from diffusion_policy.env import PushTVectorEnv
from diffusion_policy.env.geometry import SUCCESS_COVERAGE

CALL_KEYS = ("obs", "action_pred", "action_exec", "reward_before", "reward_after", "obs_after", "active", "step",
             "n_exec")


def rollout(policy, seeds, max_steps=300, generator=None, render_size=None, progress=False, desc="rollout",
            record_calls=False, record_trajectories=False, branches=0, record_envs=False, choose=None, on_frames=None,
            step=None):
    """Roll `policy` out from the start states of `seeds`, all at once.

    render_size, on_frames: frames of render_size pixels go to the callable on_frames(seeds, frames)
    (N of (H, W, 3) uint8) at the reset and after each step, and on_frames(seeds, None) when the
    rollout ends: they are streamed, never kept, so memory stays bounded whatever the number of
    episodes.
    choose: None (the policy samples each call's chunk), or a callable (history, envs, n_exec,
    generator) -> the policy's output dict, such as run-time selection (diffusion_policy/selection.py).
    step: None, or a callable (history, out, j) -> the raw action (N, D) to execute at the j-th step of
    the call whose output dict is `out`, from the window `history` seen right then: a closed-loop
    correction per control step. A policy with `per_step` set (a per-step residual,
    diffusion_policy/residual_policy.py) brings its own (`policy.step_action`). The recorded chunks
    (action_pred, action_exec) hold what was executed.

    Returns a dict of numpy arrays over episodes (N = len(seeds)):
      seeds (N,), score (N,) max reward, success (N,) bool, max_coverage (N,),
      steps_to_success (N,) control steps until coverage > 0.95 (-1 if never), steps (int),
      rewards (N, steps) the reward after each control step.
    With record_calls, also "calls": per policy call c (C calls), raw arrays
      obs (N, C, obs_horizon, obs_dim)     the window the policy saw
      action_pred (N, C, pred_horizon, 2)  the whole predicted chunk
      action_exec (N, C, action_horizon, 2) what was executed (the last call may run fewer
                                           steps: n_exec says how many; the rest repeat)
      reward_before (N, C), reward_after (N, C)  reward at the call, after its executed steps
      obs_after (N, C, obs_dim)            the observation after its executed steps
      active (N, C) bool                   the episode had not succeeded before the call
      step (C,), n_exec (C,)               control step at the call, steps executed
    and with branches = M > 0 (reward collection), M more chunks sampled from the same window
    at every call, each executed on a copy of the environment (`PushTEnv.clone`) while the
    episode goes on with the first chunk:
      branch_action_pred (N, C, M, pred_horizon, 2), branch_action_exec (N, C, M, action_horizon, 2),
      branch_reward_after (N, C, M), branch_obs_after (N, C, M, obs_dim)
                                            (zeros for calls of episodes already solved)
    and with record_trajectories (fine-tuning) the sampler's chain, normalised:
      trajectory (N, C, K + 1, pred_horizon, 2)  x_K ... x_0
      obs_cond (N, C, obs_horizon * obs_dim)     the normalised condition
    and with record_envs (scoring chunks on the simulator) a copy of every env at every call:
      env (N, C) object array of `PushTEnv`       (in the state the call's chunk starts from)
    """
    if render_size and on_frames is None:
        raise ValueError("render_size needs on_frames: frames are streamed, never kept")
    seeds = [int(s) for s in seeds]
    n, cfg = len(seeds), policy.config
    venv = PushTVectorEnv(n, obs_type="keypoints", render_size=render_size or 96, max_episode_steps=max_steps)
    obs, info = venv.reset(seeds=seeds)
    history = np.repeat(obs[:, None], cfg.obs_horizon, axis=1)  # (N, obs_horizon, obs_dim)
    current_reward = np.clip(info["coverage"] / SUCCESS_COVERAGE, 0.0, 1.0)
    reward = np.zeros((n, max_steps))
    coverage = np.zeros((n, max_steps))
    first_success = np.full(n, -1)
    if render_size:
        on_frames(seeds, venv.render())
    keys = CALL_KEYS + (("trajectory", "obs_cond") if record_trajectories else ()) + (
        ("branch_action_pred", "branch_action_exec", "branch_reward_after", "branch_obs_after") if branches else ()) + (
        ("env",) if record_envs else ())
    calls = {k: [] for k in keys} if record_calls or record_trajectories or record_envs else None

    step_action = step if step is not None else (policy.step_action if getattr(policy, "per_step", False) else None)
    t = 0
    bar = tqdm(total=max_steps, desc=desc, disable=not progress, leave=False)
    while t < max_steps and not np.all(first_success >= 0):
        n_exec = min(cfg.action_horizon, max_steps - t)
        if choose is None:
            out = policy.predict_action(torch.from_numpy(history), generator=generator,
                                        return_trajectory=record_trajectories)
        else:
            out = choose(history, venv.envs, n_exec, generator)
        actions = out["action"].cpu().numpy()
        if step_action is not None:
            actions = actions.copy()  # filled step by step below
        if calls is not None:
            calls["obs"].append(history.astype(np.float32))
            calls["reward_before"].append(current_reward.copy())
            calls["active"].append(first_success < 0)
            calls["step"].append(t)
            calls["n_exec"].append(n_exec)
            if branches:
                for key, value in try_branches(policy, venv, history, branches, n_exec, first_success < 0,
                                               generator).items():
                    calls[key].append(value)
            if record_envs:
                calls["env"].append([env.clone() for env in venv.envs])
            if record_trajectories:
                calls["trajectory"].append(out["trajectory"].transpose(0, 1).cpu().numpy())
                calls["obs_cond"].append(out["obs_cond"].cpu().numpy())
        for j in range(n_exec):
            if step_action is not None:
                actions[:, j] = step_action(history, out, j).cpu().numpy()
            obs, r, _, _, info = venv.step(actions[:, j])
            reward[:, t], coverage[:, t] = r, info["coverage"]
            first_success[(first_success < 0) & info["is_success"]] = t + 1
            history = np.concatenate([history[:, 1:], obs[:, None]], axis=1)
            if render_size:
                on_frames(seeds, venv.render())
            t += 1
        current_reward = reward[:, t - 1]
        if calls is not None:
            action_pred = out["action_pred"].cpu().numpy()
            if step_action is not None:  # the executed steps as corrected
                start = cfg.obs_horizon - 1
                action_pred = action_pred.copy()
                action_pred[:, start:start + n_exec] = actions[:, :n_exec]
            exec_actions = actions.copy()
            exec_actions[:, n_exec:] = actions[:, n_exec - 1:n_exec]
            calls["action_pred"].append(action_pred)
            calls["action_exec"].append(exec_actions)
            calls["reward_after"].append(current_reward.copy())
            calls["obs_after"].append(history[:, -1].astype(np.float32))
        bar.update(n_exec)
        bar.set_postfix(success=f"{(first_success >= 0).mean():.2f}")
    bar.close()
    venv.close()
    if render_size:
        on_frames(seeds, None)
    result = {
        "seeds": np.array(seeds),
        "score": reward[:, :t].max(axis=1),
        "success": first_success >= 0,
        "max_coverage": coverage[:, :t].max(axis=1),
        "steps_to_success": first_success,
        "steps": t,
        "rewards": reward[:, :t],
    }
    if calls is not None:
        result["calls"] = {k: np.stack(v, axis=1) if k not in ("step", "n_exec", "env") else np.array(v)
                           for k, v in calls.items() if k != "env"}
        if record_envs:
            envs = np.empty((n, len(calls["env"])), dtype=object)
            for c, row in enumerate(calls["env"]):
                envs[:, c] = row
            result["calls"]["env"] = envs
    return result


def try_branches(policy, venv, history, m, n_exec, active, generator):
    """Sample m more chunks per env from `history` and execute each on a copy of its env."""
    n = len(venv.envs)
    many = torch.from_numpy(np.repeat(history, m, axis=0))
    out = policy.predict_action(many, generator=generator)
    action_pred = out["action_pred"].cpu().numpy().reshape(n, m, *out["action_pred"].shape[1:])
    actions = out["action"].cpu().numpy().reshape(n, m, *out["action"].shape[1:])
    exec_actions = actions.copy()
    exec_actions[:, :, n_exec:] = actions[:, :, n_exec - 1:n_exec]
    reward_after = np.zeros((n, m))
    obs_after = np.zeros((n, m, history.shape[-1]), dtype=np.float32)
    for i in np.flatnonzero(active):
        for k in range(m):
            trial = venv.envs[i].clone()
            for a in actions[i, k, :n_exec]:
                o, r = trial.step(a)[:2]
            reward_after[i, k], obs_after[i, k] = r, o
    return {"branch_action_pred": action_pred.astype(np.float32), "branch_action_exec": exec_actions,
            "branch_reward_after": reward_after, "branch_obs_after": obs_after}


def rollout_batches(policy, seeds, batch_size, **kwargs):
    """`rollout` over consecutive batches of seeds, their per-episode arrays concatenated."""
    parts = [rollout(policy, seeds[i:i + batch_size], **kwargs) for i in range(0, len(seeds), batch_size)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("seeds", "score", "success", "max_coverage",
                                                             "steps_to_success")}
    return out
