"""Run-time selection: at every call draw N chunks from the policy and act with the best one.

`BestOf(policy, n, source)` is the `choose` hook of `rollout`: the N candidates of each env
come from one batched sampler call, `source` scores them (the reward model, or the simulator:
each candidate run on a copy of the call's env; diffusion_policy/sources.py), and
the highest-scoring chunk is executed. It is the run-time form of the tilt that fine-tuning
amortises (best of N is the lambda -> infinity limit on N samples), and a feature in its own
right for users with compute to spare at run time. With n = 1 it is plain sampling, draw for
draw. It keeps the wall time spent choosing, per call.
"""

import time

import torch


class BestOf:
    def __init__(self, policy, n, source=None):
        if n < 1:
            raise ValueError(f"best of n needs n >= 1, got {n}")
        if n > 1 and source is None:
            raise ValueError("best of n > 1 needs a reward source to choose by")
        self.policy, self.n, self.source = policy, n, source
        self.calls, self.seconds = 0, 0.0

    @torch.no_grad()
    def __call__(self, history, envs, n_exec, generator=None):
        """history (B, obs_horizon, obs_dim) raw windows; envs (B,) the calls' environments ->
        the policy's output dict for the chosen chunks (B, ...)."""
        started = time.time()
        obs = torch.as_tensor(history, dtype=torch.float32)
        if self.n == 1:
            out = self.policy.predict_action(obs, generator=generator)
        else:
            b, n = obs.shape[0], self.n
            obs_n = obs.repeat_interleave(n, dim=0)
            cand = self.policy.predict_action(obs_n, generator=generator)
            envs_n = [env for env in envs for _ in range(n)] if self.source.needs_env else None
            r = self.source.reward(obs_n, cand["action_pred_norm"], envs_n, [n_exec] * (b * n)).view(b, n)
            rows = r.argmax(dim=1).to(cand["action"].device) + torch.arange(b, device=cand["action"].device) * n
            out = {key: cand[key][rows] for key in ("action", "action_pred", "action_pred_norm")}
        self.calls += 1
        self.seconds += time.time() - started
        return out

    @property
    def seconds_per_call(self):
        return self.seconds / self.calls if self.calls else 0.0
