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
per-step returns telescope to the chunk residual's. `--step_potential frame` (the reward model only):
u_t is instead the reward model's value of the observation after step t (a dynamics reward model,
train_reward.py's default, has that part: frame -> reward), so the learned potential moves at every
step as the simulator's does.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_policy import rollout as rollout_module
from diffusion_policy.common.runtime import UserError
from diffusion_policy.finetune.critic import step_transitions, step_values
from diffusion_policy.finetune.residual import ResidualConfig, ResidualRL
from diffusion_policy.residual_policy import ResidualNetConfig


STEP_POTENTIALS = ("chunk", "frame")


@dataclass
class ResidualStepConfig(ResidualConfig):
    """The chunk residual's preset, per step (gamma and n_step per call, as there)."""

    step_potential: str = "chunk"  # the learned reward's u_t: "chunk" (the last finished chunk's value) or "frame"

    def __post_init__(self):
        super().__post_init__()
        if self.step_potential not in STEP_POTENTIALS:
            raise ValueError(f"step_potential must be one of {STEP_POTENTIALS}, got {self.step_potential!r}")

    def net_config(self):
        return ResidualNetConfig(self.alpha, self.hidden_dims, per_step=True, act_within=self.act_within,
                                 act_value=self.act_value)


class ResidualStepRL(ResidualRL):
    name, config_class = "residual_step", ResidualStepConfig
    about = ("a bounded residual on each control step of the frozen policy, from that step's window (ResFiT), "
             "trained against a per-step critic")
    flags = {**ResidualRL.flags, "step_potential": (str, "the learned reward per step (" + " or ".join(STEP_POTENTIALS)
                                                    + "): the value of the last chunk finished, or the reward "
                                                      "model's value of each step's observation (a dynamics reward "
                                                      "model); the simulator's reward is per step either way")}

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        super().__init__(config, base, ft, train_model, source, generator, control)
        if config.step_potential == "frame" and source is not None:
            if source.name != "model":
                raise UserError("--step_potential frame is the reward model's value of each frame: use it with "
                                "--reward_source model (the simulator's reward is per step already)")
            if source.reward_model.config.structure != "dynamics":
                raise UserError(f"--step_potential frame needs a reward model that values a frame (train_reward.py's "
                                f"default structure, dynamics); this one is {source.reward_model.config.structure}: "
                                "use --step_potential chunk")
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
            on = ft.gated(state["on"], history[:, -1]) if cfg.gate_collection else state["on"]
            raw, acted, _ = ft.step_delta(history, base, on * (delta + noise).clamp(-cfg.alpha, cfg.alpha))
            record.append((cond.cpu(), base.cpu(), acted.cpu(), torch.as_tensor(history[:, -1], dtype=torch.float32)))
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
        cond, base, act, seen = (torch.stack([r[k] for r in record], 1) for k in range(4))  # (N, T, ...)
        values = frames = None  # the simulator: its reward per step
        if self.source.name != "simulator":
            if cfg.step_potential == "frame":  # u_t: the value of the frame after step t
                after = torch.cat([seen[:, 1:], torch.as_tensor(calls["obs_after"][:, -1:], dtype=torch.float32)], 1)
                frames = self.source.frame_reward(torch.cat([seen[:, :1], after], 1).flatten(0, 1)).view(
                    len(seeds), -1).double().cpu().numpy()  # (N, T + 1): the start, then after each step
            else:  # u_t: the value of the last chunk finished
                values = self.chunk_values(calls, torch.as_tensor(calls["obs"], dtype=torch.float32),  # (N, C)
                                           self.ft.action_normalizer.normalize(
                                               torch.as_tensor(calls["action_pred"], dtype=torch.float32)))
        errors, potentials, starts = [], [], []
        T = res["steps"]
        for i in range(len(seeds)):
            sts = int(res["steps_to_success"][i])
            L = sts if sts >= 0 else T  # steps of the episode: up to and with the one that succeeded
            start = calls["reward_before"][i, 0]
            if frames is not None:
                start, u = frames[i, 0], frames[i, 1:L + 1]
            elif values is None:
                u = res["rewards"][i, :L]
            else:
                u = step_values(values[i], calls["step"], T, start, sts - 1 if sts >= 0 else -1)[:L]
            errors.append(u - res["rewards"][i, :L])  # the potential against the simulator's reward
            potentials.append(u)
            starts.append(start)
        out = step_transitions(potentials, starts, res["steps_to_success"], cond, base[:, :, None], act[:, :, None],
                               self.gamma_step, cfg.n_step * self.horizon)
        return self.store(out, res, p_on, self.horizon, step_value=float(np.mean(np.concatenate(potentials))),
                          potential_rmse=float(np.sqrt(np.mean(np.concatenate(errors) ** 2))))
