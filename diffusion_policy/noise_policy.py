"""The noise policy: where a frozen DDPM sampler starts, and which step noises it adds, per observation.

An ancestral DDPM sampler with K steps consumes K noises of one chunk's shape: the initial x_K
and the step noises of the K - 1 steps that add noise (the last step, from t = 0, adds none).
Given all of them the chunk is a deterministic function of the observation, w -> chunk(obs, w),
and with w ~ N(0, I) it is exactly the pre-trained policy. A noise policy draws

    w ~ N(mean(obs), spread^2 I),   mean(obs) = bound * tanh(MLP(obs))   (K, pred_horizon, action_dim)

so every chunk it makes is one the frozen denoiser decodes from noise of ordinary size: it cannot
push actions off the demonstrations' manifold, and the denoiser cannot drift. Its last layer
starts at zero: an untrained noise policy is the pre-trained policy's sampler, in distribution.
The method that trains it is diffusion_policy/finetune/noise.py (after DSRL, Wagenmaker et al.
2025, arXiv 2506.15799, which steers the same noise with RL).
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class NoisePolicyConfig:
    """Shape and bounds of a noise policy; validates itself."""

    cond_dim: int  # the policy's obs_cond width (obs_horizon * obs_dim)
    num_noises: int  # K: the initial noise and the K - 1 step noises the sampler adds
    pred_horizon: int
    action_dim: int
    hidden: int = 256
    bound: float = 1.5  # |mean| per coordinate stays below it (tanh)
    spread: float = 1.0  # the standard deviation of the drawn noise around the mean: the prior's

    def __post_init__(self):
        if min(self.cond_dim, self.num_noises, self.pred_horizon, self.action_dim, self.hidden) < 1:
            raise ValueError(f"noise policy dimensions must be positive: {self}")
        if not self.bound > 0:
            raise ValueError(f"bound must be > 0, got {self.bound!r}")
        if not self.spread > 0:
            raise ValueError(f"spread must be > 0 (a deterministic noise per state is fatal on Push-T), got "
                             f"{self.spread!r}")

    def to_dict(self):
        return asdict(self)


class NoisePolicy(nn.Module):
    def __init__(self, config: NoisePolicyConfig):
        super().__init__()
        self.config = config
        c = config
        self.net = nn.Sequential(nn.Linear(c.cond_dim, c.hidden), nn.Mish(), nn.Linear(c.hidden, c.hidden), nn.Mish(),
                                 nn.Linear(c.hidden, c.num_noises * c.pred_horizon * c.action_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs_cond):
        """The mean noise (B, K, pred_horizon, action_dim) for normalised conditions (B, cond_dim)."""
        c = self.config
        return c.bound * torch.tanh(self.net(obs_cond)).view(-1, c.num_noises, c.pred_horizon, c.action_dim)

    @torch.no_grad()
    def draw(self, obs_cond, generator=None):
        """Every noise of one sampler call (K + 1, B, pred_horizon, action_dim), as `ddpm.sample` takes
        them: the K steered ones, then the last step's (unused: that step adds no noise)."""
        mean = self(obs_cond).transpose(0, 1)  # (K, B, T, D)
        shape = (mean.shape[0] + 1, *mean.shape[1:])
        gen_device = generator.device if generator is not None else mean.device
        z = torch.randn(shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
        return torch.cat([mean + self.config.spread * z[:-1], z[-1:]])
