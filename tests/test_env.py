"""The Push-T environment against the real demonstrations, shapely, and golden numbers.

Regenerate the golden rollout (only after checking that a physics change is intended):
    python -m tests.test_env
"""

import math

import numpy as np
import pytest
import shapely.geometry as sg

from diffusion_policy.data.dataset import episode_bounds
from diffusion_policy.env import PushTEnv, PushTVectorEnv, coverage, sample_start_state
from diffusion_policy.env.geometry import (
    BLOCK_COG,
    BLOCK_MOMENT,
    GOAL_POSE,
    T_BAR,
    block_keypoints,
    block_vertices,
)


def _angle_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi)


# ----------------------------------------------------------------------------------------
# fidelity to the recorded demonstrations
# ----------------------------------------------------------------------------------------
def test_replay_of_every_demonstration_tracks_recorded_states(pusht_arrays):
    """All 206 episodes: reset to the first recorded state, apply the recorded actions."""
    state, action, n_contacts = pusht_arrays["state"], pusht_arrays["action"], pusht_arrays["n_contacts"]
    env = PushTEnv(obs_type="state")
    worst_pos, worst_angle, contacts_equal, steps = 0.0, 0.0, 0, 0
    for start, end in episode_bounds(pusht_arrays["episode_ends"]):
        env.reset(options={"reset_to_state": state[start]})
        for t in range(start, end - 1):
            obs, *_, info = env.step(action[t])
            worst_pos = max(worst_pos, float(np.abs(info["state"][2:4] - state[t + 1, 2:4]).max()))
            worst_angle = max(worst_angle, float(_angle_diff(info["state"][4], state[t + 1, 4])))
            contacts_equal += info["n_contacts"] == n_contacts[t + 1]
            steps += 1
    assert steps == 25650 - 206
    assert worst_pos < 1.0, f"block drifted {worst_pos:.3f} px from the recording"
    assert worst_angle < 0.01, f"block angle drifted {worst_angle:.4f} rad from the recording"
    # contact counts differ by one at some contact onsets/offsets (pymunk 7's Munk2D core
    # versus the Chipmunk 7 of the recording); measured agreement is 97 %
    assert contacts_equal / steps > 0.95


def test_keypoint_observations_match_recorded_keypoints(pusht_arrays):
    state = pusht_arrays["state"].astype(np.float64)
    recorded = pusht_arrays["obs"][:, :18].reshape(-1, 9, 2)
    ours = np.stack([block_keypoints(s[2:5]) for s in state])
    err = np.linalg.norm(ours - recorded, axis=-1)
    assert err.mean() < 0.1, err.mean()
    # a few dozen recorded frames lag their state by a fraction of a step; the rest are exact
    assert (err.max(axis=1) < 0.1).mean() > 0.99


def test_block_constants_are_the_originals():
    import pymunk

    # the original sums the bar's moment twice; moment_for_poly is about the body origin
    assert pymunk.moment_for_poly(1, T_BAR) == pytest.approx(1500.0)
    assert BLOCK_MOMENT == 2 * pymunk.moment_for_poly(1, T_BAR)
    assert BLOCK_COG == (0.0, 45.0)


# ----------------------------------------------------------------------------------------
# reset, step, reward
# ----------------------------------------------------------------------------------------
def test_seeded_reset_draws_the_benchmark_state_and_sets_position_before_angle():
    seed = 100000
    rs = np.random.RandomState(seed)
    agent = (rs.randint(50, 450), rs.randint(50, 450))
    block = (rs.randint(100, 400), rs.randint(100, 400))
    angle = rs.randn() * 2 * np.pi - np.pi
    np.testing.assert_array_equal(sample_start_state(seed), [*agent, *block, angle])

    env = PushTEnv(obs_type="state")
    obs, info = env.reset(seed=seed)
    np.testing.assert_allclose(obs[:2], agent)
    # position set at angle 0, then rotated about the centre of gravity (0, 45) in the body frame
    cog_world = np.array(block) + np.array(BLOCK_COG)
    c, s = math.cos(angle), math.sin(angle)
    origin = cog_world - np.array([c * BLOCK_COG[0] - s * BLOCK_COG[1], s * BLOCK_COG[0] + c * BLOCK_COG[1]])
    np.testing.assert_allclose(obs[2:4], origin, atol=1e-6)
    assert _angle_diff(obs[4], angle) < 1e-9
    np.testing.assert_array_equal(obs, info["state"])


