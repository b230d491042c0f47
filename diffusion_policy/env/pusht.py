"""The Push-T environment of Chi et al. (Diffusion Policy, 2023), on gymnasium 1.x and pymunk 7.

A kinematic circular agent (radius 15) under 10 Hz position control pushes a T-shaped block
towards a fixed goal pose in a walled 512 x 512 workspace. Each control step runs 10 physics
steps at 100 Hz; before each, a PD law sets the agent's velocity towards the commanded point:

    v <- v + (k_p * (action - p) + k_v * (0 - v)) * dt,    k_p = 100, k_v = 20, dt = 0.01

coverage = area(goal T & block T) / area(goal T), reward = clip(coverage / 0.95, 0, 1), and an
episode terminates on success (coverage > 0.95) or is truncated after `max_episode_steps`.

Fidelity: the bodies, their constants, the order they enter the space, the fresh space per
reset, the order in which a state is set and the physics step that follows it all follow the
original implementation; the tests replay all 206 recorded demonstrations against it.
"""

import math

import gymnasium as gym
import numpy as np
import pymunk
from gymnasium import spaces

from diffusion_policy.env.geometry import (
    BLOCK_COG,
    BLOCK_MASS,
    BLOCK_MOMENT,
    GOAL_POSE,
    SUCCESS_COVERAGE,
    T_PIECES,
    block_keypoints,
    block_vertices,
    coverage,
    reward_from_coverage,
)

WINDOW_SIZE = 512
SIM_HZ = 100
CONTROL_HZ = 10
K_P, K_V = 100.0, 20.0
AGENT_RADIUS = 15.0
MAX_EPISODE_STEPS = 300
OBS_DIMS = {"keypoints": 20, "state": 5}

# pygame colour names of the original rendering
_COLORS = {
    "background": (255, 255, 255),
    "goal": (144, 238, 144),  # LightGreen
    "wall": (211, 211, 211),  # LightGray
    "block": (119, 136, 153),  # LightSlateGray
    "agent": (65, 105, 225),  # RoyalBlue
    "action": (255, 0, 0),
}


