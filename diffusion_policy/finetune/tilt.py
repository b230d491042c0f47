"""The tilt meter: did fine-tuning reach its own target, p_base(chunk | obs) exp(lambda r)?

On a fixed set of states (calls of the base policy's rollouts from the tilt seed range,
500000+, never evaluation seeds) the meter draws `num_samples` fresh chunks per state from
a policy and scores them with the run's reward source. Per state:

    predicted = E_tilt[r] - E_base[r]   the exact tilt of the base's own samples at the run's
                                        lambda: self-normalised weights softmax(lambda r) (of the
                                        state's standardised r for --weighting standardized), or
                                        for --weighting best the best of k (order statistics)
    realised  = E_policy[r] - E_base[r]  one fresh chunk of the fine-tuned policy, same states

Both come as means over states with paired 95 % intervals (normal approximation over
states), and realised / predicted is the fraction of its target a run reached. The base and
the fine-tuned policy draw with the same sampling noise (common random numbers), so the
difference is not swamped by sampling noise. Minutes on a CPU, not an hour of evaluation.
"""

import math

import numpy as np
import torch

from diffusion_policy.rollout import rollout
from diffusion_policy.seeds import TILT_SEED_START
from diffusion_policy.stats import Z95
from diffusion_policy.finetune.weighted import standardize_rows


def tilt_gain_per_state(r, lam, return_weights=False, reward=None):
    """E_tilt[r] - E[r] per state under self-normalised weights softmax(lam r). r: (S, N) -> (S,)
    (and the weights (S, N) with return_weights). With `reward` the weights come from r (for
    example standardised rewards) and the gain is measured in `reward`."""
    r = torch.as_tensor(r, dtype=torch.float64)
    w = torch.softmax(lam * r, dim=1)
    reward = r if reward is None else torch.as_tensor(reward, dtype=torch.float64)
    gain = (w * reward).sum(1) - reward.mean(1)
    return (gain, w) if return_weights else gain


def tilt_gain(r, lam):
    """Mean over states of the tilt gain, and the mean relative effective sample size (1 / sum w^2) / N."""
    gain, w = tilt_gain_per_state(r, lam, return_weights=True)
    ess = (1.0 / (w ** 2).sum(1)).mean() / w.shape[1]
    return float(gain.mean()), float(ess)


def best_of_gain_per_state(r, k):
    """E[max of a random k-subset of the N samples] - E[r] per state. r: (S, N) -> (S,).

    With the samples sorted ascending, the i-th (1-based) is the subset's maximum with
    probability C(i - 1, k - 1) / C(N, k)."""
    r = torch.as_tensor(r, dtype=torch.float64)
    n = r.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"best of k needs 1 <= k <= N = {n}, got k = {k}")
    i = torch.arange(k, n + 1, dtype=torch.float64)  # below k, a sample is never the maximum
    log_p = (torch.lgamma(i) - torch.lgamma(i - k + 1) - math.lgamma(k)
             - (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)))
    return (r.sort(dim=1).values[:, k - 1:] * log_p.exp()).sum(1) - r.mean(1)


def best_of_gain(r, k):
    """Mean over states of the best-of-k gain."""
    return float(best_of_gain_per_state(r, k).mean())


def mean_interval(values):
    """(mean, [low, high]) of per-state values: normal 95 % interval, unclipped."""
    x = np.asarray(values, dtype=np.float64)
    half = Z95 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return float(x.mean()), [float(x.mean() - half), float(x.mean() + half)]