def test_reset_to_state_sets_the_recorded_state_exactly():
    env = PushTEnv(obs_type="state")
    s5 = np.array([100.0, 420.0, 300.5, 200.25, 5.5])
    obs, info = env.reset(options={"reset_to_state": s5})
    np.testing.assert_allclose(obs, s5, atol=1e-9)
    assert info["n_contacts"] == 0 and 0.0 <= info["coverage"] <= 1.0


def test_block_at_goal_succeeds_with_full_reward_and_terminates():
    env = PushTEnv()
    agent = (60.0, 60.0)  # far from the block
    env.reset(options={"reset_to_state": [*agent, *GOAL_POSE]})
    _, reward, terminated, truncated, info = env.step(np.array(agent))
    assert info["coverage"] == pytest.approx(1.0, abs=1e-9)
    assert reward == 1.0 and terminated and info["is_success"] and not truncated


def test_reward_is_clipped_coverage_over_095():
    env = PushTEnv()
    pose = (GOAL_POSE[0] + 12.0, GOAL_POSE[1], GOAL_POSE[2])
    env.reset(options={"reset_to_state": [60.0, 60.0, *pose]})
    _, reward, terminated, _, info = env.step([60.0, 60.0])
    assert 0.5 < info["coverage"] < 0.95 and not terminated
    assert reward == pytest.approx(info["coverage"] / 0.95)


def test_truncation_after_max_episode_steps():
    env = PushTEnv(max_episode_steps=3)
    env.reset(seed=1)
    flags = [env.step([256.0, 256.0])[3] for _ in range(3)]
    assert flags == [False, False, True]


@pytest.mark.parametrize("bad", [[np.nan, 1.0], [1.0, np.inf]])
def test_non_finite_action_raises(bad):
    env = PushTEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array(bad))


def test_bad_constructor_arguments_are_refused():
    with pytest.raises(ValueError, match="obs_type"):
        PushTEnv(obs_type="pixels")


def test_observation_layouts_and_spaces():
    env = PushTEnv("keypoints")
    obs, info = env.reset(seed=3)
    assert obs.shape == (20,) and env.observation_space.contains(obs)
    pose = (info["state"][2], info["state"][3], info["state"][4])
    np.testing.assert_allclose(obs[:18].reshape(9, 2), block_keypoints(pose), atol=1e-9)
    np.testing.assert_allclose(obs[18:], info["state"][:2])
    env_s = PushTEnv("state")
    obs_s, _ = env_s.reset(seed=3)
    assert obs_s.shape == (5,) and env_s.observation_space.contains(obs_s)


def test_gymnasium_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    check_env(PushTEnv(), skip_render_check=True)


# ----------------------------------------------------------------------------------------
# coverage
# ----------------------------------------------------------------------------------------
def _shapely_coverage(pose):
    goal = sg.MultiPolygon([sg.Polygon(p) for p in block_vertices(GOAL_POSE)])
    block = sg.MultiPolygon([sg.Polygon(p) for p in block_vertices(pose)])
    return goal.intersection(block).area / goal.area


def test_coverage_equals_shapely_on_random_poses():
    rng = np.random.default_rng(0)
    for i in range(3000):
        if i % 3 == 0:  # near the goal, where partial overlaps are intricate
            pose = (256 + rng.normal() * 3, 256 + rng.normal() * 3, math.pi / 4 + rng.normal() * 0.1)
        else:
            pose = (256 + rng.normal() * 50, 256 + rng.normal() * 50, rng.uniform(0, 2 * math.pi))
        assert coverage(pose) == pytest.approx(_shapely_coverage(pose), abs=1e-9)
    assert coverage(GOAL_POSE) == pytest.approx(1.0, abs=1e-12)
    assert coverage((450.0, 450.0, 0.0)) == 0.0


