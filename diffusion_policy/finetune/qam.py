"""Adjoint Matching toward a critic (`--method qam`; QAM: Li and Levine, "Q-learning with Adjoint Matching", 2026).

This project's Adjoint Matching (adjoint.py: the lean adjoint through the frozen base, the same loss)
with the terminal adjoint taken from a chunk critic instead of the one-chunk reward:

    a_K = -lambda * grad_x0 Qbar(obs window, executed steps of x0)       (normalised action space)

Qbar the mean over the ensemble of the critic's Polyak targets (QAM takes the target critic's gradient), or
with `grad_pessimism` k their mean - k x std (the residual's pessimistic actor, here in the adjoint).
The target is the tilt p_base(chunk | obs) exp(lambda Q), which stays at the base wherever Q is flat;
Q values what the chunk leads to over the next calls, where the learned reward values one chunk.

The critic is critic.py's, as the residual methods learn it: an ensemble of Q(obs window, executed
chunk) with LayerNorm, n-step TD over calls on the shaped reward (the reward model's value of each
executed chunk, or the simulator's reward after it), a replay buffer, Polyak targets, and QAM's
pessimistic backup mean - `backup_pessimism` x std over the ensemble. The next action of a TD target is
the chunk the policy executed at the next call (the buffer's policies are this run's recent ones,
close to the current one: a fresh chain per target would cost a sampler per critic step).

An iteration: collect() rolls the current (fine-tuned) policy out on `num_eps` fresh starts, keeping
each call's sampler chain, and puts the calls' transitions in the buffer; prepare() draws
am_updates x `am_batch` of the chains, takes a_K from the critic and solves the lean adjoint once;
loss(i) is a critic step on a batch from the buffer at every optimiser step, plus an Adjoint
Matching step on the next `am_batch` chains at every `am_every`-th (am_updates = ceil(steps / am_every)).
The first `warmup_iters` iterations train the critic alone, on the base's rollouts. The fine-tuned
denoiser is the saved policy, a plain diffusion policy sampled by the standard sampler; the critic
goes with it ("critic", for run-time selection).

With `tilt_value` L the tilt is learnt only near success, as the learned gate judges it: the Adjoint Matching chains
are drawn from the calls whose last observation frame the dynamics reward model values at least L (residual_policy.py's
FrameValue, the gate of `--act_value`), so the target is p_base exp(lambda Q) there and the shared denoiser's capacity
goes where the failures are near misses. The gate is read in training only: the saved policy is a plain diffusion
policy with no gate, sampled everywhere.

With `critic_unit` step the critic values one control step, Q(the step's window, its action), learnt as the residual
per step learns it (residual_step.py: the steps' transitions, gamma and n_step per call), and the chunk's terminal
adjoint is -lambda times each executed step's action gradient at the window the rollout saw when it took it
(sources.py's StepCriticValue: the sum over the chunk's executed steps, those after success not counted). The residual
per step climbs the same gradients one step at a time; here they tilt the chunk the denoiser samples. With `tilt_value`
the gate is per step (the frame the step was taken from), and a chain is drawn if any of its steps passes.

With `correction_dims` (QAM's `residual` option) the UNet stays frozen and only a small MLP added to its noise
prediction (model.py's NoiseCorrection, zero at the start) is trained: the Adjoint Matching step's backward runs
through it alone, and the saved policy is still a plain diffusion policy (its UNet the base's, bit for bit).

The control (`--control`) is the critic's (critic.py): the (return, bootstrap factor) pairs permuted
across each batch, so the critic, and the gradient it hands the sampler, carry no information about
which chunk earned what; the same data, steps and updates.
"""

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffusion_policy import rollout as rollout_module
from diffusion_policy.common.cli import count, fraction, nonnegative
from diffusion_policy.common.runtime import UserError
from diffusion_policy.finetune.adjoint import AdjointConfig, AdjointMatching
from diffusion_policy.finetune.critic import (CRITIC_FLAGS, TDCritic, check_critic_settings, chunk_transitions,
                                              chunk_values, step_transitions, step_values)
