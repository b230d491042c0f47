"""The Push-T environment: physics, geometry, and a batched form for rollouts."""

from diffusion_policy.env.geometry import coverage, reward_from_coverage  # noqa: F401
from diffusion_policy.env.pusht import PushTEnv, PushTVectorEnv, sample_start_state  # noqa: F401
