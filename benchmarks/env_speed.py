"""Single-process Push-T env steps per second: ours vs. a straightforward reference.

Usage:
    python -m benchmarks.env_speed
    python -m benchmarks.env_speed --episodes 40 --repeats 3 --json benchmarks/results/env_speed.json

Both envs replay the same recorded demonstrations (reset to each episode's first state, then
its recorded actions) with keypoint observations and the coverage reward computed every step.
The reference does each step the way the original implementation does: the PD law in
numpy/Vec2d arithmetic, and coverage from shapely polygons rebuilt from a fresh goal body
every step. The two must produce the same trajectories; the script checks that before
timing. Runs are interleaved (ours, reference, ours, ...) and the best of `--repeats` is
reported, so background load hits both alike.
"""

import argparse
import time

import numpy as np
import pymunk
import shapely.geometry as sg

from benchmarks import add_output_flags, save_result
from diffusion_policy.common.cli import count
from diffusion_policy.common.runlog import machine
from diffusion_policy.data.dataset import load_pusht_arrays, resolve_dataset_path
from diffusion_policy.env.geometry import GOAL_POSE, SUCCESS_COVERAGE
from diffusion_policy.env.pusht import CONTROL_HZ, K_P, K_V, SIM_HZ, PushTEnv


class ReferencePushTEnv(PushTEnv):
    """PushTEnv whose step follows the original code path: Vec2d maths and shapely coverage."""

    def _coverage(self):
        goal = pymunk.Body(1, pymunk.moment_for_box(1, (50, 100)))
        goal.position = tuple(GOAL_POSE[:2])
        goal.angle = GOAL_POSE[2]

        def to_shapely(body):
            polys = []
            for shape in self._block.shapes:
                verts = [body.local_to_world(v) for v in shape.get_vertices()]
                polys.append(sg.Polygon(verts + [verts[0]]))
            return sg.MultiPolygon(polys)

        goal_geom, block_geom = to_shapely(goal), to_shapely(self._block)
        return goal_geom.intersection(block_geom).area / goal_geom.area

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        self._latest_action = tuple(action)
        dt = 1.0 / SIM_HZ
        self._n_contact_points = 0
        for _ in range(SIM_HZ // CONTROL_HZ):
            acceleration = K_P * (action - self._agent.position) + K_V * (
                pymunk.Vec2d(0, 0) - self._agent.velocity)
            self._agent.velocity += acceleration * dt
            self._space.step(dt)
        self._elapsed_steps += 1
        cov = self._coverage()
        reward = float(np.clip(cov / SUCCESS_COVERAGE, 0, 1))
        n_contacts = int(np.ceil(self._n_contact_points / (SIM_HZ // CONTROL_HZ)))
        return (self._get_obs(), reward, cov > SUCCESS_COVERAGE,
                self._elapsed_steps >= self.max_episode_steps, self._get_info(cov, n_contacts))


def replay(env, episodes, record=False):
    """Replay recorded episodes; returns (steps, seconds, final rewards if record)."""
    steps, rewards = 0, []
    start = time.perf_counter()
    for first_state, actions in episodes:
        env.reset(options={"reset_to_state": first_state})
        for action in actions:
            obs, reward, *_ = env.step(action)
            steps += 1
            if record:
                rewards.append((obs, reward))
    return steps, time.perf_counter() - start, rewards


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", default=None, help="Push-T zarr (default: the usual locations)")
    p.add_argument("--episodes", type=count(1), default=40, help="demonstrations replayed per timing run")
    p.add_argument("--repeats", type=count(1), default=3, help="interleaved timing runs per env; best is kept")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def main(args):
    data = load_pusht_arrays(resolve_dataset_path(args.dataset_path))
    ends = data["episode_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    episodes = [(data["state"][s], data["action"][s:e]) for s, e in zip(starts[: args.episodes], ends[: args.episodes])]

    ours, ref = PushTEnv("keypoints"), ReferencePushTEnv("keypoints")
    # same physics, same numbers: check on a few episodes before timing
    _, _, a = replay(ours, episodes[:5], record=True)
    _, _, b = replay(ref, episodes[:5], record=True)
    max_obs_diff = max(float(np.abs(x[0] - y[0]).max()) for x, y in zip(a, b))
    max_reward_diff = max(abs(x[1] - y[1]) for x, y in zip(a, b))
    assert max_obs_diff < 1e-9 and max_reward_diff < 1e-9, (max_obs_diff, max_reward_diff)

    best = {"ours": 0.0, "reference": 0.0}
    for _ in range(args.repeats):
        for name, env in (("ours", ours), ("reference", ref)):
            steps, seconds, _ = replay(env, episodes)
            best[name] = max(best[name], steps / seconds)
    result = {
        "steps_per_second_ours": round(best["ours"], 1),
        "steps_per_second_reference": round(best["reference"], 1),
        "ratio": round(best["ours"] / best["reference"], 2),
        "steps_per_run": steps,
        "max_obs_diff": max_obs_diff,
        "max_reward_diff": max_reward_diff,
        "machine": machine(),
    }
    print(f"ours      {result['steps_per_second_ours']:9.1f} steps/s")
    print(f"reference {result['steps_per_second_reference']:9.1f} steps/s")
    print(f"ratio     {result['ratio']:9.2f}x   ({steps} steps per run, best of {args.repeats})")
    save_result(args.json, result, vars(args))
    return result


if __name__ == "__main__":
    main(parse_args())