from diffusion_policy.model import ConditionalUnet1D, UNetConfig
from diffusion_policy.residual_policy import FrameValue, check_frame_value_source, critic_dims
from diffusion_policy.sources import CriticValue, StepCriticValue

CRITIC_UNITS = ("chunk", "step")


@dataclass
class QAMConfig(AdjointConfig):
    """The CPU preset: 24 iterations of 64 episodes (about 2,400 chains and chunk transitions each), 1,000
    critic steps and 10 Adjoint Matching steps of 128 chains per iteration. lambda 50 (the base's Q spreads
    by 0.027 within a state: a tilt of about 1.4 of its std) and lr 1e-5 set by the tilt meter and the
    rollouts of 8-iteration runs (docs/findings.md: at lr 1e-4 the update's noise, not the tilt, moved the
    policy, and its success fell)."""

    num_ft_iters: int = 24
    num_eps: int = 64
    lr: float = 1e-5  # the denoiser's learning rate after warm-up
    reward_scale: float = 50.0  # lambda = QAM's inv_temp: the target is p_base exp(lambda Q)
    grad_steps_per_iter: int = 1000  # critic steps; every am_every-th also an Adjoint Matching step
    num_loss_steps: int = 2
    hidden_dims: tuple = (256, 256)  # each critic's hidden layers
    critic_lr: float = 3e-4
    num_critics: int = 4
    gamma: float = 0.9  # per call (8 control steps)
    n_step: int = 3
    tau: float = 0.01
    batch_size: int = 256  # transitions per critic step
    buffer_size: int = 200_000
    warmup_iters: int = 4  # iterations of critic steps alone, on the base's rollouts
    backup_pessimism: float = 0.5  # the TD backup: the ensemble's mean - this x std (QAM's 0.5)
    grad_pessimism: float = 0.0  # a_K climbs the targets' mean - this x their std (0: the mean, QAM's)
    am_every: int = 100  # optimiser steps per Adjoint Matching step
    am_batch: int = 128  # chains per Adjoint Matching step
    correction_dims: tuple = ()  # train only a small MLP added to the UNet's output, these hidden sizes; (): the UNet
    tilt_value: float | None = None  # Adjoint Matching only on chains whose last frame the reward model values >= this
    critic_unit: str = "chunk"  # what the critic values: the executed chunk, or one control step (a per-step critic)

    def __post_init__(self):
        super().__post_init__()
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if not self.reward_scale > 0:
            raise ValueError(f"reward_scale (lambda, QAM's inv_temp) must be > 0 for --method qam, got "
                             f"{self.reward_scale!r}")
        check_critic_settings(self)
        for name in ("am_every", "am_batch"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        self.correction_dims = tuple(int(d) for d in self.correction_dims)
        if self.correction_dims and min(self.correction_dims) < 1:
            raise ValueError(f"correction_dims must be positive sizes, got {self.correction_dims}")
        for name in ("backup_pessimism", "grad_pessimism"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.critic_unit not in CRITIC_UNITS:
            raise ValueError(f"critic_unit must be one of {CRITIC_UNITS}, got {self.critic_unit!r}")
        if self.tilt_value is not None:
            self.tilt_value = float(self.tilt_value)
            if not 0.0 < self.tilt_value <= 1.0:
                raise ValueError(f"tilt_value must be in (0, 1] (a level of the reward, clip(coverage / 0.95)), got "
                                 f"{self.tilt_value!r}")


class QAM(AdjointMatching):
    """AdjointMatching whose a_K is -lambda grad Qbar; a critic step at every optimiser step."""

    name, config_class = "qam", QAMConfig
    about = ("Adjoint Matching toward a chunk critic (QAM): the terminal adjoint -lambda grad Q of a critic "
             "learnt by n-step TD beside the fine-tuned denoiser")
    flags = {**AdjointMatching.flags, **CRITIC_FLAGS,
             "backup_pessimism": (nonnegative, "the TD backup: the critics' mean - this x their std"),
             "grad_pessimism": (nonnegative, "k: the terminal adjoint climbs the target critics' mean - k x their std "
                                             "(a pessimistic gradient stays where the critics agree; 0: the mean)"),
             "am_every": (count(1), "optimiser steps (critic steps) per Adjoint Matching step"),
             "am_batch": (count(1), "sampler chains per Adjoint Matching step"),
             "correction_dims": (count(1), "train only a small MLP added to the UNet's noise prediction, with these "
                                           "hidden sizes (QAM's residual option; its backward runs through it "
                                           "alone), e.g. 256 256; unset: the whole UNet"),
             "tilt_value": (fraction, "learn the tilt only near success: Adjoint Matching on the chains of calls whose "
                                      "last frame the reward model values at least this (the learned gate's value, "
                                      "e.g. 0.45; read in training only, the saved policy has no gate); unset: all; "
                                      "with --critic_unit step, per step: the frame the step was taken from"),
             "critic_unit": (str, "what the critic values (" + " or ".join(CRITIC_UNITS) + "): the executed chunk "
                                  "at the call's window, or one control step at its own window (the residual per "
                                  "step's critic; the chunk's terminal adjoint is then each executed step's action "
                                  "gradient at the window the rollout saw)")}

    @classmethod
    def check_start(cls, policy_ckpt, path, config, world):
        if world > 1:
            raise UserError("--method qam runs in one process (its replay buffer and critic are not sharded): "
                            "run it without torchrun")
        super().check_start(policy_ckpt, path, config, world)
        if config.correction_dims and policy_ckpt["config"]["model"].get("correction_dims"):
            raise UserError(f"{path} already carries a correction inside its denoiser: fine-tune it without "
                            "--correction_dims (the whole denoiser, its correction included), or start from its base")

    @classmethod
    def check_source(cls, config, reward_source, reward_ckpt):
        if config.tilt_value is not None:
            check_frame_value_source(reward_ckpt, "--tilt_value reads the reward model's value of a frame",
                                     "leave --tilt_value unset")

    @staticmethod
    def make_policy(base, config):
        """The whole UNet takes gradients, or (correction_dims) only a fresh correction added to the frozen UNet."""
        if not config.correction_dims:
            return AdjointMatching.make_policy(base, config)
        ft = copy.deepcopy(base)
        ft.unet_config = UNetConfig(**{**base.unet_config.to_dict(), "correction_dims": config.correction_dims,
                                       "correction_horizon": base.config.pred_horizon})
        model = ConditionalUnet1D(ft.unet_config).to(base.device)
        missing, unexpected = model.load_state_dict(base.model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("correction.") for k in missing), (missing, unexpected)
        ft.model = model.requires_grad_(False)
        ft.model.correction.requires_grad_(True)
        return ft

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        super().__init__(config, base, ft, train_model, source, generator, control)
        cond_dim, _ = critic_dims(ft.config)
        self.per_step, self.horizon = config.critic_unit == "step", ft.config.action_horizon
        self.value_class = StepCriticValue if self.per_step else CriticValue
        self.td = TDCritic(cond_dim, (1 if self.per_step else self.horizon, ft.config.action_dim), config.hidden_dims,
                           config.num_critics, config.buffer_size, config.tau, ft.device, config.backup_pessimism)
        self.gradient_source = self.value_class(self.td.target, ft, config.grad_pessimism)  # a_K = -lambda grad Qbar
        self.gamma_step = config.gamma ** (1.0 / self.horizon)  # a per-step critic: per step, as residual_step's
        self.shuffle_gradients = False  # the control is the critic's (its targets permuted)
        self.frame_value = None if config.tilt_value is None else FrameValue.of(source.reward_model)
        self.iteration = 0  # iterations collected

    def tilt_source(self, source):
        """The tilt meter reads the live critic: the tilt toward exp(lambda Q) is what the run aims at."""
        meter = self.value_class(self.td.critic, self.ft)
        meter.live = True
        return meter

    def param_groups(self):
        return [{"params": [p for p in self.ft.model.parameters() if p.requires_grad], "lr": self.config.lr},
                {"params": list(self.td.critic.parameters()), "lr": self.config.critic_lr}]

    def loss_updates(self):
        return math.ceil(self.config.grad_steps_per_iter / self.config.am_every)

    # ---- collection ---------------------------------------------------------------------------
    def collect(self, seeds, max_steps):
        """Roll the policy out keeping its chains; its calls' transitions (or its steps', a per-step critic) go
        into the buffer."""
        ft, cfg = self.ft, self.config
        ft.eval()
        record = []
        res = rollout_module.rollout(ft, seeds, max_steps=max_steps, generator=self.generator,
                                     record_trajectories=True, record_envs=False,
                                     step=self.step_hook(record) if self.per_step else None)
        calls = res["calls"]
        traj = torch.from_numpy(calls["trajectory"])  # (N, C, K + 1, Tp, D)
        x0, obs = traj[:, :, -1], torch.from_numpy(calls["obs"])
        act = ft.executed(x0.flatten(0, 1)).view(*x0.shape[:2], self.horizon, -1)
        values = chunk_values(self.source, calls, obs, x0, ft.device)
        cond = torch.from_numpy(calls["obs_cond"])
        steps = {}  # a per-step critic: per call, its executed steps' windows, frames and which count
        if self.per_step:
            parts, steps = self.step_parts(record, res, values, act)
        else:
            parts = chunk_transitions(calls, res["steps_to_success"], values, cond, act, act, cfg.gamma, cfg.n_step)
        self.td.buffer.add({k: torch.cat(v) for k, v in parts.items()})
        self.iteration += 1
        out = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean()),
               "buffer_size": self.td.buffer.size, "chunk_value": float(values[calls["active"]].mean())}
        if self.td.buffer.size < cfg.batch_size:
            return None, out
        mask = torch.from_numpy(calls["active"].reshape(-1))  # the chains made before success
        chains = {"traj": traj.flatten(0, 1)[mask].transpose(0, 1), "cond": cond.flatten(0, 1)[mask],
                  "obs": obs.flatten(0, 1)[mask], **{k: v.flatten(0, 1)[mask] for k, v in steps.items()}}
        return {**{k: v.to(ft.device) for k, v in chains.items()}, "envs": None, "n_exec": None}, out

    def step_hook(self, record):
        """rollout's per-step action (a per-step critic): the chunk's own step, uncorrected; its window and frame
        recorded."""
        def act(history, out, j):
            window = torch.as_tensor(history, dtype=torch.float32)
            record.append((self.ft.obs_cond(window).cpu(), window[:, -1]))
            return out["action"][:, j]

        return act

    def step_parts(self, record, res, values, act):
        """A per-step critic's transitions (residual_step's, each step's action its chain's clean chunk's) and, per
        call, the windows its executed steps were taken from, their frames and which count (executed before success).

        values (N, C): the source's value of each executed chunk; act (N, C, H, D): the executed steps."""
        calls, T, H, sts = res["calls"], res["steps"], self.horizon, res["steps_to_success"]
        cond_t, frame_t = (torch.stack([r[k] for r in record], 1) for k in range(2))  # (N, T, ...)
        call_of = np.repeat(np.arange(len(calls["step"])), calls["n_exec"])  # (T,): the call of each step
        act_t = act[:, call_of, np.arange(T) - calls["step"][call_of]]  # (N, T, D)
        starts, potentials = calls["reward_before"][:, 0], []
        for i, s in enumerate(sts):
            L = s if s >= 0 else T
            potentials.append(res["rewards"][i, :L] if self.source.name == "simulator" else
                              step_values(values[i], calls["step"], T, starts[i], s - 1 if s >= 0 else -1)[:L])
        parts = step_transitions(potentials, starts, sts, cond_t, act_t[:, :, None], act_t[:, :, None],
                                 self.gamma_step, self.config.n_step * H)
        t = torch.as_tensor(calls["step"])[:, None] + torch.arange(H)  # (C, H): the step of each call's j-th action
        counted = t < torch.as_tensor(np.where(sts >= 0, sts, T))[:, None, None]  # (N, C, H): taken, before success
        t = t.clamp(max=T - 1)  # (a short last call's steps not taken: not counted)
        return parts, {"step_cond": cond_t[:, t], "step_frame": frame_t[:, t], "step_mask": counted.float()}

    # ---- updates ------------------------------------------------------------------------------
    def prepare(self, batch):
        """After warm-up: am_updates x am_batch of the chains (at random; with tilt_value only those whose last frame
        the reward model values at least it), a_K from the critic, the lean adjoint."""
        if self.iteration <= self.config.warmup_iters:
            return {"adj": None}
        need = self.loss_updates() * self.config.am_batch
        chains, counted = torch.arange(batch["traj"].shape[1]), batch.get("step_mask")
        if self.frame_value is not None:
            if self.per_step:  # each step by the frame it was taken from; a chain with a counted step is drawn
                near = self.frame_value(batch["step_frame"].flatten(0, 1)).view(counted.shape) >= self.config.tilt_value
                counted = counted * near.to(counted)
                chains = chains[(counted.sum(1) > 0).cpu()]
            else:
                chains = chains[(self.frame_value(batch["obs"][:, -1]) >= self.config.tilt_value).cpu()]
            if not len(chains):  # no call near success this iteration: the critic trains alone
                return {"adj": None, "tilt_chains": 0}
        pick = chains[torch.randperm(len(chains), generator=self.generator)[:need]].to(batch["traj"].device)
        chosen = {"traj": batch["traj"][:, pick], "cond": batch["cond"][pick], "obs": batch["obs"][pick],
                  "envs": None, "n_exec": None}
        if self.per_step:
            chosen.update(step_cond=batch["step_cond"][pick], step_mask=counted[pick])
        return {**super().prepare(chosen), "tilt_chains": len(chains)}

    def reward_and_grad(self, batch):
        """A chunk critic's Qbar and gradient at the clean chunks; a per-step critic's, summed over the counted steps."""
        if not self.per_step:
            return super().reward_and_grad(batch)
        return self.gradient_source.steps_and_grad(batch["step_cond"], batch["traj"][-1], batch["step_mask"])

    def loss(self, batch, i):
        """A critic step on a batch of the buffer; every am_every-th step also Adjoint Matching on am_batch chains."""
        cfg, device = self.config, self.ft.device
        b = {k: v.to(device) for k, v in self.td.buffer.sample(cfg.batch_size, self.generator).items()}
        loss, metrics = self.td.loss(b, self.td.td_target(b, b["next_base"], self.control, self.generator))
        if batch["adj"] is not None and i % cfg.am_every == 0:
            k = i // cfg.am_every
            chains = batch["traj"].shape[1]
            take = (torch.arange(k * cfg.am_batch, (k + 1) * cfg.am_batch) % chains).to(device)
            part = {"traj": batch["traj"][:, take], "cond": batch["cond"][take], "adj": batch["adj"][:, take],
                    "step_sets": [batch["step_sets"][k]]}
            am_loss, am_metrics = super().loss(part, 0)
            loss = loss + am_loss
            metrics.update(am_loss=am_loss.item(), **am_metrics)
        return loss, metrics

    def after_step(self):
        self.td.update_target()

    def summary(self, batch):
        out = {"buffer_size": self.td.buffer.size}
        if "tilt_chains" in batch:
            out["tilt_chains"] = batch["tilt_chains"]
        return out if batch["adj"] is None else {**out, **super().summary(batch)}

    def checkpoint(self, ft, ema, train_state, provenance, metrics):
        """The fine-tuned denoiser as a plain policy checkpoint, and the critic ("critic": run-time selection)."""
        return {**super().checkpoint(ft, ema, train_state, provenance, metrics), "critic": self.td.critic.to_checkpoint()}

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self):
        return {**self.td.state_dict(), "iteration": self.iteration, "config": asdict(self.config)}

    def load_state_dict(self, state):
        self.td.load_state_dict(state)
        self.iteration = state["iteration"]
