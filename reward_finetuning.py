"""Stage 4: fine-tune the diffusion policy towards a learned reward with Adjoint Matching.

Usage:
    python reward_finetuning.py --num_ft_iters 200 --num_eps 3 --warmup_steps 10 --lr 1e-4 --clip_adjoint --noise_pred_model_path ./data/checkpoints/policy_pretrained.ckpt --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt --action_reward_path ./data/reward/action_reward_data_300eps.npy
    python reward_finetuning.py ... --reward_scale 20 --num_loss_steps 4 --eval_every 25
    python reward_finetuning.py ... --resume
    torchrun --standalone --nproc_per_node=4 reward_finetuning.py ...   # 4 GPUs: 4 x --num_eps per iteration

Each iteration rolls the current fine-tuned policy out on --num_eps fresh start states from
the fine-tuning seed range (300000+), keeps the denoising chain of every policy call made
before its episode succeeded, solves the lean adjoint backwards through the frozen
pre-trained model from a_K = -lambda * grad r(x_0) (the reward model's gradient with respect
to the normalised chunk), and takes --grad_steps_per_iter optimiser steps (default 1) on the
Adjoint Matching loss, each at its own --num_loss_steps random steps of the sampler
(diffusion_policy/adjoint_matching.py). The target is p_base(chunk | obs) * exp(lambda * r(obs, chunk)).

--action_reward_path (optional) is the reward data the reward model was trained on. It is
used for a reference, not for training: the reward model's mean prediction on the data's own
chunks (those of the policy that collected it) is logged as `ref_predicted_reward`, the level
the fine-tuned samples' `predicted_reward` starts from, and a reward model fitted on other
data is reported.

Under torchrun each rank rolls out its own --num_eps episodes from disjoint seeds (iteration i,
rank r: start_seed + (i * world + r) * num_eps ...) with its own sampling noise (seed + rank),
solves the adjoint for them and takes its share of one DistributedDataParallel update; metrics
are averaged over ranks, and rank 0 alone logs, evaluates and writes checkpoints.

Writes the fine-tuned policy (--output, default ./data/checkpoints/policy_finetuned_rd0.ckpt),
a policy checkpoint like any other with provenance (base model, reward model, lambda,
iterations); the run directory holds config.json, metrics.jsonl and the resumable latest.ckpt.
"""

import argparse
import copy
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from diffusion_policy import ddpm, distributed
from diffusion_policy.adjoint_matching import adjoint_matching_loss, lean_adjoint, sample_loss_steps
from diffusion_policy.checkpoint import (
    describe_last_good,
    load_checkpoint,
    load_resume_checkpoint,
    plain_values,
    policy_checkpoint,
    policy_from_checkpoint,
    save_checkpoint,
)
from diffusion_policy.ema import EMA
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.rollout import rollout
from diffusion_policy.runlog import RunLog
from diffusion_policy.runtime import UserError, add_run_flags, optimizer_step, run_cli, seed_everything
from diffusion_policy.seeds import FINETUNE_SEED_START, VALIDATION_SEED_START

