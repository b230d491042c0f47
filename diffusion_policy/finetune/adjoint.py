"""Adjoint Matching (`--method adjoint`, Domingo-Enrich et al., 2024): follow grad r.

collect() rolls the current policy out keeping the sampler chain of every call made before
its episode succeeded; prepare() takes the terminal adjoint a_K = -lambda grad r(x_0) from the
reward source (exact for the reward model, antithetic perturbations on env copies for the
simulator) and solves the lean adjoint backwards through the frozen base model once; loss()
is the Adjoint Matching loss at `num_loss_steps` random steps of the sampler
(diffusion_policy/adjoint_matching.py), one draw per optimiser step.

The control (`--control`) hands each chunk the reward gradient of another chunk of the same
iteration (a random permutation): the same set of terminal adjoints, the same steps, and no
information about the chunk's own reward, so what the control run loses is the update's own cost.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_policy import ddpm
from diffusion_policy import rollout as rollout_module
from diffusion_policy.adjoint_matching import adjoint_matching_loss, lean_adjoint, sample_loss_steps
from diffusion_policy.finetune.config import TILT_FLAGS, DenoiserMethod, MethodConfig

CLIP_VALUE = 1.0  # the element-wise clamp of --clip_adjoint


@dataclass
class AdjointConfig(MethodConfig):
    """The method README's settings: lambda 10, 200 iterations of 3 episodes, lr 1e-4, no EMA."""

    num_ft_iters: int = 200
    num_eps: int = 3
    lr: float = 1e-4
    reward_scale: float = 10.0
    grad_steps_per_iter: int = 1
    ema_decay: float = 0.0
    clip_adjoint: bool = False  # clamp the adjoint element-wise to [-1, 1]
    num_loss_steps: int = 4  # sampler steps in the loss per optimiser step (half from the noisiest 60 %)

    def __post_init__(self):
        super().__post_init__()
        if self.num_loss_steps < 1:
            raise ValueError(f"num_loss_steps must be >= 1, got {self.num_loss_steps}")


class AdjointMatching(DenoiserMethod):
    """collect() the sampler chains; prepare() the lean adjoint; loss() per optimiser step; summary()."""

    name, config_class = "adjoint", AdjointConfig
    about = "Adjoint Matching (the method README's): follows the reward's gradient through the lean adjoint"
    flags = {**TILT_FLAGS, "clip_adjoint": (None, "clamp the adjoint element-wise to [-1, 1] (logged)")}
    nan_advice = " with a lower --reward_scale or --clip_adjoint"

    def __init__(self, config, base, ft, train_model, source, generator, control=False):
        self.config, self.base, self.ft, self.train_model = config, base, ft, train_model
        self.source, self.generator, self.control = source, generator, control
        self.gradient_source, self.shuffle_gradients = source, control  # what a_K climbs; the control's permutation
        self.K = ft.sampler_config.num_inference_steps
        timesteps, prev = ddpm.inference_timesteps(ft.sampler_config.num_train_timesteps, self.K)
        self.timesteps, self.prev = timesteps.to(ft.device), prev.to(ft.device)

    def collect(self, seeds, max_steps):
        ft, source = self.ft, self.source
        ft.eval()
        res = rollout_module.rollout(ft, seeds, max_steps=max_steps, generator=self.generator,
                                     record_trajectories=True, record_envs=source.needs_env)
        calls = res["calls"]
        out = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean())}
        mask = calls["active"].reshape(-1)
        if not mask.any():  # every episode succeeded from its start state: nothing to learn from
            return None, out
        active = torch.from_numpy(mask)
        batch = {
            "traj": torch.from_numpy(calls["trajectory"]).flatten(0, 1)[active].transpose(0, 1).to(ft.device),
            "cond": torch.from_numpy(calls["obs_cond"]).flatten(0, 1)[active].to(ft.device),
            "obs": torch.from_numpy(calls["obs"]).flatten(0, 1)[active].to(ft.device),
            "envs": calls["env"].reshape(-1)[mask] if source.needs_env else None,
            "n_exec": np.broadcast_to(calls["n_exec"], calls["active"].shape).reshape(-1)[mask],
        }
        return batch, out

    def loss_updates(self):
        """Adjoint Matching updates per iteration (each draws its own loss steps)."""
        return self.config.grad_steps_per_iter

    def prepare(self, batch):
        """The terminal adjoint -lambda grad r, the loss steps of every update of the iteration, and
        the lean adjoint at all of them (one backward solve)."""
        cfg, gen, traj = self.config, self.generator, batch["traj"]
        predicted, grad_r = self.reward_and_grad(batch)
        if self.shuffle_gradients:  # the control: each chunk gets another chunk's gradient
            grad_r = grad_r[torch.randperm(len(grad_r), generator=gen).to(grad_r.device)]
        terminal = -cfg.reward_scale * grad_r
        step_sets = [sample_loss_steps(self.K, cfg.num_loss_steps, generator=gen).tolist()
                     for _ in range(self.loss_updates())]
        all_steps = sorted({j for steps in step_sets for j in steps})
        cond = batch["cond"]
        adj = lean_adjoint(lambda x, t: self.base.model(x, t, cond), traj, self.timesteps, self.prev,
                           self.ft.alphas_cumprod, terminal, self.ft.sampler_config.clip_sample, steps=all_steps,
                           clip_value=CLIP_VALUE if cfg.clip_adjoint else None)
        return {**batch, "adj": adj, "terminal": terminal, "predicted": predicted.detach(), "step_sets": step_sets,
                "all_steps": all_steps}

    def reward_and_grad(self, batch):
        """What the terminal adjoint climbs at the chains' clean chunks: (value (B,), its gradient (B, Tp, D))."""
        return self.gradient_source.reward_and_grad(batch["obs"].float(), batch["traj"][-1], batch["envs"],
                                                    batch["n_exec"])

    def loss(self, batch, i):
        """The Adjoint Matching loss at the sampler steps drawn for optimiser step i of the iteration."""
        traj, cond = batch["traj"], batch["cond"]

        def stacked(model):  # eps for chunks stacked over loss steps: the condition repeats
            return lambda x, t: model(x, t, cond.repeat(x.shape[0] // cond.shape[0], 1))

        steps = batch["step_sets"][i]
        per_sample, control = adjoint_matching_loss(
            stacked(self.train_model), stacked(self.base.model), traj, batch["adj"], self.timesteps, self.prev,
            self.ft.alphas_cumprod, steps, self.ft.sampler_config.clip_sample, per_sample=True, batched=True)
        return per_sample.mean(dim=1).mean(), {"control_norm": float(control.mean())}

    def summary(self, batch):
        adj_steps = batch["adj"][[j + 1 for j in batch["all_steps"]]]
        clipped = self.config.clip_adjoint
        return {
            "adjoint_norm": float(adj_steps.flatten(2).norm(dim=-1).mean()),
            "adjoint_clipped_frac": float((adj_steps.abs() >= CLIP_VALUE).float().mean()) if clipped else 0.0,
            "terminal_clipped_frac": float((batch["terminal"].abs() >= CLIP_VALUE).float().mean()) if clipped else 0.0,
            "predicted_reward": float(batch["predicted"].mean()), "num_trajectories": int(batch["traj"].shape[1]),
        }
