"""The residual per control step (`--method residual_step`): ResFiT's closed loop on the frozen policy.

As `--method residual` (residual.py: the critic ensemble, TD targets, actor, control, EMA, resume),
but the residual corrects one action at a time, from the observation window of the step it is
taken in, instead of the whole executed chunk from the window at the call: the base's chunk is
sampled every `action_horizon` steps as shipped, and inside it the residual can react to what the
last actions did (ResFiT, Ankile et al. 2025: a per-step residual on an action-chunked base).
A transition is one control step; the critic is Q(obs window, action).

The settings keep their per-call meaning (so the defaults are the chunk residual's): a step
discounts by gamma ** (1 / action_horizon) and a TD target sums n_step * action_horizon steps.
Rewards per step, shaped by a potential as in residual.py (r_t = gamma_s u_t - u_(t-1), u_t - u_(t-1) at
the step that succeeds): with the simulator u_t is the reward after step t; with the reward model,
whose values are of executed chunks, u_t is the value of the last chunk finished by step t (the
chunk's own at the step that succeeds; the reward at the start before the first chunk ends), so the
per-step returns telescope to the chunk residual's.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_policy import rollout as rollout_module
from diffusion_policy.finetune.residual import FIELDS, ResidualConfig, ResidualRL, nstep_targets, shaped_rewards
from diffusion_policy.residual_policy import ResidualNetConfig


@dataclass
class ResidualStepConfig(ResidualConfig):
    """The chunk residual's preset, per step (gamma and n_step per call, as there)."""

    def net_config(self):
        return ResidualNetConfig(self.alpha, self.hidden_dims, per_step=True)


def step_values(source_values, call_steps, n_steps, start_value, success_step):
    """u (n_steps,): the value after each control step of one episode, from chunk values.

    source_values (C,): the value of each call's executed chunk; call_steps (C,): the control step
    at which each call began; success_step: the step that succeeded (-1: none). A step carries the
    value of the last chunk finished by it, the start value before the first, and the succeeding
    step its chunk's own."""
    ends = np.append(call_steps[1:], n_steps) - 1  # the last step of each call
    u = np.full(n_steps, float(start_value))
    for c, end in enumerate(ends):
        u[end:] = source_values[c]
    if success_step >= 0:
        u[success_step] = source_values[np.searchsorted(ends, success_step)]
    return u


class ResidualStepRL(ResidualRL):
    name, config_class = "residual_step", ResidualStepConfig
    about = ("a bounded residual on each control step of the frozen policy, from that step's window (ResFiT), "
             "trained against a per-step critic")
    flags = dict(ResidualRL.flags)

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        super().__init__(config, base, ft, train_model, source, generator, control)
        self.horizon = ft.config.action_horizon
        self.gamma_step = config.gamma ** (1.0 / self.horizon)

    def step_hook(self, record, p_on):
        """rollout's per-step action: the base chunk's step, the residual on with probability p_on per call."""
        ft, cfg, gen = self.ft, self.config, self.explore
        state = {}

        def act(history, out, j):
            base = out["action_pred_norm"][:, ft.config.obs_horizon - 1 + j]
            if j == 0:  # a new call: who acts with the residual during it
                state["on"] = (torch.rand(len(base), generator=gen) < p_on).to(base).view(-1, 1)
            cond = ft.obs_cond(torch.as_tensor(history, dtype=torch.float32))
            with torch.no_grad():
                delta = ft.residual(cond, base[:, None])[:, 0]
            noise = cfg.explore_std * torch.randn(delta.shape, generator=gen).to(delta)
            raw, acted, _ = ft.step_delta(history, base, state["on"] * (delta + noise).clamp(-cfg.alpha, cfg.alpha))
            record.append((cond.cpu(), base.cpu(), acted.cpu()))
            return raw

        return act

    def collect(self, seeds, max_steps):
        """Roll out with the residual at every step, turn the steps into n-step transitions, add them."""
        ft, cfg = self.ft, self.config
        ft.eval()
        record, p_on = [], self.on_probability()
        res = rollout_module.rollout(ft, seeds, max_steps=max_steps, generator=self.generator, record_calls=True,
                                     step=self.step_hook(record, p_on))
        calls = res["calls"]
        cond, base, act = (torch.stack([r[k] for r in record], 1) for k in range(3))  # (N, T, ...)
        values = None if self.source.name == "simulator" else self.chunk_values(  # (N, C); the simulator: per step
            calls, torch.as_tensor(calls["obs"], dtype=torch.float32),
            self.ft.action_normalizer.normalize(torch.as_tensor(calls["action_pred"], dtype=torch.float32)))
        out = {k: [] for k in FIELDS}
        T = res["steps"]
        for i in range(len(seeds)):
            sts = int(res["steps_to_success"][i])
            L = sts if sts >= 0 else T  # steps of the episode: up to and with the one that succeeded
            success_step = sts - 1 if sts >= 0 else -1
            start = calls["reward_before"][i, 0]
            if values is None:
                u = res["rewards"][i, :L]
            else:
                u = step_values(values[i], calls["step"], T, start, success_step)[:L]
            term = np.zeros(L, bool)
            if sts >= 0:
                term[success_step] = True
            r = shaped_rewards(u, start, term, self.gamma_step)
            idx, ret, disc, nxt = nstep_targets(r, success_step if sts >= 0 else None, self.gamma_step,
                                                cfg.n_step * self.horizon)
            for k, v in (("cond", cond[i, idx]), ("base", base[i, idx, None]), ("act", act[i, idx, None]),
                         ("ret", ret), ("disc", disc), ("next_cond", cond[i, nxt]), ("next_base", base[i, nxt, None])):
                out[k].append(torch.as_tensor(np.asarray(v), dtype=torch.float32))
        return self.store(out, res, p_on, self.horizon)
