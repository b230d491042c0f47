"""Stage 3: fit the reward model on collected rollouts.

Usage:
    python train_reward.py --num_epochs 300 --lr 1e-2 --batch_size 256 --action_reward_path ./data/reward/action_reward_data_300eps.npy
    python train_reward.py --action_reward_path X.npy --target return_to_go

The model maps (observation window, whole predicted action chunk), each min-max normalised on
the collected data, to the chosen target (standardised for training). For the reward after the
chunk (the default target) it is by default two MLPs composed (--structure dynamics): what the
chunk does to the observation, learned from the observation each row's chunk led to, and that
observation's reward; run-time best of 8 by it is worth +20.4 and +20.0 points of held-out
success (two training seeds) where one MLP straight to the reward (--structure direct) is worth
+7.2 (README, Results). Episodes are split into training and validation; every epoch logs
validation MSE, R^2 and Spearman rank correlation, and the best validation model is saved, with
a scatter plot of predicted vs. true reward on validation (PNG) in the run directory. With branched data (collect_rewards.py
--branches) it also logs `val_branch_pick_gain`: among the chunks tried from one state, how
much of the best chunk's advantage the model's favourite gets (1 = always the best, 0 =
chance) -- the within-state ranking that fine-tuning relies on; also by the state's coverage before
the chunk (`val_pick_gain_cov_lt80`, `_cov_80_90`, `_cov_ge90`, with `val_rank_corr_*`, the
mean rank correlation among a state's chunks).
"""

import os
import time

import numpy as np
import torch
from tqdm import tqdm

from diffusion_policy.common.atomic import atomic_path
from diffusion_policy.common.cli import Parser, add_force_flag, add_run_flags, count, fraction, nonnegative, positive, preflight, run_cli, show_progress
from diffusion_policy.checkpoint import save_checkpoint
from diffusion_policy.env.geometry import SUCCESS_COVERAGE
from diffusion_policy.common.outputs import default_run_dir, run_dir_claimed
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.reward_data import TARGETS, RewardDataError, load_reward_data, sidecar_path
from diffusion_policy.reward_model import STRUCTURES, FitRows, RewardModel, RewardModelConfig, reward_checkpoint
from diffusion_policy.common.runlog import RunLog
from diffusion_policy.common.resume import check_resumable, resumable_state
from diffusion_policy.common.runtime import UserError, optimizer_step, resolve_device, seed_everything
from diffusion_policy.reward_metrics import branch_pick_gain, regression_metrics, scatter_plot, split_by_episode, within_state_metrics

DEFAULT_TARGET = "reward_after"  # the reward after the chunk's executed steps: what fine-tuning tilts towards
# the target's structure when --structure is not given: what a chunk does to the observation, then that
# observation's reward (README, Results: best of 8 by it +20.4 / +20.0 points, by the direct MLP +7.2)
DEFAULT_STRUCTURE = {"reward_after": "dynamics", "reward_diff": "direct", "return_to_go": "direct"}


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--action_reward_path", default="./data/reward/action_reward_data_300eps.npy",
                   help="reward data from collect_rewards.py (its .json sidecar beside it)")
    p.add_argument("--target", default=None, choices=TARGETS,
                   help=f"which recorded reward to learn (default {DEFAULT_TARGET})")
    p.add_argument("--num_epochs", type=count(1), default=300, help="passes over the training rows")
    p.add_argument("--lr", type=positive, default=1e-2, help="peak AdamW learning rate (cosine decay to 0)")
    p.add_argument("--batch_size", type=count(1), default=256, help="rows per step")
    p.add_argument("--weight_decay", type=nonnegative, default=1e-4, help="AdamW weight decay")
    p.add_argument("--hidden_dims", type=count(1), nargs="+", default=[256, 256], help="MLP hidden sizes")
    p.add_argument("--structure", choices=STRUCTURES, default=None,
                   help="direct: one MLP (window, chunk) -> reward; dynamics: an MLP for what the chunk does to "
                        "the observation and one for an observation's reward, composed, both fit to the rows' "
                        "recorded next observations (target reward_after only; see diffusion_policy/"
                        "reward_model.py; default: dynamics for reward_after, direct for the other targets)")
    p.add_argument("--val_ratio", type=fraction, default=0.2, help="fraction of episodes held out for validation")
    p.add_argument("--output", default="./data/checkpoints/reward_model_rd0.ckpt", help="where the model goes")
    p.add_argument("--save_every", type=count(1), default=10, help="epochs between resumable states (run_dir/latest.pt)")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/latest.pt after an interruption")
    add_force_flag(p)
    p.add_argument("--run_dir", default=None,
                   help="config.json, metrics.jsonl, the scatter plot (default: beside --output, <output without "
                        ".ckpt>_run)")
    add_run_flags(p, "seed of the split, initialisation and batches")
    return p.parse_args(argv)