RESUME_KEYS = ("noise_pred_model_path", "reward_model_path", "num_ft_iters", "num_eps", "lr", "warmup_steps",
               "reward_scale", "num_loss_steps", "grad_steps_per_iter", "clip_adjoint", "adjoint_clip_value", "clip_loss", "ema_decay",
               "seed", "start_seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise_pred_model_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="the pre-trained policy: the base model and the fine-tuning start")
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt",
                   help="the reward model from train_reward.py")
    p.add_argument("--action_reward_path", default=None,
                   help="the reward data the reward model was fit on: a logged reference level, not training data")
    p.add_argument("--output", default="./data/checkpoints/policy_finetuned_rd0.ckpt", help="the fine-tuned policy")
    p.add_argument("--run_dir", default=None, help="config.json, metrics.jsonl, latest.ckpt (default data/runs/<name>)")
    p.add_argument("--num_ft_iters", type=int, default=200, help="fine-tuning iterations (rollouts + one update)")
    p.add_argument("--num_eps", type=int, default=3, help="episodes rolled out per iteration (fresh seeds)")
    p.add_argument("--start_seed", type=int, default=FINETUNE_SEED_START,
                   help="first start-state seed; iteration i uses start_seed + i * num_eps onwards (300000+)")
    p.add_argument("--max_steps", type=int, default=300, help="control steps per rollout episode")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate after warm-up")
    p.add_argument("--warmup_steps", type=int, default=10,
                   help="optimiser steps of linear learning-rate warm-up (= iterations with one step each)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--reward_scale", type=float, default=10.0, help="lambda: the target is p_base * exp(lambda r)")
    p.add_argument("--num_loss_steps", type=int, default=4,
                   help="sampler steps in the loss per iteration (half from the noisiest 60 %%); the last is never used")
    p.add_argument("--grad_steps_per_iter", type=int, default=1,
                   help="optimiser steps per iteration on the same rollouts and adjoints, each on its own "
                        "--num_loss_steps random steps (the rollout is the expensive part on a CPU)")
    p.add_argument("--clip_adjoint", action="store_true", help="clamp the adjoint element-wise (logged)")
    p.add_argument("--adjoint_clip_value", type=float, default=1.0, help="the clamp of --clip_adjoint")
    p.add_argument("--clip_loss", action="store_true",
                   help="drop per-sample losses above an EMA of their 90 %% quantile x 2 (logged)")
    p.add_argument("--ema_decay", type=float, default=0.0,
                   help="EMA of the fine-tuned weights, saved as the policy (0: off, the live weights are saved)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="DDPM steps (default: the checkpoint's)")
    p.add_argument("--eval_every", type=int, default=0,
                   help="iterations between evaluations on validation seeds 400000+ (0: off)")
    p.add_argument("--eval_episodes", type=int, default=50, help="episodes per periodic evaluation")
    p.add_argument("--save_every", type=int, default=10, help="iterations between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/latest.ckpt")
    add_run_flags(p, "seed of the sampling noise and the loss steps")
    return p.parse_args(argv)


def reference_level(action_reward_path, reward_model, device):
    """Mean predicted reward on the reward data's own chunks, and its mean true target."""
    columns, meta = load_reward_data(action_reward_path)
    with torch.no_grad():
        pred = reward_model.reward(torch.as_tensor(columns["obs"], dtype=torch.float32, device=device),
                                   torch.as_tensor(columns["action_pred"], dtype=torch.float32, device=device))
    return float(pred.mean()), float(columns[reward_model.config.target].mean())


def main(args):
    return distributed.run(finetune, args)


def finetune(args, dist_info):
    device, is_main, world, rank = dist_info.device, dist_info.is_main, dist_info.world_size, dist_info.rank
    seed_everything(args.seed + rank)
    generator = torch.Generator().manual_seed(args.seed + rank)
    name = os.path.splitext(os.path.basename(args.output))[0]
    run_dir = args.run_dir or os.path.join("data", "runs", name)
    latest_path = os.path.join(run_dir, "latest.ckpt")

    # ---- models: frozen base, trainable copy, reward ------------------------------------
    base_ckpt = load_checkpoint(args.noise_pred_model_path, "policy")
    base = policy_from_checkpoint(base_ckpt, device=device, num_inference_steps=args.num_inference_steps)
    base.requires_grad_(False)
    ft = copy.deepcopy(base)
    ft.model.requires_grad_(True)
    reward_model = load_reward_model(args.reward_model_path, device=device).requires_grad_(False)
    ema = EMA(ft.model, power=0.0, max_decay=args.ema_decay) if args.ema_decay > 0 else None
    ddp_model = distributed.wrap(dist_info, ft.model)  # the loss goes through it; rollouts use ft.model
    optimizer = torch.optim.AdamW(ft.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / max(1, args.warmup_steps)))
    K = ft.sampler_config.num_inference_steps
    timesteps, prev = ddpm.inference_timesteps(ft.sampler_config.num_train_timesteps, K)
    timesteps, prev = timesteps.to(device), prev.to(device)
    abar = ft.alphas_cumprod

    start_iter, loss_threshold = 0, None
    if args.resume:
        ckpt = load_resume_checkpoint(latest_path, args, RESUME_KEYS, map_location=device)
        state = ckpt["train_state"]
        if state.get("world_size", 1) != world:
            raise UserError(f"{latest_path} was written by {state.get('world_size', 1)} processes, this run has "
                            f"{world}: resume with the same number of processes")
        ft.model.load_state_dict(ckpt["model_state_dict"])
        if ema is not None:
            ema.model.load_state_dict(ckpt["ema_model_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"] if world == 1 else state["generators"][rank])
        start_iter, loss_threshold = state["iteration"], state["loss_threshold"]
        print(f"resuming {latest_path} at iteration {start_iter}/{args.num_ft_iters}")

    log = RunLog(run_dir, args, args.wandb, args.wandb_project, job="finetune", resume=args.resume,
                 enabled=is_main)
    reward_path = load_checkpoint(args.reward_model_path, "reward")["provenance"].get("action_reward_path")
    reference = {}
    if args.action_reward_path:
        ref_pred, ref_true = reference_level(args.action_reward_path, reward_model, device)
        reference = {"ref_predicted_reward": ref_pred, "ref_true_target": ref_true}
        if reward_path and os.path.abspath(reward_path) != os.path.abspath(args.action_reward_path):
            print(f"note: the reward model was fit on {reward_path}, not {args.action_reward_path}")
        log.log(reference, start_iter)
    provenance = {
        "script": "reward_finetuning.py", "base_model": args.noise_pred_model_path,
        "base_provenance": base_ckpt.get("provenance", {}), "reward_model": args.reward_model_path,
        "reward_target": reward_model.config.target, "reward_scale": args.reward_scale,
        "num_ft_iters": args.num_ft_iters, "num_eps": args.num_eps, "world_size": world,
        "grad_steps_per_iter": args.grad_steps_per_iter,
        "git_commit": log.info["git_commit"],
    }

    def train_state(iteration):
        generators = distributed.gather_objects(dist_info, generator.get_state())  # collective: every rank
        return {"iteration": iteration, "args": plain_values(vars(args)), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generators[0], "generators": generators,
                "world_size": world, "loss_threshold": loss_threshold}

    if is_main:
        print(f"fine-tuning with lambda = {args.reward_scale} on '{reward_model.config.target}', {K} DDPM steps, "
              f"{args.num_eps * world} episodes per iteration, {args.num_ft_iters} iterations on {device}"
              + (f" x {world} processes" if world > 1 else ""))
    metrics, started = {}, time.time()
    bar = tqdm(range(start_iter, args.num_ft_iters), initial=start_iter, total=args.num_ft_iters, desc="finetune",
               disable=args.no_progress or not is_main)
    for it in bar:
        # ---- 1. roll out the current fine-tuned policy, keep every call's chain ----------
        first = args.start_seed + (it * world + rank) * args.num_eps
        seeds = list(range(first, first + args.num_eps))
        ft.eval()
        res = rollout(ft, seeds, max_steps=args.max_steps, generator=generator, record_trajectories=True)
        calls = res["calls"]
        active = torch.from_numpy(calls["active"].reshape(-1))
        traj = torch.from_numpy(calls["trajectory"]).flatten(0, 1)[active].transpose(0, 1).to(device)  # (K+1, M, T, D)
        cond = torch.from_numpy(calls["obs_cond"]).flatten(0, 1)[active].to(device)  # (M, cond_dim)
        obs_raw = torch.from_numpy(calls["obs"]).flatten(0, 1)[active].to(device)  # (M, To, Do)
        if not active.any():  # every episode succeeded from its start state: nothing to learn from
            log.log({"num_trajectories": 0, "env_score": float(res["score"].mean())}, it + 1)
            continue

        # ---- 2. terminal adjoint: -lambda * grad of the reward in the normalised chunk ----
        x0 = traj[-1].clone().requires_grad_(True)
        with torch.enable_grad():
            predicted = reward_model.reward(obs_raw.float(), ft.action_normalizer.unnormalize(x0))
            (grad_r,) = torch.autograd.grad(predicted.sum(), x0)
        terminal = -args.reward_scale * grad_r

        # ---- 3. lean adjoint through the frozen base (once), 4.-5. loss and optimiser steps --
        step_sets = [sample_loss_steps(K, args.num_loss_steps, generator=generator).tolist()
                     for _ in range(args.grad_steps_per_iter)]
        all_steps = sorted({j for steps in step_sets for j in steps})
        def stacked(model):  # eps for chunks stacked over loss steps: the condition repeats
            return lambda x, t: model(x, t, cond.repeat(x.shape[0] // cond.shape[0], 1))

        adj = lean_adjoint(lambda x, t: base.model(x, t, cond), traj, timesteps, prev, abar, terminal,
                           ft.sampler_config.clip_sample, steps=all_steps,
                           clip_value=args.adjoint_clip_value if args.clip_adjoint else None)
        ft.train()
        losses, controls, kept_fracs = [], [], []
        for steps in step_sets:
            per_sample, control = adjoint_matching_loss(
                stacked(ddp_model), stacked(base.model), traj, adj, timesteps, prev, abar, steps,
                ft.sampler_config.clip_sample, per_sample=True, batched=True)
            per_sample = per_sample.mean(dim=1)  # (M,) over the chosen steps
            kept = torch.ones_like(per_sample, dtype=torch.bool)
            if args.clip_loss:
                q = float(torch.quantile(per_sample.detach(), 0.9))
                loss_threshold = q if loss_threshold is None else 0.9 * loss_threshold + 0.1 * q
                kept = per_sample.detach() <= 2.0 * loss_threshold
                if not kept.any():  # the whole batch jumped: keep its lower 90 % rather than nothing
                    kept = per_sample.detach() <= q
            loss = per_sample[kept].mean()
            finite = distributed.mean_over_ranks(dist_info, {"finite": float(torch.isfinite(loss))})["finite"] == 1.0
            if not finite:
                raise UserError(f"fine-tuning loss became {loss.item()} at iteration {it}; the last good checkpoint "
                                f"is {describe_last_good(latest_path, 'iteration')}. Lower --lr (now {args.lr}) "
                                f"or --reward_scale, or add --clip_adjoint")
            optimizer_step(loss, ft.model, optimizer, scheduler, args.grad_clip)
            if ema is not None:
                ema.update(ft.model, it * args.grad_steps_per_iter + len(losses) + 1)
            losses.append(loss.item())
            controls.append(float(control.mean()))
            kept_fracs.append(float(kept.float().mean()))

        adj_steps = adj[[j + 1 for j in all_steps]]
        metrics = {
            "loss": float(np.mean(losses)), "control_norm": float(np.mean(controls)),
            "adjoint_norm": float(adj_steps.flatten(2).norm(dim=-1).mean()),
            "adjoint_clipped_frac": (float((adj_steps.abs() >= args.adjoint_clip_value).float().mean())
                                     if args.clip_adjoint else 0.0),
            "terminal_clipped_frac": (float((terminal.abs() >= args.adjoint_clip_value).float().mean())
                                      if args.clip_adjoint else 0.0),
            "loss_kept_frac": float(np.mean(kept_fracs)),
            "predicted_reward": float(predicted.detach().mean()), "env_score": float(res["score"].mean()),
            "env_success": float(res["success"].mean()), "num_trajectories": int(active.sum()),
        }
        metrics = distributed.mean_over_ranks(dist_info, metrics)  # per-rank means, averaged
        metrics.update(num_trajectories=int(round(metrics["num_trajectories"] * world)),
                       lr=scheduler.get_last_lr()[0], elapsed_s=round(time.time() - started, 1))
        done = it + 1
        if is_main and args.eval_every and done % args.eval_every == 0:
            metrics.update(evaluate(ft, ema, args))
        log.log(metrics, done)
        bar.set_postfix(loss=f"{metrics['loss']:.3g}", r_pred=f"{metrics['predicted_reward']:.3f}",
                        score=f"{metrics['env_score']:.2f}")
        if done % args.save_every == 0 or done == args.num_ft_iters:
            state = train_state(done)
            if is_main:
                save_checkpoint(policy_checkpoint(ft, ema.model if ema else None, state, provenance, metrics),
                                latest_path)
    bar.close()
    if not is_main:
        distributed.barrier(dist_info)
        return {"output": args.output, "run_dir": run_dir, "rank": rank, "world_size": world,
                "params_sha256": distributed.param_digest(ft.model)}

    final_state = {"iteration": args.num_ft_iters, "args": plain_values(vars(args)), "run_dir": run_dir}
    save_checkpoint(policy_checkpoint(ft, ema.model if ema else None, final_state, provenance, metrics), args.output)
    log.close()
    print(f"saved {args.output}")
    distributed.barrier(dist_info)
    return {"output": args.output, "run_dir": run_dir, "rank": 0, "world_size": world,
            "params_sha256": distributed.param_digest(ft.model), **reference, **metrics}


@torch.no_grad()
def evaluate(ft, ema, args):
    """Score the current policy (the EMA copy if kept) on validation seeds 400000+."""
    live = ft.model
    if ema is not None:
        ft.model = ema.model  # swapped in place and back: a shallow copy would share the module dict
    try:
        seeds = list(range(VALIDATION_SEED_START, VALIDATION_SEED_START + args.eval_episodes))
        res = rollout(ft, seeds, max_steps=args.max_steps, generator=torch.Generator().manual_seed(args.seed))
    finally:
        ft.model = live
    return {"val_score": float(res["score"].mean()), "val_success": float(np.mean(res["success"]))}


if __name__ == "__main__":
    run_cli(main, parse_args)
