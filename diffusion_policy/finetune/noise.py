"""Noise steering (`--method noise`): learn where the frozen sampler starts, not new denoiser weights.

The denoiser stays the pre-trained one. A noise policy (diffusion_policy/noise_policy.py) draws
every noise of a DDPM sampler call, w ~ N(mean(obs), spread^2 I); with w the chunk is a fixed
function chunk(obs, w), and with mean = 0 it is the pre-trained policy. The target is the same
tilt as the other methods', in noise space:

    q(w | obs) ~ N(w; 0, I) exp(lambda r(obs, chunk(obs, w)))

Each iteration rolls the current (steered) policy out, keeps up to states_per_iter of its calls
made before success, and at each draws num_candidates noises w_i from the prior N(0, I), decodes
them with the frozen denoiser and scores the chunks with the reward source (the reward MLP, or
the simulator: each chunk run on a copy of the call's env). The mean is fitted to the tilt's
mean, sum_i softmax(lambda r)_i w_i: the Gaussian of fixed spread closest to q (forward KL,
reward-weighted regression in noise space). Only reward *values* are used, never a gradient
through the chunk. Drawing from the prior, never from the current noise policy, keeps the
target fixed: the policy cannot sharpen itself into one noise per state (fatal on Push-T).

--control hands each state the rewards of another state's candidates (shuffled across states):
the same data and steps, with weights that carry no information about the state's own noises,
so the expected target is zero and the control stays the pre-trained policy.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_policy import rollout as rollout_module
from diffusion_policy.finetune.config import MethodConfig
from diffusion_policy.noise_policy import NoisePolicy, NoisePolicyConfig


@dataclass
class NoiseConfig(MethodConfig):
    """Noise steering's settings (docs/findings.md holds the pilots that chose them)."""

    num_ft_iters: int = 30
    num_eps: int = 8
    lr: float = 1e-3
    reward_scale: float = 100.0
    grad_steps_per_iter: int = 32
    ema_decay: float = 0.0  # the noise policy keeps no EMA
    num_candidates: int = 8  # prior noises drawn and scored per visited state
    states_per_iter: int = 256  # visited states kept per iteration, at random
    batch_states: int = 128  # states per optimiser step
    hidden: int = 256  # the noise policy's MLP width
    bound: float = 1.5  # |mean| per coordinate stays below it
    spread: float = 1.0  # the drawn noise's standard deviation around the mean

    def __post_init__(self):
        super().__post_init__()
        if self.ema_decay != 0.0:
            raise ValueError("the noise method keeps no EMA of its noise policy: ema_decay must be 0")
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be at least 2 (weights need a choice), got {self.num_candidates}")
        if self.states_per_iter < 1 or self.batch_states < 1 or self.hidden < 1:
            raise ValueError(f"states_per_iter, batch_states and hidden must be >= 1, got {self.states_per_iter}, "
                             f"{self.batch_states}, {self.hidden}")
        NoisePolicyConfig(1, 1, 1, 1, self.hidden, self.bound, self.spread)  # checks bound and spread


def tilted_noise_mean(w, r, reward_scale, control=False, generator=None):
    """The tilt's mean noise per state, sum_i softmax(lambda r)_i w_i: w (S, M, ...) prior noises,
    r (S, M) their rewards. control: each state gets another state's rewards (a random permutation
    of the states, a derangement when S > 1), so its weights say nothing about its own noises."""
    r = torch.as_tensor(r, dtype=torch.float32, device=w.device)
    if control and r.shape[0] > 1:
        order = torch.randperm(r.shape[0], generator=generator).to(r.device)
        shuffled = torch.empty_like(r)
        shuffled[order] = r[order.roll(-1)]  # a cycle through a random order: no state keeps its own
        r = shuffled
    p = torch.softmax(reward_scale * r, dim=1)
    return torch.einsum("sm,sm...->s...", p, w), p


class NoiseSteering:
    """collect() the steered policy's states and scored prior noises; prepare() the tilt's mean
    noise once per iteration; loss() for each optimiser step; summary() of the iteration."""

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        self.config, self.base, self.ft, self.train_model = config, base, ft, train_model
        self.source, self.generator, self.control = source, generator, control

    @staticmethod
    def trainable(ft, config):
        """The module this method trains: the policy's noise policy (a fresh one, mean 0, unless the
        starting checkpoint brought one: a later round continues it)."""
        if ft.noise_policy is None:
            c = ft.config
            ft.attach_noise_policy(NoisePolicy(NoisePolicyConfig(
                c.obs_horizon * c.obs_dim, ft.sampler_config.num_inference_steps, c.pred_horizon, c.action_dim,
                config.hidden, config.bound, config.spread)))
        ft.model.requires_grad_(False)
        return ft.noise_policy

    @torch.no_grad()
    def decode(self, cond, w):
        """The frozen denoiser's chunks (S * M, T, D) for conditions (S * M, C) and noises (S * M, K, T, D)."""
        full = torch.cat([w.transpose(0, 1), torch.zeros_like(w[:, :1]).transpose(0, 1)])  # + the unused last
        return self.base.sample(cond, noise=full)

    def collect(self, seeds, max_steps):
        cfg, ft, source, gen = self.config, self.ft, self.source, self.generator
        ft.eval()
        M = cfg.num_candidates
        res = rollout_module.rollout(ft, seeds, max_steps=max_steps, generator=gen, record_calls=True,
                                     record_envs=source.needs_env)
        calls = res["calls"]
        ep, call = np.nonzero(calls["active"])
        if len(ep) > cfg.states_per_iter:
            keep = torch.randperm(len(ep), generator=gen)[:cfg.states_per_iter].sort().values.numpy()
            ep, call = ep[keep], call[keep]
        out = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean())}
        if len(ep) == 0:
            return None, out
        obs = torch.as_tensor(calls["obs"][ep, call], dtype=torch.float32)
        cond = ft.obs_cond(obs)
        shape = (len(ep) * M, ft.sampler_config.num_inference_steps, ft.config.pred_horizon, ft.config.action_dim)
        w = torch.randn(shape, generator=gen).to(ft.device)
        x0 = self.decode(cond.repeat_interleave(M, dim=0), w)
        envs = np.repeat(calls["env"][ep, call], M) if source.needs_env else None
        r = source.reward(obs.repeat_interleave(M, dim=0), x0, envs, np.repeat(calls["n_exec"][call], M))
        return {"cond": cond, "w": w.view(len(ep), M, *shape[1:]), "r": r.view(len(ep), M).to(ft.device)}, out

    def prepare(self, batch):
        target, p = tilted_noise_mean(batch["w"], batch["r"], self.config.reward_scale, self.control, self.generator)
        return {**batch, "target": target, "p": p}

    def loss(self, batch, i):
        idx = torch.randperm(len(batch["target"]), generator=self.generator)[:self.config.batch_states]
        idx = idx.to(batch["target"].device)
        mean = self.train_model(batch["cond"][idx])
        return ((mean - batch["target"][idx]) ** 2).mean(), {"mean_noise_rms": float(mean.detach().pow(2).mean().sqrt())}

    def summary(self, batch):
        r, p = batch["r"], batch["p"]
        ess = (1.0 / (p ** 2).sum(1)).mean() / p.shape[1]
        return {"candidate_reward": float(r.mean()), "selected_reward_gain": float(((p * r).sum(1) - r.mean(1)).mean()),
                "weight_ess_fraction": float(ess), "target_rms": float(batch["target"].pow(2).mean().sqrt()),
                "num_states": int(p.shape[0])}
