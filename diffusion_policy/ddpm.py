"""DDPM noise schedule and the two sampler steps (ancestral DDPM, deterministic DDIM), as pure tensor functions.

Matches diffusers' DDPMScheduler (squaredcos_cap_v2 betas, "leading" timestep spacing,
epsilon prediction, variance "fixed_small", clip_sample) step for step; the tests compare
them on the same noise. Written out here because fine-tuning needs the step's mean and
standard deviation separately, differentiable in x, with explicit noise:

    a   = abar_t / abar_t'          b = 1 - a            (t' = the next, smaller timestep)
    x0  = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)      clamped to [-1, 1] if clip_sample
    mu  = sqrt(abar_t') b / (1 - abar_t) x0 + sqrt(a) (1 - abar_t') / (1 - abar_t) x
    sig = sqrt((1 - abar_t') / (1 - abar_t) b)            (0 on the last step: abar_t' = 1)
    x'  = mu + sig z,  z ~ N(0, I)

The DDIM step (eta = 0) matches diffusers' DDIMScheduler (set_alpha_to_one, the same "leading"
timesteps, the model's own eps): x' = sqrt(abar_t') x0 + sqrt(1 - abar_t') eps. It adds no
noise, so the initial x_K alone fixes the chunk: w -> chunk(obs, w).

`noise_scale` s draws the initial x_K ~ N(0, s^2 I) (a sampling temperature; the step noises of
DDPM keep scale 1).
"""

import math
from dataclasses import asdict, dataclass

import torch

SAMPLERS = ("ddpm", "ddim")


@dataclass
class SamplerConfig:
    """The diffusion process and its sampler; validates itself."""

    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    sampler: str = "ddpm"  # ddpm: ancestral; ddim: deterministic given x_K (eta 0)
    noise_scale: float = 1.0  # the initial x_K ~ N(0, noise_scale^2 I)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not self.noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale!r}")
        if self.beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"only beta_schedule='squaredcos_cap_v2' is supported, got {self.beta_schedule!r}")
        if self.prediction_type != "epsilon":
            raise ValueError(f"only prediction_type='epsilon' is supported, got {self.prediction_type!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {self.num_inference_steps}")

    def to_dict(self):
        return asdict(self)


def squaredcos_cap_v2_betas(num_train_timesteps, max_beta=0.999):
    """Betas of the cosine schedule (Nichol & Dhariwal): (T,) float32."""

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod(num_train_timesteps):
    """abar_t = prod_{s <= t} (1 - beta_s): (T,) float32."""
    return torch.cumprod(1.0 - squaredcos_cap_v2_betas(num_train_timesteps), dim=0)


def inference_timesteps(num_train_timesteps, num_inference_steps):
    """The K sampling timesteps, largest first, and each one's successor (-1 or below = clean).

    "leading" spacing as diffusers: t_k = k * (T // K); successor t - T // K.
    Returns (timesteps (K,), prev_timesteps (K,)) int64.
    """
    ratio = num_train_timesteps // num_inference_steps
    timesteps = torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.int64) * ratio
    return timesteps, timesteps - ratio


def abar_at(abar, t):
    """abar_t for a timestep tensor, with abar = 1 for t < 0 (past the last step)."""
    t = torch.as_tensor(t)
    return torch.where(t >= 0, abar[t.clamp_min(0)], torch.ones((), dtype=abar.dtype, device=abar.device))


def add_noise(x0, noise, abar_t):
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; abar_t (B,) broadcast."""
    abar_t = abar_t.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def predict_x0(eps, x, abar_t, clip_sample=True):
    """x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), optionally clamped to [-1, 1]."""
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return x0.clamp(-1.0, 1.0) if clip_sample else x0


def step_mean(eps, x, abar_t, abar_prev, clip_sample=True):
    """Mean of the ancestral step x_t -> x_t': (..., T, D) like x. abar_* scalar tensors."""
    a = abar_t / abar_prev
    b = 1 - a
    x0 = predict_x0(eps, x, abar_t, clip_sample)
    coef_x0 = abar_prev.sqrt() * b / (1 - abar_t)
    coef_x = a.sqrt() * (1 - abar_prev) / (1 - abar_t)
    return coef_x0 * x0 + coef_x * x  # mu = sqrt(abar') b/(1-abar) x0 + sqrt(a)(1-abar')/(1-abar) x


def step_std(abar_t, abar_prev):
    """Standard deviation of the ancestral step: sqrt((1 - abar') / (1 - abar) (1 - abar/abar'))."""
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return variance.clamp_min(0.0).sqrt()


def ddim_step(eps, x, abar_t, abar_prev, clip_sample=True):
    """The deterministic DDIM step x_t -> x_t' (eta 0): sqrt(abar') x0 + sqrt(1 - abar') eps."""
    return abar_prev.sqrt() * predict_x0(eps, x, abar_t, clip_sample) + (1 - abar_prev).sqrt() * eps


def sample(eps_fn, shape, abar, timesteps, prev_timesteps, clip_sample=True, generator=None, noise=None,
           device=None, return_trajectory=False, sampler="ddpm", noise_scale=1.0):
    """Sampling from pure noise: ancestral DDPM, or deterministic DDIM (sampler="ddim").

    eps_fn(x (B, T, D), t (B,) int64) -> eps (B, T, D).
    noise: None (draw from `generator`), the initial x_K (B, T, D), or every draw at once
      (K + 1, B, T, D): x_K then the step noises z_k (the last one, at sig = 0, is unused; DDIM
      uses none). A drawn x_K is scaled by noise_scale; a given one is used as it is.
    Returns x_0 (B, T, D), or (x_0, trajectory (K + 1, B, T, D) from x_K to x_0).
    """
    K = len(timesteps)
    device = device if device is not None else abar.device

    def draw():
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=abar.dtype).to(device)

    if noise is not None and noise.shape not in (torch.Size(shape), torch.Size((K + 1, *shape))):
        raise ValueError(f"noise must have shape {tuple(shape)} or {(K + 1, *shape)}, got {tuple(noise.shape)}")
    full_noise = noise is not None and noise.ndim == len(shape) + 1
    x = (noise[0] if full_noise else noise).to(device) if noise is not None else noise_scale * draw()
    trajectory = [x]
    for k in range(K):
        t, t_prev = timesteps[k], prev_timesteps[k]
        abar_t, abar_prev = abar_at(abar, t), abar_at(abar, t_prev)
        eps = eps_fn(x, t.expand(shape[0]).to(device))
        if sampler == "ddim":
            x = ddim_step(eps, x, abar_t, abar_prev, clip_sample)
            trajectory.append(x)
            continue
        x_next = step_mean(eps, x, abar_t, abar_prev, clip_sample)
        if t > 0:  # diffusers adds noise on every step but the one from t = 0
            z = noise[k + 1].to(device) if full_noise else draw()
            x_next = x_next + step_std(abar_t, abar_prev) * z
        x = x_next
        trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_trajectory else x
