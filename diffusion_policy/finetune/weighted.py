"""Reward-weighted denoising (`--method weighted`): reach the tilt from the values of r alone.

At (up to `states_per_iter` of) the calls the current policy makes before success, draw K =
`num_candidates` chunks from the current policy, score them with the reward source and weight
them per state by w = softmax(lambda r): the self-normalised importance weights of the tilt
p(chunk | obs) exp(lambda r). No gradient of r is used. The tilt is fitted *as a correction to
the frozen base model* (`posterior_tilt_loss`): treat the K candidates as the base's
distribution at the state; for a noised chunk x_t the tilted noise predictor is the base's plus
a correction that depends only on the posterior over which candidate x_t came from, under
uniform and under w weights. The loss regresses e(x_t) on e_base(x_t) + correction: the
candidates are integrated out (Rao-Blackwell), so the target carries no eps noise, and one
network call per state does. tests/test_weighted.py checks on a Gaussian with a linear reward
that the fit lands on the analytic tilt, and that weights with no information (the control: a
state's weights handed to its candidates in random order) leave the base where it is.

The variants this method was measured with and that lost (best-of-K and standardised weights,
an EMA or live anchor, the sample loss, replay, acting with the best candidate, rounds) are in
docs/findings.md with the commit that ran them.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_policy import rollout as rollout_module
from diffusion_policy.common.cli import count
from diffusion_policy.finetune.config import TILT_FLAGS, DenoiserMethod, MethodConfig

SHUFFLES = 4  # shufflings of the weights averaged into the posterior's baseline (see posterior_tilt_loss)


@dataclass
class WeightedConfig(MethodConfig):
    """The protocol's best setting (docs/findings.md): lambda 100, 40 iterations, lr 5e-5, EMA 0.998."""

    num_ft_iters: int = 40
    num_eps: int = 8
    lr: float = 5e-5
    reward_scale: float = 100.0
    grad_steps_per_iter: int = 16
    ema_decay: float = 0.998
    num_candidates: int = 8  # chunks drawn per visited state
    states_per_iter: int = 256  # visited states kept per iteration, at random
    batch_states: int = 128  # states per optimiser step, each with all its candidates

    def __post_init__(self):
        super().__post_init__()
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be at least 2 (weights need a choice), got {self.num_candidates}")
        if self.states_per_iter < 1 or self.batch_states < 1:
            raise ValueError(f"states_per_iter and batch_states must be >= 1, got {self.states_per_iter}, "
                             f"{self.batch_states}")


def shuffle_rows(x, generator=None):
    """Each row of x (S, K) in its own random order."""
    perm = torch.argsort(torch.rand(x.shape, generator=generator), dim=1).to(x.device)
    return torch.gather(x, 1, perm)


def candidate_weights(r, reward_scale, control=False, generator=None):
    """Per-state weights softmax(lambda r) (S, K) of K candidates from their rewards r (S, K).

    control: the same weights, each state's handed to its candidates in a random order (the
    choice made at random: same data volume, same weight distribution, no information)."""
    r = torch.as_tensor(r, dtype=torch.float32)
    if control:
        r = shuffle_rows(r, generator)
    return torch.softmax(reward_scale * r, dim=1)