class TiltStates:
    """Fixed states to measure at: raw observation windows (S, To, Do), the calls' env copies
    (S,) (None when the reward source does not need them) and executed steps n_exec (S,)."""

    def __init__(self, obs, envs, n_exec):
        self.obs, self.envs, self.n_exec = obs, envs, np.asarray(n_exec)

    def __len__(self):
        return len(self.obs)

    @classmethod
    def collect(cls, policy, seeds, num_states, max_steps=300, with_envs=False, seed=0):
        """Roll `policy` out from `seeds` and keep `num_states` of its calls made before success,
        evenly spread over all of them (so early, middle and late states of an episode)."""
        res = rollout(policy, seeds, max_steps=max_steps, generator=torch.Generator().manual_seed(seed),
                      record_calls=True, record_envs=with_envs)
        calls = res["calls"]
        ep, call = np.nonzero(calls["active"])
        if len(ep) == 0:
            raise ValueError(f"every episode of seeds {seeds[0]}..{seeds[-1]} succeeded at once: no states to measure")
        pick = np.unique(np.linspace(0, len(ep) - 1, min(num_states, len(ep))).round().astype(int))
        ep, call = ep[pick], call[pick]
        envs = calls["env"][ep, call] if with_envs else None
        return cls(calls["obs"][ep, call], envs, calls["n_exec"][call])


class TiltMeter:
    """Scores policies on fixed states with `source`; the base's samples set the prediction."""

    def __init__(self, base, source, states, reward_scale, num_samples=16, weighting="softmax", best_of=8, seed=0):
        self.source, self.states, self.num_samples, self.seed = source, states, num_samples, seed
        self.reward_scale, self.weighting, self.best_of = reward_scale, weighting, best_of
        self.r_base = self.sample_rewards(base)
        if weighting == "best":
            self.predicted = best_of_gain_per_state(self.r_base, min(best_of, num_samples)).numpy()
        elif weighting == "standardized":
            self.predicted = tilt_gain_per_state(standardize_rows(self.r_base), reward_scale, reward=self.r_base).numpy()
        else:
            self.predicted = tilt_gain_per_state(self.r_base, reward_scale).numpy()

    @torch.no_grad()
    def sample_rewards(self, policy):
        """Rewards (S, M) of M fresh chunks of `policy` per state (the same sampling noise every time)."""
        m = self.num_samples
        obs = torch.as_tensor(self.states.obs, dtype=torch.float32).repeat_interleave(m, dim=0)
        x0 = policy.predict_action(obs, generator=torch.Generator().manual_seed(self.seed))["action_pred_norm"]
        envs = None if self.states.envs is None else np.repeat(self.states.envs, m)
        n_exec = np.repeat(self.states.n_exec, m)
        r = self.source.reward(obs, x0, envs, n_exec)
        return r.detach().double().cpu().view(len(self.states), m)

    def measure(self, policy):
        """{tilt_realised, _ci95, tilt_predicted, _ci95, tilt_fraction, tilt_base_reward, tilt_policy_reward}."""
        r = self.sample_rewards(policy)
        realised, realised_ci = mean_interval((r.mean(1) - self.r_base.mean(1)).numpy())
        predicted, predicted_ci = mean_interval(self.predicted)
        return {"tilt_realised": realised, "tilt_realised_ci95": realised_ci,
                "tilt_predicted": predicted, "tilt_predicted_ci95": predicted_ci,
                "tilt_fraction": realised / predicted if predicted else float("nan"),
                "tilt_base_reward": float(self.r_base.mean()), "tilt_policy_reward": float(r.mean())}


def build_tilt_meter(base, source, reward_scale, num_states=64, num_samples=16, weighting="softmax", best_of=8,
                     max_steps=300):
    """The tilt meter on `num_states` calls of the base policy's rollouts from seeds 500000+
    (num_states // 8 episodes), with the base's samples and sampling noise seeded from that range."""
    seeds = list(range(TILT_SEED_START, TILT_SEED_START + max(1, num_states // 8)))
    states = TiltStates.collect(base, seeds, num_states, max_steps=max_steps, with_envs=source.needs_env,
                                seed=TILT_SEED_START)
    return TiltMeter(base, source, states, reward_scale, num_samples=num_samples, weighting=weighting,
                     best_of=best_of, seed=TILT_SEED_START)