# Settings a resumed run must share with the interrupted one.
RESUME_KEYS = ("action_reward_path", "target", "num_epochs", "lr", "batch_size", "weight_decay", "hidden_dims",
               "structure", "val_ratio", "seed")
STATE_KIND = "reward_fit_state"  # run_dir/latest.pt's kind (diffusion_policy/common/resume.py)


def resume_settings(args):
    return {k: v for k, v in vars(args).items() if k in RESUME_KEYS}


def load_resume_state(path, args):
    """The state an interrupted run left at `path`, refused if missing, of another kind or made with other settings."""
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: no {path} (the run finished or never saved); run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"cannot resume: {path} is unreadable; run without --resume to start afresh") from None
    return check_resumable(path, state, STATE_KIND, resume_settings(args))


def main(args):
    target = args.target or DEFAULT_TARGET
    args.structure = args.structure or DEFAULT_STRUCTURE[target]
    if args.structure == "dynamics" and target != "reward_after":
        raise UserError(f"--structure dynamics learns the reward of the observation a chunk leads to: its target is "
                        f"reward_after, not {target}; use --structure direct for {target}")
    run_dir = args.run_dir or default_run_dir(args.output)
    preflight(args.device, files={"--output": args.output}, dirs={"--run_dir": run_dir},
              inputs={"--action_reward_path": args.action_reward_path,
                      "its sidecar": sidecar_path(args.action_reward_path)})
    columns, meta = load_reward_data(args.action_reward_path)
    with run_dir_claimed(run_dir, args.resume, args.force, "reward-model fit"):
        return fit(args, target, run_dir, columns, meta)


def prepare(args, target, columns, meta, device):
    """The rows (FitRows) and a fresh model."""
    has_target = np.isfinite(columns[target])  # return_to_go is NaN on branch rows
    if not has_target.all():
        print(f"'{target}': {int((~has_target).sum())} branch rows have no value and are left out")
        columns = {k: v[has_target] for k, v in columns.items()}
    is_train, is_val = split_by_episode(columns["episode"].astype(np.int64), args.val_ratio, args.seed)
    obs = torch.as_tensor(columns["obs"], dtype=torch.float32)
    actions = torch.as_tensor(columns["action_pred"], dtype=torch.float32)
    y = torch.as_tensor(columns[target], dtype=torch.float32)
    train_idx, val_idx = torch.from_numpy(np.flatnonzero(is_train)), torch.from_numpy(np.flatnonzero(is_val))
    obs_norm = MinMaxNormalizer.fit(obs[train_idx].flatten(0, 1))
    act_norm = MinMaxNormalizer.fit(actions[train_idx].flatten(0, 1))
    mean, std = float(y[train_idx].mean()), float(y[train_idx].std().clamp_min(1e-6))
    config = RewardModelConfig(obs_horizon=meta["obs_horizon"], obs_dim=meta["obs_dim"],
                               pred_horizon=meta["pred_horizon"], hidden_dims=args.hidden_dims, target=target,
                               structure=args.structure)
    model = RewardModel(config, obs_norm, act_norm, mean, std).to(device)
    rows = FitRows(columns, is_val, train_idx, val_idx, y, mean, std, obs_norm.normalize(obs).to(device),
                act_norm.normalize(actions).to(device), ((y - mean) / std).to(device),
                (columns["episode"] * 100000 + columns["call"]).astype(np.int64)[is_val],  # one key per state
                columns["reward_before"][is_val] * SUCCESS_COVERAGE)  # reward = clip(coverage / 0.95, 0, 1)
    if args.structure == "dynamics":  # the observed frames before and after each chunk, and their rewards
        rows.x_after = obs_norm.normalize(torch.as_tensor(columns["obs_after"], dtype=torch.float32)).to(device)
        rows.y_before = ((torch.as_tensor(columns["reward_before"], dtype=torch.float32) - mean) / std).to(device)
        model.effect_scale.copy_((rows.x_after[train_idx] - rows.x_obs[train_idx, -1]).std(0).clamp_min(1e-3))
    return model, rows


