"""A bounded residual on the frozen policy, trained off-policy against a chunk critic (`--method residual`).

The pattern of Policy Decorator, ResFiT and DICE-RL (docs/findings.md has the sources): the
diffusion policy stays frozen and samples as shipped; a small zero-initialised MLP adds at most
alpha to each executed action (diffusion_policy/residual_policy.py). It is trained as an
off-policy actor-critic over policy *calls* (one transition = one executed chunk):

- reward of call c, from the source's value v_c of the chunk (`--reward_source simulator`: the
  env's reward after the chunk, clip(coverage / 0.95); `model`: the reward model's prediction for
  the executed chunk), shaped by the potential Phi = that value:
      r_c = gamma * v_c - v_(c-1)        and at the call that succeeds (the env's end): v_c - v_(c-1)
  so an episode's return is gamma^T v_T - v_(-1): the value reached at the end, discounted by the
  calls it took; success soon is what the critic learns to want (v_(-1): the reward at the start).
- critic: an ensemble of `num_critics` MLPs with LayerNorm, Q(obs window, executed chunk), n-step
  TD targets over calls, the pessimistic backup min over the ensemble of Polyak target networks;
  no bootstrap past the success (terminal), and none past the time limit (the last call of a
  truncated episode starts no transition). The rewards, targets, buffer and TD loss are critic.py's,
  which Adjoint Matching toward a critic (qam.py) shares.
- actor: the residual, maximising the ensemble's mean Q of base + residual minus
  `actor_pessimism` times the ensemble's spread (std over the critics: a pessimistic actor stays
  where the critics agree) (the deterministic policy gradient through the residual only) minus
  `l2` times its mean square; every `actor_every`-th optimiser step, and not during the first
  `warmup_iters` iterations (critic warm-up on the base's own data).
- target smoothing (TD3, `target_noise`): the next chunk of a TD target gets a Gaussian of that std,
  clipped at twice it; `residual_ema`: an EMA of the residual's weights (decay per optimiser step)
  is the saved policy, the live residual acts while collecting and is what a resume continues.
- collection: every iteration rolls the acting policy out on `num_eps` fresh starts, all envs
  stepped together (diffusion_policy/rollout.py); the residual is switched on per call with
  probability min(1, n / explore_horizon), n the chunk transitions collected since warm-up, with
  a Gaussian of std `explore_std` added to it; everything goes into a replay buffer of
  `buffer_size` transitions (oldest out first).

The control (`--control`) permutes the n-step returns across each optimiser step's batch of
transitions together with their bootstrap factors (zero where the window reached the success):
the same data and steps, no information about which chunk earned what or which one succeeded.
"""

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.func import functional_call

from diffusion_policy import rollout as rollout_module
from diffusion_policy.common.cli import count, fraction, nonnegative
from diffusion_policy.common.runtime import UserError
from diffusion_policy.finetune.config import FinetuneMethod, LoopConfig
from diffusion_policy.finetune.critic import CRITIC_FLAGS, TDCritic, check_critic_settings, chunk_transitions, chunk_values
from diffusion_policy.policy import DiffusionPolicy
from diffusion_policy.residual_policy import (FrameValue, ResidualDiffusionPolicy, ResidualNetConfig, check_frame_value_source,
                                              critic_dims)

