"""The diffusion policy: normalisers + noise model + DDPM sampler + the action window.

Time indices of one policy call (obs_horizon 2, pred_horizon 16, action_horizon 8):

    observations:  o0 o1                     o1 = now
    prediction:    a0 a1 a2 ... a8 ... a15   a_i aligned with o_i
    executed:         a1 ... a8              pred[:, obs_horizon - 1 : obs_horizon - 1 + action_horizon]
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffusion_policy import ddpm
from diffusion_policy.model import ConditionalUnet1D, UNetConfig
from diffusion_policy.normalizer import MinMaxNormalizer


@dataclass
class PolicyConfig:
    """Horizons and dimensions of a policy call; validates itself."""

    obs_horizon: int = 2
    pred_horizon: int = 16
    action_horizon: int = 8
    obs_dim: int = 20
    action_dim: int = 2

    def __post_init__(self):
        if min(self.obs_horizon, self.pred_horizon, self.action_horizon, self.obs_dim, self.action_dim) < 1:
            raise ValueError(f"horizons and dimensions must be positive: {self}")
        if self.obs_horizon - 1 + self.action_horizon > self.pred_horizon:
            raise ValueError(
                f"the executed window (obs_horizon - 1 + action_horizon = "
                f"{self.obs_horizon - 1 + self.action_horizon}) must fit in pred_horizon={self.pred_horizon}")

    def to_dict(self):
        return asdict(self)


class DiffusionPolicy(nn.Module):
    """Raw observations in, raw action chunks out; everything between is normalised."""

    def __init__(self, policy_config: PolicyConfig, unet_config: UNetConfig, sampler_config: ddpm.SamplerConfig,
                 obs_normalizer: MinMaxNormalizer, action_normalizer: MinMaxNormalizer):
        super().__init__()
        if (unet_config.obs_dim, unet_config.obs_horizon, unet_config.action_dim) != (
                policy_config.obs_dim, policy_config.obs_horizon, policy_config.action_dim):
            raise ValueError(f"model config {unet_config} does not fit policy config {policy_config}")
        factor = 2 ** (len(unet_config.down_dims) - 1)
        if policy_config.pred_horizon % factor:
            raise ValueError(f"pred_horizon={policy_config.pred_horizon} must be divisible by {factor} "
                             f"for {len(unet_config.down_dims)} UNet levels")
        self.config = policy_config
        self.unet_config = unet_config
        self.sampler_config = sampler_config
        self.model = ConditionalUnet1D(unet_config)
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.register_buffer("alphas_cumprod", ddpm.alphas_cumprod(sampler_config.num_train_timesteps))

    @property
    def device(self):
        return self.alphas_cumprod.device

    def obs_cond(self, obs_history):
        """Raw observation window (B, obs_horizon, obs_dim) -> normalised, flattened (B, obs_horizon * obs_dim)."""
        return self.obs_normalizer.normalize(obs_history.to(self.device, torch.float32)).flatten(1)

    def sample(self, obs_cond, generator=None, noise=None, return_trajectory=False, num_inference_steps=None,
               model=None):
        """Denoise a normalised chunk (B, pred_horizon, action_dim) for `obs_cond` (B, cond_dim).

        noise: None, x_K (B, T, D), or all draws (K + 1, B, T, D) (see `ddpm.sample`).
        return_trajectory: also return the chain x_K ... x_0 (K + 1, B, T, D) and its timesteps (K,).
        model: another noise model of the same shape (fine-tuning samples with its copy).
        """
        model = model or self.model
        K = num_inference_steps or self.sampler_config.num_inference_steps
        timesteps, prev = ddpm.inference_timesteps(self.sampler_config.num_train_timesteps, K)
        shape = (obs_cond.shape[0], self.config.pred_horizon, self.config.action_dim)
        out = ddpm.sample(lambda x, t: model(x, t, obs_cond), shape, self.alphas_cumprod,
                          timesteps.to(self.device), prev.to(self.device), self.sampler_config.clip_sample,
                          generator=generator, noise=noise, device=self.device, return_trajectory=return_trajectory,
                          sampler=self.sampler_config.sampler, noise_scale=self.sampler_config.noise_scale)
        if return_trajectory:
            return out[0], out[1], timesteps
        return out

    def executed(self, action_pred):
        """The actions a call executes: (B, pred_horizon, D) -> (B, action_horizon, D)."""
        start = self.config.obs_horizon - 1
        return action_pred[:, start:start + self.config.action_horizon]

    @torch.no_grad()
    def predict_action(self, obs_history, generator=None, noise=None, num_inference_steps=None,
                       return_trajectory=False):
        """Raw obs window (B, obs_horizon, obs_dim) -> {"action": (B, action_horizon, D) raw,
        "action_pred": (B, pred_horizon, D) raw, "action_pred_norm": normalised chunk}; with
        return_trajectory also "trajectory" (K + 1, B, pred_horizon, D) normalised, x_K ... x_0,
        and "obs_cond" (B, obs_horizon * obs_dim)."""
        obs_history = torch.as_tensor(obs_history)
        if obs_history.ndim != 3 or tuple(obs_history.shape[1:]) != (self.config.obs_horizon, self.config.obs_dim):
            raise ValueError(f"obs_history must be (B, {self.config.obs_horizon}, {self.config.obs_dim}), "
                             f"got {tuple(obs_history.shape)}")
        obs_cond = self.obs_cond(obs_history)
        out = self.sample(obs_cond, generator=generator, noise=noise, num_inference_steps=num_inference_steps,
                          return_trajectory=return_trajectory)
        chunk = out[0] if return_trajectory else out
        action_pred = self.action_normalizer.unnormalize(chunk)
        result = {"action": self.executed(action_pred), "action_pred": action_pred, "action_pred_norm": chunk}
        if return_trajectory:
            result.update(trajectory=out[1], obs_cond=obs_cond)
        return result

    def compute_loss(self, obs, action, generator=None, model=None, noise=None, t=None):
        """Epsilon-prediction MSE on normalised windows: obs (B, To, Do), action (B, Tp, D).
        model: another noise model of the same shape (the EMA copy, for validation; a DDP wrapper).
        noise (B, Tp, D), t (B,): given, or drawn from `generator` (noise first, then t)."""
        noise, t = self.draw_noise(action.shape, generator, action.device) if noise is None else (noise, t)
        noise, t = noise.to(action.device), t.to(action.device)
        noisy = ddpm.add_noise(action, noise, self.alphas_cumprod[t])
        pred = (model or self.model)(noisy, t, obs.flatten(1))
        return nn.functional.mse_loss(pred, noise)

    def draw_noise(self, shape, generator=None, device=None):
        """The training noise and timesteps for a batch of chunks `shape` (B, Tp, D): noise, then t."""
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device)
        t = torch.randint(0, self.sampler_config.num_train_timesteps, (shape[0],), generator=generator,
                          device=gen_device)
        return noise, t