def validation_metrics(model, rows, epoch, train_loss):
    pred, true = rows.predict(model, rows.val_idx), rows.y[rows.val_idx].numpy()
    return {"epoch": epoch, "train_loss": train_loss,
            **{f"val_{k}": v for k, v in regression_metrics(pred, true).items()},
            "val_branch_pick_gain": branch_pick_gain(pred, true, rows.val_states),
            **{f"val_{k}": v for k, v in within_state_metrics(pred, true, rows.val_states, rows.val_coverage).items()}}


def fit(args, target, run_dir, columns, meta):
    """The fit itself, in a run directory this process holds."""
    latest_path = os.path.join(run_dir, "latest.pt")
    resume = load_resume_state(latest_path, args) if args.resume else None
    device = resolve_device(args.device)
    generator = seed_everything(args.seed)
    log = RunLog(run_dir, args, args.wandb, job="train_reward", resume=args.resume,
                 resume_at=resume["epoch"] if resume else None)
    model, rows = prepare(args, target, columns, meta, device)
    steps_per_epoch = max(1, int(np.ceil(len(rows.train_idx) / args.batch_size)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.num_epochs * steps_per_epoch)
    print(f"reward model on '{target}': {len(rows.train_idx)} training rows, {len(rows.val_idx)} validation rows "
          f"({int(np.unique(rows.columns['episode'][rows.is_val]).size)} held-out episodes)")

    # ---- the loop --------------------------------------------------------------------
    best, best_state, started, start_epoch = None, None, time.time(), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        best, best_state, start_epoch = resume["best"], resume["best_state"], resume["epoch"]
        print(f"resuming {latest_path} at epoch {start_epoch}/{args.num_epochs}")
    bar = tqdm(range(start_epoch, args.num_epochs), initial=start_epoch, total=args.num_epochs, desc="train reward",
               disable=not show_progress())
    for epoch in bar:
        model.train()
        perm = rows.train_idx[torch.randperm(len(rows.train_idx), generator=generator)]
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size].to(device)
            loss = rows.loss(model, idx, args.structure)
            if not torch.isfinite(loss):
                raise RewardDataError(f"reward-model loss became {loss.item()} in epoch {epoch}; lower --lr "
                                      f"(now {args.lr})")
            optimizer_step(loss, model, optimizer, scheduler, grad_clip=0)
            total += loss.item() * len(idx)
        model.eval()
        metrics = validation_metrics(model, rows, epoch + 1, total / len(rows.train_idx))
        log.log(metrics, epoch + 1)
        if best is None or metrics["val_mse"] < best["val_mse"]:
            best = dict(metrics)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(val_r2=f"{metrics['val_r2']:.3f}", spearman=f"{metrics['val_spearman']:.3f}")
        if (epoch + 1) % args.save_every == 0 and epoch + 1 < args.num_epochs:
            with atomic_path(latest_path) as tmp:
                torch.save(resumable_state(STATE_KIND, resume_settings(args), epoch=epoch + 1, model=model.state_dict(),
                                           optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                           generator=generator.get_state(), best=best, best_state=best_state), tmp)
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    out = save_best(args, target, run_dir, model, best, rows, meta, log)
    if os.path.exists(latest_path):  # finished: nothing left to resume
        os.remove(latest_path)
    print(f"fitted in {time.time() - started:.0f} s")
    return out


def save_best(args, target, run_dir, model, best, rows, meta, log):
    """The best validation model (loaded in `model`): its scatter plot and its checkpoint."""
    plot = os.path.join(run_dir, "reward_fit_val.png")
    scatter_plot(rows.predict(model, rows.val_idx), rows.y[rows.val_idx].numpy(), plot,
                 f"{target}, validation: R2 {best['val_r2']:.3f}, Spearman {best['val_spearman']:.3f} "
                 f"(epoch {best['epoch']})")
    provenance = {"script": "train_reward.py", "action_reward_path": args.action_reward_path,
                  "policy_checkpoint": meta.get("policy_checkpoint"), "git_commit": log.info["git_commit"],
                  "val_episodes": np.unique(rows.columns["episode"][rows.is_val]).astype(int).tolist()}
    model.cpu()
    save_checkpoint(reward_checkpoint(model, provenance, best, {"epochs": args.num_epochs}), args.output)
    log.close()
    pick = best["val_branch_pick_gain"]
    print(f"best validation (epoch {best['epoch']}): MSE {best['val_mse']:.5f}, R2 {best['val_r2']:.3f}, "
          f"Spearman {best['val_spearman']:.3f}" + (f", branch pick gain {pick:.3f}" if pick is not None else ""))
    print(f"saved {args.output}; plot {plot}")
    return {**best, "target": target, "output": args.output, "plot": plot, "run_dir": run_dir}


if __name__ == "__main__":
    run_cli(main, parse_args)
