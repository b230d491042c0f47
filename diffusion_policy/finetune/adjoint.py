"""Adjoint Matching (`--method adjoint`, Domingo-Enrich et al., 2024): follow grad r.

collect() rolls the current policy out keeping the sampler chain of every call made before
its episode succeeded; update() takes the terminal adjoint a_K = -lambda grad r(x_0) from the
reward source (exact for the reward model, antithetic perturbations on env copies for the
simulator), solves the lean adjoint backwards through the frozen base model once, and takes
--grad_steps_per_iter optimiser steps on the Adjoint Matching loss, each at its own
--num_loss_steps random steps of the sampler (diffusion_policy/adjoint_matching.py).

The control (`--control`) hands each chunk the reward gradient of another chunk of the same
iteration (a random permutation): the same set of terminal adjoints, the same steps, and no
information about the chunk's own reward, so what the control run loses is the update's own cost.
"""

import numpy as np
import torch

from diffusion_policy import ddpm
from diffusion_policy import rollout as rollout_module
from diffusion_policy.adjoint_matching import adjoint_matching_loss, lean_adjoint, sample_loss_steps


class AdjointMatching:
    def __init__(self, ctx):
        self.ctx, self.args = ctx, ctx.args
        ft = ctx.ft
        self.K = ft.sampler_config.num_inference_steps
        timesteps, prev = ddpm.inference_timesteps(ft.sampler_config.num_train_timesteps, self.K)
        self.timesteps, self.prev = timesteps.to(ctx.device), prev.to(ctx.device)
        self.loss_threshold = None  # the --clip_loss EMA, part of the resumable state

    def state_dict(self):
        return {"loss_threshold": self.loss_threshold}

    def load_state_dict(self, state):
        self.loss_threshold = state.get("loss_threshold")

    def collect(self, seeds):
        ctx, args, source = self.ctx, self.args, self.ctx.source
        ctx.ft.eval()
        res = rollout_module.rollout(ctx.ft, seeds, max_steps=args.max_steps, generator=ctx.generator,
                                     record_trajectories=True, record_envs=source.needs_env)
        calls = res["calls"]
        out = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean())}
        mask = calls["active"].reshape(-1)
        if not mask.any():  # every episode succeeded from its start state: nothing to learn from
            return None, out
        active = torch.from_numpy(mask)
        batch = {
            "traj": torch.from_numpy(calls["trajectory"]).flatten(0, 1)[active].transpose(0, 1).to(ctx.device),
            "cond": torch.from_numpy(calls["obs_cond"]).flatten(0, 1)[active].to(ctx.device),
            "obs": torch.from_numpy(calls["obs"]).flatten(0, 1)[active].to(ctx.device),
            "envs": calls["env"].reshape(-1)[mask] if source.needs_env else None,
            "n_exec": np.broadcast_to(calls["n_exec"], calls["active"].shape).reshape(-1)[mask],
        }
        return batch, out

    def update(self, batch, it):
        ctx, args, K = self.ctx, self.args, self.K
        ft, base, traj, cond = ctx.ft, ctx.base, batch["traj"], batch["cond"]
        # terminal adjoint: -lambda * grad of the reward in the normalised chunk
        predicted, grad_r = ctx.source.reward_and_grad(batch["obs"].float(), traj[-1], batch["envs"], batch["n_exec"])
        if ctx.control:  # each chunk gets another chunk's gradient
            grad_r = grad_r[torch.randperm(len(grad_r), generator=ctx.generator).to(grad_r.device)]
        terminal = -args.reward_scale * grad_r
        step_sets = [sample_loss_steps(K, args.num_loss_steps, generator=ctx.generator).tolist()
                     for _ in range(args.grad_steps_per_iter)]
        all_steps = sorted({j for steps in step_sets for j in steps})

        def stacked(model):  # eps for chunks stacked over loss steps: the condition repeats
            return lambda x, t: model(x, t, cond.repeat(x.shape[0] // cond.shape[0], 1))

        clip = ft.sampler_config.clip_sample
        adj = lean_adjoint(lambda x, t: base.model(x, t, cond), traj, self.timesteps, self.prev, ft.alphas_cumprod,
                           terminal, clip, steps=all_steps,
                           clip_value=args.adjoint_clip_value if args.clip_adjoint else None)
        ft.train()
        losses, controls, kept_fracs = [], [], []
        for steps in step_sets:
            per_sample, control = adjoint_matching_loss(
                stacked(ctx.ddp_model), stacked(base.model), traj, adj, self.timesteps, self.prev, ft.alphas_cumprod,
                steps, clip, per_sample=True, batched=True)
            per_sample = per_sample.mean(dim=1)  # (M,) over the chosen steps
            kept = torch.ones_like(per_sample, dtype=torch.bool)
            if args.clip_loss:
                q = float(torch.quantile(per_sample.detach(), 0.9))
                self.loss_threshold = q if self.loss_threshold is None else 0.9 * self.loss_threshold + 0.1 * q
                kept = per_sample.detach() <= 2.0 * self.loss_threshold
                if not kept.any():  # the whole batch jumped: keep its lower 90 % rather than nothing
                    kept = per_sample.detach() <= q
            loss = per_sample[kept].mean()
            ctx.step(loss, it)
            losses.append(loss.item())
            controls.append(float(control.mean()))
            kept_fracs.append(float(kept.float().mean()))

        adj_steps = adj[[j + 1 for j in all_steps]]
        clip_value = args.adjoint_clip_value
        return {
            "loss": float(np.mean(losses)), "control_norm": float(np.mean(controls)),
            "adjoint_norm": float(adj_steps.flatten(2).norm(dim=-1).mean()),
            "adjoint_clipped_frac": float((adj_steps.abs() >= clip_value).float().mean()) if args.clip_adjoint else 0.0,
            "terminal_clipped_frac": float((terminal.abs() >= clip_value).float().mean()) if args.clip_adjoint else 0.0,
            "loss_kept_frac": float(np.mean(kept_fracs)), "predicted_reward": float(predicted.detach().mean()),
            "num_trajectories": int(traj.shape[1]),
        }