def posterior_tilt_loss(eps_fn, base_eps_fn, x0, weights, noise, t, abar, generator=None, shuffles=SHUFFLES):
    """The tilt of a state's K candidates, fitted to its conditional expectation given x_t.

    Treat a state's K candidates as the base's distribution there. For a noised chunk x_t the
    posterior over which candidate it came from is p_u(i | x_t) ~ N(x_t; sqrt(abar) x0_i, 1 - abar)
    under the base, and p_w(i | x_t) ~ w_i N(...) under the tilt, so the tilted noise predictor is

        E_tilt[eps | x_t] = E_base[eps | x_t] - sqrt(abar / (1 - abar)) * sum_i (p_w - p_u)(i | x_t) x0_i

    and the loss regresses e(x_t) on e_base(x_t) plus that correction; x_t comes from a uniformly
    chosen candidate. The correction is not linear in w: with shuffled (control) weights p_w - p_u
    does not average to zero where a few candidates share the posterior. So the baseline is not
    p_u but the mean of p_w over `shuffles` random shufflings of each state's weights: a control
    run's correction then has mean exactly zero, while informative weights keep the tilt.

    eps_fn / base_eps_fn(x (S, T, D), t (S,)) -> eps; x0 (S, K, T, D) normalised candidates;
    weights (S, K), rows summing to 1; noise (S, T, D) and t (S,).
    Returns (loss, mean squared correction (S,) detached)."""
    S, K = weights.shape
    pick = torch.multinomial(torch.full_like(weights, 1.0 / K).cpu(), 1, generator=generator).squeeze(1).to(x0.device)
    a = abar[t].view(S, 1, 1)
    x_t = a.sqrt() * x0[torch.arange(S, device=x0.device), pick] + (1 - a).sqrt() * noise
    d2 = ((x_t.unsqueeze(1) - a.unsqueeze(1).sqrt() * x0) ** 2).flatten(2).sum(2)  # (S, K)
    log_phi = -d2 / (2 * (1 - a.view(S, 1)))

    def p_given(w):  # posterior over the candidates under weights w
        return torch.softmax(log_phi + w.clamp_min(1e-30).log(), dim=1)

    baseline = torch.stack([p_given(shuffle_rows(weights, generator)) for _ in range(shuffles)]).mean(0)
    shift = torch.einsum("sk,sktd->std", p_given(weights) - baseline, x0)
    correction = -(a / (1 - a)).sqrt() * shift
    with torch.no_grad():
        target = base_eps_fn(x_t, t) + correction
    loss = ((eps_fn(x_t, t) - target) ** 2).mean()
    return loss, (correction ** 2).flatten(1).mean(1).detach()


class RewardWeighted(DenoiserMethod):
    """collect() the current policy's states and scored candidates; prepare() their weights once per
    iteration; loss() for each optimiser step; summary() of the iteration."""

    name, config_class = "weighted", WeightedConfig
    about = "reward-weighted denoising: fits the tilt from the reward's values on the policy's own samples"
    flags = {**TILT_FLAGS, "num_candidates": (count(2), "chunks drawn per visited state")}

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        self.config, self.base, self.ft, self.train_model = config, base, ft, train_model
        self.source, self.generator, self.control = source, generator, control

    def collect(self, seeds, max_steps):
        """Roll the current policy out; at up to states_per_iter of its calls made before success
        draw num_candidates chunks from it and score them. None if no call qualifies."""
        cfg, ft, source, gen = self.config, self.ft, self.source, self.generator
        ft.eval()
        K = cfg.num_candidates
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
        obs_k = obs.repeat_interleave(K, dim=0)
        with torch.no_grad():
            x0 = ft.predict_action(obs_k, generator=gen)["action_pred_norm"]
        envs = np.repeat(calls["env"][ep, call], K) if source.needs_env else None
        r = source.reward(obs_k, x0, envs, np.repeat(calls["n_exec"][call], K))
        return {"cond": ft.obs_cond(obs), "x0": x0.view(len(ep), K, *x0.shape[1:]),
                "r": r.view(len(ep), K).to(ft.device)}, out

    def prepare(self, batch):
        """The iteration's weights (the control's random order is drawn here, once)."""
        w = candidate_weights(batch["r"], self.config.reward_scale, self.control, self.generator)
        return {**batch, "w": w.to(self.ft.device)}

    def loss(self, batch, i):
        """Optimiser step i's loss, on batch_states of the iteration's states drawn afresh."""
        ft, gen = self.ft, self.generator
        idx = torch.randperm(len(batch["w"]), generator=gen)[:self.config.batch_states].to(ft.device)
        x0, w, cond = batch["x0"][idx], batch["w"][idx], batch["cond"][idx]
        noise, t = (v.to(ft.device) for v in ft.draw_noise((len(w), *x0.shape[2:]), gen, ft.device))
        loss, correction_sq = posterior_tilt_loss(
            lambda x, tt: self.train_model(x, tt, cond), lambda x, tt: self.base.model(x, tt, cond),
            x0, w, noise, t, ft.alphas_cumprod, generator=gen)
        return loss, {"correction_sq": float(correction_sq.mean())}

    def summary(self, batch):
        r, w = batch["r"], batch["w"]
        ess = (1.0 / (w ** 2).sum(1)).mean() / w.shape[1]
        return {"candidate_reward": float(r.mean()), "selected_reward_gain": float(((w * r).sum(1) - r.mean(1)).mean()),
                "weight_ess_fraction": float(ess), "num_states": int(w.shape[0])}