def sample_start_state(seed):
    """The benchmark's start state for `seed`: (agent x, y, block x, y, block angle).

    Drawn with the legacy RandomState exactly as the original env does, so a seed names the
    same episode here as in every published Push-T evaluation.
    """
    rs = np.random.RandomState(seed=seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


class PushTEnv(gym.Env):
    """Push-T with keypoint or state observations.

    Observations (float64):
      - "keypoints": (20,) the 9 block keypoints (x, y) in pixels, then the agent (x, y);
        the layout of the dataset's `keypoint` (9, 2) flattened + `state[:2]`.
      - "state": (5,) agent x, y, block x, y, block angle in [0, 2 pi).
    Actions: (2,) the commanded agent position in pixels.
    `info` (from reset and step): `state` (5,), `coverage`, `is_success`, `n_contacts`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, obs_type="keypoints", render_size=96, max_episode_steps=MAX_EPISODE_STEPS):
        if obs_type not in OBS_DIMS:
            raise ValueError(f"obs_type must be one of {sorted(OBS_DIMS)}, got {obs_type!r}")
        if render_size <= 0:
            raise ValueError(f"render_size must be positive, got {render_size}")
        self.obs_type = obs_type
        self.render_size = int(render_size)
        self.render_mode = "rgb_array"
        self.max_episode_steps = int(max_episode_steps)
        ws = float(WINDOW_SIZE)
        if obs_type == "keypoints":
            self.observation_space = spaces.Box(0.0, ws, shape=(20,), dtype=np.float64)
        else:
            high = np.array([ws, ws, ws, ws, 2 * np.pi])
            self.observation_space = spaces.Box(np.zeros(5), high, dtype=np.float64)
        self.action_space = spaces.Box(0.0, ws, shape=(2,), dtype=np.float64)
        self._space = None
        self._latest_action = None
        self._elapsed_steps = 0
        self._n_contact_points = 0

    # ------------------------------------------------------------------------------------
    # gymnasium API
    # ------------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        """Start an episode from the benchmark's draw for `seed`, or a recorded state.

        options["reset_to_state"]: (agent x, y, block x, y, angle) as recorded in the dataset.
        With a seed, the block's position is set before its angle (the benchmark's test-time
        order); with a recorded state, the angle is set first (the order the data was
        recorded in). The two differ because pymunk rotates about the centre of gravity.
        """
        super().reset(seed=seed)
        options = options or {}
        self._build_space()
        if options.get("reset_to_state") is not None:
            state = np.asarray(options["reset_to_state"], dtype=np.float64).reshape(5)
            if not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be finite, got {state}")
            self._set_state(state, angle_first=True)
        else:
            if seed is None:  # gymnasium seeded self.np_random; derive a benchmark seed from it
                seed = int(self.np_random.integers(0, 2**31 - 1))
            self._set_state(sample_start_state(seed), angle_first=False)
        self._latest_action = None
        self._elapsed_steps = 0
        cov = self._coverage()
        return self._get_obs(), self._get_info(cov, n_contacts=0)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        ax, ay = float(action[0]), float(action[1])
        self._latest_action = (ax, ay)

        n_substeps = SIM_HZ // CONTROL_HZ
        dt = 1.0 / SIM_HZ
        agent, space = self._agent, self._space
        self._n_contact_points = 0
        for _ in range(n_substeps):
            # PD control of the kinematic agent, in the original's order of operations
            px, py = agent.position
            vx, vy = agent.velocity
            vx += (K_P * (ax - px) + K_V * (0.0 - vx)) * dt
            vy += (K_P * (ay - py) + K_V * (0.0 - vy)) * dt
            agent.velocity = (vx, vy)
            space.step(dt)
        self._elapsed_steps += 1

        cov = self._coverage()
        reward = reward_from_coverage(cov)
        terminated = cov > SUCCESS_COVERAGE
        truncated = self._elapsed_steps >= self.max_episode_steps
        n_contacts = int(math.ceil(self._n_contact_points / n_substeps))
        return self._get_obs(), reward, terminated, truncated, self._get_info(cov, n_contacts)

    def render(self):
        """RGB frame (render_size, render_size, 3) uint8; no display needed."""
        import pygame  # deferred: only rendering needs it

        canvas = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
        canvas.fill(_COLORS["background"])
        for piece in block_vertices(GOAL_POSE):
            pygame.draw.polygon(canvas, _COLORS["goal"], piece)
        for a, b in _WALLS:
            pygame.draw.line(canvas, _COLORS["wall"], a, b, width=4)
        for piece in block_vertices(self.block_pose):
            pygame.draw.polygon(canvas, _COLORS["block"], piece)
        ax, ay = self._agent.position
        pygame.draw.circle(canvas, _COLORS["agent"], (ax, ay), AGENT_RADIUS)
        if self._latest_action is not None:
            x, y = self._latest_action
            for dx, dy in ((1, 0), (0, 1)):
                pygame.draw.line(canvas, _COLORS["action"], (x - 20 * dx, y - 20 * dy),
                                 (x + 20 * dx, y + 20 * dy), width=5)
        if self.render_size != WINDOW_SIZE:
            canvas = pygame.transform.smoothscale(canvas, (self.render_size, self.render_size))
        # surfarray is indexed (x, y); images are (row = y, col = x)
        return np.ascontiguousarray(pygame.surfarray.array3d(canvas).transpose(1, 0, 2))

    def close(self):
        self._space = None

    # ------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------
    def clone(self):
        """An independent copy in the same physical state (poses and velocities of both bodies, step
        count). Stepping it with the same actions gives the same results as this env, bit for bit
        away from contact; while the agent pushes the block they differ by under 1e-3 px, because
        a fresh space lacks the contact solver's warm-start cache. Reward collection uses copies
        to try other action chunks from a state."""
        copy = PushTEnv(self.obs_type, self.render_size, self.max_episode_steps)
        copy._build_space()
        for src, dst in ((self._agent, copy._agent), (self._block, copy._block)):
            dst.angle, dst.position = src.angle, src.position
            dst.velocity, dst.angular_velocity = src.velocity, src.angular_velocity
        copy._latest_action, copy._elapsed_steps = self._latest_action, self._elapsed_steps
        return copy

    @property
    def block_pose(self):
        """(x, y, angle) of the block's body origin; the angle is not wrapped."""
        x, y = self._block.position
        return (x, y, self._block.angle)

    @property
    def state(self):
        """(agent x, y, block x, y, block angle in [0, 2 pi)), as in the dataset."""
        ax, ay = self._agent.position
        bx, by, angle = self.block_pose
        return np.array([ax, ay, bx, by, angle % (2 * np.pi)])

    def _coverage(self):
        return coverage(self.block_pose)

    def _get_obs(self):
        if self.obs_type == "state":
            return self.state
        kps = block_keypoints(self.block_pose).reshape(-1)
        return np.concatenate([kps, np.asarray(self._agent.position, dtype=np.float64)])

    def _get_info(self, cov, n_contacts):
        return {
            "state": self.state,
            "coverage": cov,
            "is_success": cov > SUCCESS_COVERAGE,
            "n_contacts": n_contacts,
        }

    def _set_state(self, state, angle_first):
        ax, ay, bx, by, angle = (float(v) for v in state)
        self._agent.position = (ax, ay)
        # pymunk rotates a body about its centre of gravity, which is off the block's origin:
        # the order of these two assignments changes where the block ends up.
        if angle_first:
            self._block.angle = angle
            self._block.position = (bx, by)
        else:
            self._block.position = (bx, by)
            self._block.angle = angle
        self._space.step(1.0 / SIM_HZ)  # as the original: one physics step to take effect

    # ------------------------------------------------------------------------------------
    # physics
    # ------------------------------------------------------------------------------------
    def _build_space(self):
        """A fresh space per episode, bodies added in the original's order."""
        space = pymunk.Space()
        space.gravity = (0.0, 0.0)
        space.damping = 0.0  # all velocity lost each step: the block moves only when pushed
        space.add(*[pymunk.Segment(space.static_body, a, b, 2.0) for a, b in _WALLS])

        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        agent.position = (256.0, 400.0)
        space.add(agent, pymunk.Circle(agent, AGENT_RADIUS))

        block = pymunk.Body(BLOCK_MASS, BLOCK_MOMENT)
        shapes = [pymunk.Poly(block, piece) for piece in T_PIECES]
        block.center_of_gravity = BLOCK_COG
        block.position = (256.0, 300.0)
        block.angle = 0.0
        space.add(block, *shapes)

        space.on_collision(0, 0, post_solve=self._count_contacts)
        self._space, self._agent, self._block = space, agent, block

    def _count_contacts(self, arbiter, space, data):
        self._n_contact_points += len(arbiter.contact_point_set.points)


_WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))


class PushTVectorEnv:
    """N Push-T environments stepped together, so a policy makes one call per control step.

    Arrays in, stacked arrays out: `step(actions (N, 2))` -> obs (N, D), reward (N,),
    terminated (N,), truncated (N,), info with `state` (N, 5), `coverage` (N,),
    `is_success` (N,), `n_contacts` (N,). Episodes never auto-reset; a finished episode keeps
    stepping, and the caller decides what to keep.
    """

    def __init__(self, num_envs, obs_type="keypoints", render_size=96,
                 max_episode_steps=MAX_EPISODE_STEPS):
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        self.envs = [PushTEnv(obs_type, render_size, max_episode_steps) for _ in range(num_envs)]
        self.num_envs = num_envs
        self.obs_dim = OBS_DIMS[obs_type]

    def reset(self, seeds=None, states=None):
        """Reset every env from `seeds` (N ints) or recorded `states` (N, 5)."""
        if (seeds is None) == (states is None):
            raise ValueError("pass exactly one of seeds= or states=")
        items = seeds if seeds is not None else states
        if len(items) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} seeds/states, got {len(items)}")
        results = [
            env.reset(seed=int(s)) if seeds is not None else env.reset(options={"reset_to_state": s})
            for env, s in zip(self.envs, items)
        ]
        obs, infos = zip(*results)
        return np.stack(obs), _stack_infos(infos)

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions must have shape ({self.num_envs}, 2), got {actions.shape}")
        obs, reward, terminated, truncated, infos = zip(*(e.step(a) for e, a in zip(self.envs, actions)))
        return (np.stack(obs), np.array(reward), np.array(terminated), np.array(truncated),
                _stack_infos(infos))

    def render(self):
        """(N, H, W, 3) uint8 frames."""
        return np.stack([env.render() for env in self.envs])

    def close(self):
        for env in self.envs:
            env.close()


def _stack_infos(infos):
    return {key: np.stack([np.asarray(info[key]) for info in infos]) for key in infos[0]}