# ----------------------------------------------------------------------------------------
# rendering and the batched form
# ----------------------------------------------------------------------------------------
def test_render_returns_an_rgb_frame_without_a_display():
    env = PushTEnv(render_size=96)
    env.reset(options={"reset_to_state": [60.0, 60.0, 400.0, 100.0, 0.0]})
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
    def near(pixel, rgb):
        return np.abs(pixel.astype(int) - np.array(rgb)).max() <= 6

    assert near(frame[56, 40], (144, 238, 144))  # inside the goal T, LightGreen
    assert near(frame[20, 83], (119, 136, 153))  # inside the block T at (400, 100), LightSlateGray
    assert near(frame[11, 11], (65, 105, 225))  # the agent at (60, 60) px, RoyalBlue
    assert near(frame[80, 60], (255, 255, 255))  # empty floor
    big = PushTEnv(render_size=256)
    big.reset(seed=0)
    assert big.render().shape == (256, 256, 3)


def test_vector_env_equals_independent_envs():
    seeds = [100000, 100001, 100002]
    venv = PushTVectorEnv(len(seeds))
    singles = [PushTEnv() for _ in seeds]
    obs, info = venv.reset(seeds=seeds)
    for i, (env, seed) in enumerate(zip(singles, seeds)):
        np.testing.assert_array_equal(obs[i], env.reset(seed=seed)[0])
    rng = np.random.default_rng(0)
    for _ in range(10):
        actions = obs[:, 18:] + rng.normal(scale=40, size=(len(seeds), 2))
        obs, reward, terminated, truncated, info = venv.step(actions)
        for i, env in enumerate(singles):
            o, r, te, tr, inf = env.step(actions[i])
            np.testing.assert_array_equal(obs[i], o)
            assert reward[i] == r and terminated[i] == te and truncated[i] == tr
            np.testing.assert_array_equal(info["state"][i], inf["state"])
    assert obs.shape == (3, 20) and info["coverage"].shape == (3,) and info["n_contacts"].shape == (3,)
    assert venv.render().shape == (3, 96, 96, 3)
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------
# golden rollout: guards the physics against silent drift when a dependency changes
# ----------------------------------------------------------------------------------------
GOLDEN_SEED = 100003
GOLDEN_CHECK_STEPS = (10, 20, 30, 40)


def _golden_rollout():
    """The agent sweeps from its start to 60 px beyond the block's start, then sideways."""
    env = PushTEnv(obs_type="state")
    obs, _ = env.reset(seed=GOLDEN_SEED)
    agent, block = obs[:2].copy(), obs[2:4].copy()
    target = block + 60.0 * (block - agent) / np.linalg.norm(block - agent)
    states = {}
    for t in range(1, GOLDEN_CHECK_STEPS[-1] + 1):
        if t <= 25:
            action = agent + (target - agent) * t / 25
        else:
            action = target + np.array([4.0 * (t - 25), -3.0 * (t - 25)])
        obs, *_ = env.step(action)
        if t in GOLDEN_CHECK_STEPS:
            states[t] = obs.copy()
    return states


GOLDEN_STATES = {
    10: [205.4947051236, 264.8718621640, 256.8321853732, 257.6141831355, 4.5197738739],
    20: [272.7852659100, 255.3588652374, 287.2896794200, 251.7357476418, 4.5191023883],
    30: [330.3042923458, 238.5069426577, 345.8685566103, 240.0504875031, 4.5090555673],
    40: [370.4117363154, 208.5875796363, 384.7797989725, 223.7823874642, 4.7523458391],
}


def test_golden_rollout():
    states = _golden_rollout()
    start = PushTEnv("state").reset(seed=GOLDEN_SEED)[0]
    assert np.abs(states[GOLDEN_CHECK_STEPS[-1]][2:4] - start[2:4]).max() > 5.0, "the golden run must push the block"
    for t, expected in GOLDEN_STATES.items():
        np.testing.assert_allclose(states[t], expected, atol=1e-6, err_msg=f"state after step {t}")


if __name__ == "__main__":
    for t, s in _golden_rollout().items():
        print(f"    {t}: [{', '.join(f'{v:.10f}' for v in s)}],")
