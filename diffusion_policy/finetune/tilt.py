"""The tilt meter: did fine-tuning reach its own target, p_base(chunk | obs) exp(lambda r)?

On a fixed set of states (calls of the base policy's rollouts from the tilt seed range,
500000+, never evaluation seeds) the meter draws `num_samples` fresh chunks per state from
a policy and scores them with the run's reward source. Per state:

    predicted = E_tilt[r] - E_base[r]   the exact tilt of the base's own samples at the run's
                                        lambda: self-normalised weights softmax(lambda r)
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
from diffusion_policy.common.seeds import TILT_SEED_START
from diffusion_policy.common.stats import Z95


def tilt_gain_per_state(r, lam):
    """E_tilt[r] - E[r] per state under self-normalised weights softmax(lam r). r: (S, N) -> (S,)."""
    r = torch.as_tensor(r, dtype=torch.float64)
    return (torch.softmax(lam * r, dim=1) * r).sum(1) - r.mean(1)


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
    """Scores policies on fixed states with `source`; the base's samples set the prediction. A source
    marked `live` (a critic that is still learning, --method qam) has the base read again at every
    measurement, so that prediction and realisation use the same values."""

    def __init__(self, base, source, states, reward_scale, num_samples=16, seed=0):
        self.source, self.states, self.num_samples, self.seed = source, states, num_samples, seed
        self.base, self.reward_scale, self.r_base = base, reward_scale, None
        if not getattr(source, "live", False):
            self.read_base()

    def read_base(self):
        self.r_base = self.sample_rewards(self.base)
        self.predicted = tilt_gain_per_state(self.r_base, self.reward_scale).numpy()

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
        """{tilt_realised, _ci95, tilt_predicted, _ci95, tilt_fraction, tilt_base_reward, tilt_policy_reward,
        tilt_base_spread (the std of the base's values within a state, averaged over states: what lambda scales)}."""
        if self.r_base is None or getattr(self.source, "live", False):
            self.read_base()
        r = self.sample_rewards(policy)
        realised, realised_ci = mean_interval((r.mean(1) - self.r_base.mean(1)).numpy())
        predicted, predicted_ci = mean_interval(self.predicted)
        return {"tilt_realised": realised, "tilt_realised_ci95": realised_ci,
                "tilt_predicted": predicted, "tilt_predicted_ci95": predicted_ci,
                "tilt_fraction": realised / predicted if predicted else float("nan"),
                "tilt_base_reward": float(self.r_base.mean()), "tilt_policy_reward": float(r.mean()),
                "tilt_base_spread": float(self.r_base.std(1).mean())}


def build_tilt_meter(base, source, reward_scale, num_states=64, num_samples=16, max_steps=300):
    """The tilt meter on `num_states` calls of the base policy's rollouts from seeds 500000+
    (num_states // 8 episodes), with the base's samples and sampling noise seeded from that range."""
    seeds = list(range(TILT_SEED_START, TILT_SEED_START + max(1, num_states // 8)))
    states = TiltStates.collect(base, seeds, num_states, max_steps=max_steps, with_envs=source.needs_env,
                                seed=TILT_SEED_START)
    return TiltMeter(base, source, states, reward_scale, num_samples=num_samples, seed=TILT_SEED_START)