@dataclass
class ResidualConfig(LoopConfig):
    """The CPU preset: 40 iterations of 64 episodes (about 80 k chunk transitions), lr 1e-4 (actor), and
    2,000 optimiser steps per iteration (about one per transition collected: at 500 the critic was
    undertrained, +1.0 against +26.2 / +20.6 / +14.4 at 2,000 on 500 held-out starts, issue #37)."""

    num_ft_iters: int = 40
    num_eps: int = 64
    lr: float = 1e-4  # the actor's (the residual's) learning rate after warm-up
    grad_steps_per_iter: int = 2000  # an optimiser step: about 8 ms on one Intel core
    alpha: float = ResidualNetConfig.alpha  # the residual's bound per entry, normalised action units (the range is 2)
    hidden_dims: tuple = ResidualNetConfig.hidden_dims  # the residual's and each critic's hidden layers
    critic_lr: float = 3e-4
    num_critics: int = 2
    gamma: float = 0.9  # discount per call (8 control steps)
    n_step: int = 3  # calls summed before bootstrapping
    tau: float = 0.01  # Polyak rate of the target critics, per critic step
    actor_every: int = 2  # optimiser steps per actor update
    l2: float = 1.0  # weight of the residual's mean square (normalised units) in the actor loss
    batch_size: int = 256  # transitions per optimiser step
    buffer_size: int = 200_000  # transitions kept (oldest out first)
    warmup_iters: int = 4  # iterations of the base alone, critic updates only
    explore_std: float = 0.03  # the Gaussian added to the residual while collecting
    explore_horizon: int = 20_000  # transitions after warm-up until the residual acts at every call
    actor_pessimism: float = 0.0  # the actor climbs mean Q - this x std over the critics
    target_noise: float = 0.0  # std of the smoothing noise on the TD target's next chunk (clipped at 2x)
    residual_ema: float = 0.0  # EMA decay per optimiser step of the saved residual; 0: the live one
    act_within: float = 0.0  # px from the goal: where the written policy's residual acts (collection: everywhere); 0: everywhere
    act_value: float | None = None  # the learned gate: where the reward model's frame value is at least this
    gate_collection: bool = False  # collect with the gate too (the residual acts only where it will once deployed)

    def __post_init__(self):
        super().__post_init__()
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        self.net_config()  # alpha >= 0, positive sizes, act_within >= 0
        check_critic_settings(self)
        for name in ("actor_every", "explore_horizon"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.residual_ema < 1.0:
            raise ValueError(f"residual_ema must be in [0, 1), got {self.residual_ema!r}")
        for name in ("critic_lr", "l2", "explore_std", "actor_pessimism", "target_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.gate_collection and not self.act_within > 0 and self.act_value is None:
            raise ValueError("gate_collection collects with the written policy's gate: give act_within > 0 or act_value")

    def net_config(self):
        return ResidualNetConfig(self.alpha, self.hidden_dims, act_within=self.act_within, act_value=self.act_value)


class ResidualRL(FinetuneMethod):
    """collect() rollouts into the buffer; loss(buffer, i) a critic (and every actor_every-th step an
    actor) loss on a batch sampled from it; after_step() the target critics; summary() of the iteration.
    Its "batch" between collect and loss is the replay buffer itself."""

    name, config_class = "residual", ResidualConfig
    about = "a bounded residual on the frozen policy, trained against a chunk critic (off-policy actor-critic)"
    flags = {
        "alpha": (nonnegative, "the residual's bound per executed action entry, normalised units (range 2)"),
        **CRITIC_FLAGS,
        "actor_every": (count(1), "optimiser steps per actor update"),
        "explore_std": (nonnegative, "std of the Gaussian on the residual while collecting"),
        "explore_horizon": (count(1), "transitions after warm-up until the residual acts at every call"),
        "l2": (nonnegative, "weight of the residual's mean square in the actor loss"),
        "actor_pessimism": (nonnegative, "k: the actor climbs the critics' mean Q minus k times their std (0: the mean)"),
        "target_noise": (nonnegative, "std of the Gaussian on the TD target's next chunk, clipped at 2x (TD3's "
                                      "smoothing; normalised units); 0: none"),
        "residual_ema": (fraction, "decay per optimiser step of an EMA of the residual saved as the policy; 0: the "
                                   "live residual"),
        "act_within": (nonnegative, "pixels: the written policy's residual acts only while the block's keypoints are "
                                    "this close to the goal's on average, the base alone elsewhere (a deployment "
                                    "gate: collection corrects everywhere); 0: everywhere"),
        "act_value": (fraction, "the learned gate: the written policy's residual acts only where the reward model's "
                                "value of the current frame is at least this (a dynamics reward model's frame part, "
                                "written into the policy; no goal pose is read; collection corrects everywhere); "
                                "not given: no such gate"),
        "gate_collection": (None, "collect with the written policy's gate (--act_within or --act_value) on as well: in "
                                  "the fine-tuning rollouts the residual acts only where the written policy will"),
    }

    @classmethod
    def check_start(cls, policy_ckpt, path, config, world):
        if world > 1:
            raise UserError("--method residual runs in one process (its replay buffer and critic are not sharded): "
                            "run it without torchrun")
        if policy_ckpt.get("residual") and (config.net_config().to_dict()
                                            != ResidualNetConfig(**policy_ckpt["residual"]["config"]).to_dict()):
            raise UserError(f"{path} has a residual of {policy_ckpt['residual']['config']}; continue it with the "
                            "same --method, --alpha, --hidden_dims and --act_within, or start from its base policy")

    @classmethod
    def check_source(cls, config, reward_source, reward_ckpt):
        if config.act_value is not None:
            check_frame_value_source(reward_ckpt, "--act_value gates on the reward model's value of a frame",
                                     "gate with --act_within")

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        if not isinstance(ft, ResidualDiffusionPolicy):
            raise ValueError("the residual method trains a ResidualDiffusionPolicy (see make_policy)")
        self.config, self.base, self.ft, self.source, self.generator, self.control = (
            config, base, ft, source, generator, control)
        reward_model = getattr(source, "reward_model", None)
        if reward_model is not None and reward_model.config.structure == "dynamics":  # always: any run can be gated so
            ft.frame_value = FrameValue.of(reward_model)
        else:
            self.check_source(config, source.name if source else None, None)
        self.cond_dim, self.exec_shape = critic_dims(ft.config, ft.per_step)[0], ft.residual.exec_shape
        self.td = TDCritic(self.cond_dim, self.exec_shape, config.hidden_dims, config.num_critics, config.buffer_size,
                           config.tau, ft.device)
        self.explore = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        self.iteration, self.explored = 0, 0  # iterations collected; transitions collected after warm-up
        self.ema = copy.deepcopy(ft.residual).requires_grad_(False) if config.residual_ema > 0 else None

    # the critic, its targets and its buffer (critic.py)
    critic = property(lambda self: self.td.critic, lambda self, c: setattr(self.td, "critic", c))
    target = property(lambda self: self.td.target, lambda self, t: setattr(self.td, "target", t))
    buffer = property(lambda self: self.td.buffer)

    def check_resume(self, ckpt, path, base_path):
        if ckpt.get("residual") and ckpt["residual"]["base_sha256"] != self.ft.base_sha256():
            raise UserError(f"cannot resume {path}: its residual was trained on another base than {base_path} holds "
                            "now; run without --resume to start afresh")

    @staticmethod
    def make_policy(base, config):
        """The acting policy: `base` (a plain policy, or one with a residual: it is continued) + residual."""
        if isinstance(base, ResidualDiffusionPolicy):
            if base.residual.config != config.net_config():
                raise ValueError(f"the start policy's residual is {base.residual.config}, this run asks for "
                                 f"{config.net_config()}: pass the same --alpha, --hidden_dims and --act_within")
            return copy.deepcopy(base)
        return ResidualDiffusionPolicy.on(base, config.net_config())

    @property
    def clipped(self):
        """The actor's gradient norm is clipped; the critic's is not (as in TD3)."""
        return self.ft.residual

    def param_groups(self):
        return [{"params": list(self.ft.residual.parameters()), "lr": self.config.lr},
                {"params": list(self.critic.parameters()), "lr": self.config.critic_lr}]

    # ---- collection -------------------------------------------------------------------------
    def on_probability(self):
        if self.iteration < self.config.warmup_iters:
            return 0.0
        return min(1.0, self.explored / self.config.explore_horizon)

    def choose(self, record, p_on):
        """rollout's hook: the base's chunk, the residual switched on with probability p_on, plus noise."""
        ft, cfg, gen = self.ft, self.config, self.explore

        def act(history, envs, n_exec, generator):
            window = torch.as_tensor(history, dtype=torch.float32)
            base_chunk = DiffusionPolicy.predict_action(ft, window, generator=generator)["action_pred_norm"]  # the base's draw
            with torch.no_grad():  # the residual's own delta: collection corrects everywhere unless gate_collection
                delta = ft.residual(ft.obs_cond(window), ft.executed(base_chunk))
            on = (torch.rand(len(delta), generator=gen) < p_on).to(delta).view(-1, 1, 1)
            if cfg.gate_collection:
                on = ft.gated(on, history[:, -1])
            noise = cfg.explore_std * torch.randn(delta.shape, generator=gen).to(delta)
            acted = ft.with_delta(base_chunk, on * (delta + noise).clamp(-cfg.alpha, cfg.alpha))
            record.append((ft.executed(base_chunk).cpu(), acted["action_pred_norm"].cpu()))
            return acted

        return act

    def collect(self, seeds, max_steps):
        """Roll the acting policy out, turn its calls into n-step transitions and add them to the buffer."""
        ft, cfg = self.ft, self.config
        ft.eval()
        record, p_on = [], self.on_probability()
        res = rollout_module.rollout(ft, seeds, max_steps=max_steps, generator=self.generator, record_calls=True,
                                     choose=self.choose(record, p_on))
        calls = res["calls"]
        base = torch.stack([r[0] for r in record], 1)  # (N, C, H, D) normalised
        chunks = torch.stack([r[1] for r in record], 1)  # (N, C, Tp, D): what was executed, and the rest
        act = ft.executed(chunks.flatten(0, 1)).view_as(base)
        obs = torch.as_tensor(calls["obs"], dtype=torch.float32)
        cond = ft.obs_cond(obs.flatten(0, 1)).view(*obs.shape[:2], -1).cpu()
        values = self.chunk_values(calls, obs, chunks)  # (N, C)
        out = chunk_transitions(calls, res["steps_to_success"], values, cond, base, act, cfg.gamma, cfg.n_step)
        return self.store(out, res, p_on, 1, chunk_value=float(np.mean(
            [values[i, :int(calls['active'][i].sum())].mean() for i in range(len(seeds)) if calls["active"][i].any()])))

    def store(self, parts, res, p_on, per_call, **metrics):
        """Add the iteration's transitions ({field: [tensor per episode]}) to the buffer and count them
        (explore_horizon counts calls: per_call transitions make one); -> collect's (batch, metrics)."""
        batch = {k: torch.cat(v) for k, v in parts.items()}
        self.buffer.add(batch)
        if self.iteration >= self.config.warmup_iters:
            self.explored += len(batch["ret"]) // per_call
        self.iteration += 1
        metrics = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean()),
                   "residual_on_prob": p_on, "num_transitions": len(batch["ret"]), "buffer_size": self.buffer.size,
                   **metrics}
        return (self.buffer if self.buffer.size >= self.config.batch_size else None), metrics

    def chunk_values(self, calls, obs, chunks):
        """v (N, C): the simulator's reward after each executed chunk, or the reward model's prediction."""
        return chunk_values(self.source, calls, obs, chunks, self.ft.device)

    # ---- updates ----------------------------------------------------------------------------
    def prepare(self, batch):
        return batch

    def acted(self, cond, base):
        """Executed chunk of the deterministic acting policy: base + residual, clamped (differentiable)."""
        return (base + self.ft.residual(cond, base)).clamp(-1.0, 1.0)

    def td_target(self, b):
        with torch.no_grad():
            nxt = self.acted(b["next_cond"], b["next_base"])
            if self.config.target_noise > 0:
                s = self.config.target_noise
                nxt = (nxt + (s * torch.randn(nxt.shape, generator=self.generator)).clamp(-2 * s, 2 * s)
                       .to(nxt)).clamp(-1.0, 1.0)
        return self.td.td_target(b, nxt, self.control, self.generator)

    def loss(self, buffer, i):
        cfg, device = self.config, self.ft.device
        b = {k: v.to(device) for k, v in buffer.sample(cfg.batch_size, self.generator).items()}
        loss, metrics = self.td.loss(b, self.td_target(b))
        if self.iteration > cfg.warmup_iters and i % cfg.actor_every == 0:
            delta = self.ft.residual(b["cond"], b["base"])
            frozen = {k: v.detach() for k, v in self.critic.named_parameters()}
            q_pi = functional_call(self.critic, frozen, (b["cond"], (b["base"] + delta).clamp(-1.0, 1.0)))
            penalty = (delta ** 2).mean()
            objective = q_pi.mean(0) - cfg.actor_pessimism * q_pi.std(0, unbiased=False) if len(q_pi) > 1 else q_pi[0]
            actor_loss = -objective.mean() + cfg.l2 * penalty
            loss = loss + actor_loss
            metrics.update(actor_q=q_pi.mean().item(), residual_rms=penalty.sqrt().item())
        return loss, metrics

    def after_step(self):
        self.td.update_target()
        with torch.no_grad():
            if self.ema is not None:
                for p, ep in zip(self.ft.residual.parameters(), self.ema.parameters()):
                    ep.lerp_(p, 1.0 - self.config.residual_ema)

    def checkpoint(self, ft, ema, train_state, provenance, metrics):
        """The policy with the residual's EMA where one is kept (the live one goes into the method's state),
        and the critic ("critic": what run-time selection by the critic reads, evaluate_policy.py)."""
        if self.ema is None:
            return {**super().checkpoint(ft, ema, train_state, provenance, metrics), "critic": self.critic.to_checkpoint()}
        live = copy.deepcopy(ft.residual.state_dict())
        ft.residual.load_state_dict(self.ema.state_dict())
        try:
            return {**super().checkpoint(ft, ema, train_state, provenance, metrics),
                    "critic": self.critic.to_checkpoint()}
        finally:
            ft.residual.load_state_dict(live)

    def summary(self, batch):
        return {"buffer_size": batch.size}

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self):
        return {**self.td.state_dict(), "explore": self.explore.get_state(),
                "iteration": self.iteration, "explored": self.explored, "config": asdict(self.config),
                **({"live_residual": self.ft.residual.state_dict(), "residual_ema": self.ema.state_dict()}
                   if self.ema is not None else {})}

    def load_state_dict(self, state):
        self.td.load_state_dict(state)
        self.explore.set_state(state["explore"])
        self.iteration, self.explored = state["iteration"], state["explored"]
        if self.ema is not None:
            self.ft.residual.load_state_dict(state["live_residual"])
            self.ema.load_state_dict(state["residual_ema"])
