"""Stage 1: behaviour-clone a DDPM diffusion policy on the Push-T demonstrations.

Usage:
    python pretrain_policy.py --dataset_path ./data/pusht/pusht_cchi_v7_replay.zarr
    python pretrain_policy.py --preset paper --device cuda          # the paper's low-dim setup
    python pretrain_policy.py --num_steps 2000 --lr 3e-4             # any preset value, overridden
    python pretrain_policy.py --resume                               # continue an interrupted run
    torchrun --standalone --nproc_per_node=4 pretrain_policy.py --preset paper   # 4 GPUs, DDP

Writes the policy (EMA weights) to --output (default ./data/checkpoints/policy_pretrained.ckpt)
and, in --run_dir, config.json, metrics.jsonl and latest.ckpt (the resumable state, written
atomically every --save_every steps). --resume continues from latest.ckpt and ends with the
same weights as an uninterrupted run. A NaN loss stops the run; latest.ckpt stays as it was.

Under torchrun (README, "GPUs and several machines"), the model is wrapped in
DistributedDataParallel and every step's global batch of --batch_size windows (with its noise
and timesteps) is drawn from the shared seed on every rank and split between the ranks, so
the update equals the single-process one on the same batch. Losses are averaged over ranks;
rank 0 alone logs, evaluates and writes checkpoints, in the single-process format.
"""

import math
import os
import time

import torch
from tqdm import tqdm

from diffusion_policy.common.cli import Parser, add_force_flag, add_run_flags, count, fraction, nonnegative, positive, preflight, run_cli, show_progress
from diffusion_policy.checkpoint import (
    describe_last_good,
    load_resume_checkpoint,
    policy_checkpoint,
    resumed_changes,
    save_checkpoint,
)
from diffusion_policy.common import distributed
from diffusion_policy.data.dataset import PushTLowdimDataset, load_pusht_arrays, resolve_dataset_path, split_episodes
from diffusion_policy.ddpm import SamplerConfig
from diffusion_policy.common.resume import plain_values
from diffusion_policy.ema import EMA, swapped_in
from diffusion_policy.common.outputs import default_run_dir, run_dir_claimed
from diffusion_policy.model import UNetConfig
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig
from diffusion_policy.rollout import rollout_batches
from diffusion_policy.common.runlog import RunLog
from diffusion_policy.common.runtime import (
    UserError,
    optimizer_step,
    resume_lr,
    seed_everything,
)
from diffusion_policy.common.seeds import VALIDATION_SEED_START

# Values a preset sets; each has a flag of the same name that overrides it.
PRESETS = {
    # Kept by held-out success per minute (benchmarks/pretrain_study, docs/findings.md 2026-12-06): twice its
    # steps gained +7.8 points for twice the time, the 32/64/128 UNet lost 7.6 at the same time.
    "cpu": {
        "down_dims": (64, 128, 256), "diffusion_step_embed_dim": 128, "batch_size": 64, "lr": 3e-4,
        "weight_decay": 1e-6, "num_steps": 10000, "num_epochs": None, "warmup_steps": 500, "ema_power": 0.75,
        "num_inference_steps": 10, "max_train_episodes": None, "val_ratio": 0.05,
    },
    # The paper's low-dim Push-T configuration (Chi et al.), for GPUs.
    "paper": {
        "down_dims": (256, 512, 1024), "diffusion_step_embed_dim": 256, "batch_size": 256, "lr": 1e-4,
        "weight_decay": 1e-6, "num_steps": None, "num_epochs": 5000, "warmup_steps": 500, "ema_power": 0.75,
        "num_inference_steps": 100, "max_train_episodes": 90, "val_ratio": 0.02,
    },
    # Seconds, for tests and smoke runs.
    "tiny": {
        "down_dims": (16, 32), "diffusion_step_embed_dim": 16, "batch_size": 16, "lr": 1e-3,
        "weight_decay": 1e-6, "num_steps": 20, "num_epochs": None, "warmup_steps": 2, "ema_power": 0.75,
        "num_inference_steps": 4, "max_train_episodes": 4, "val_ratio": 0.05,
    },
}
# Settings that must not change when a run is resumed (--lr and --grad_clip may: a diverged run's advice).
RESUME_KEYS = ("down_dims", "diffusion_step_embed_dim", "batch_size", "weight_decay", "num_steps",
               "warmup_steps", "ema_power", "max_train_episodes", "val_ratio", "seed")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--dataset_path", default="./data/pusht/pusht_cchi_v7_replay.zarr", help="Push-T zarr store")
    p.add_argument("--output", default="./data/checkpoints/policy_pretrained.ckpt", help="where the policy goes")
    p.add_argument("--run_dir", default=None,
                   help="config.json, metrics.jsonl and the resumable latest.ckpt (default: beside --output, "
                        "<output without .ckpt>_run)")
    cpu = PRESETS["cpu"]
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help=f"cpu (default): UNet {'/'.join(map(str, cpu['down_dims']))}, {cpu['num_steps']:,} steps of batch "
                        f"{cpu['batch_size']}, {cpu['num_inference_steps']} DDPM steps; 28 min on 2 Intel cores, held-out "
                        "success 0.55 (500 starts); kept by held-out success per minute (benchmarks/pretrain_study: "
                        "twice the steps +7.8 points, a 2.2x cheaper UNet -7.6); paper: the paper's sizes, for GPUs; "
                        "tiny: seconds")
    g = p.add_argument_group("preset values (default: from --preset)")

    def per_preset(key):
        values = {name: PRESETS[name][key] for name in ("cpu", "paper", "tiny")}
        shown = {n: " ".join(map(str, v)) if isinstance(v, tuple) else ("-" if v is None else v) for n, v in values.items()}
        return " (default: " + "; ".join(f"{n} {v}" for n, v in shown.items()) + ")"

    g.add_argument("--down_dims", type=count(1), nargs="+", default=None, help="UNet channels per level, e.g. 64 128 256" + per_preset("down_dims"))
    g.add_argument("--diffusion_step_embed_dim", type=count(1), default=None, help="size of the diffusion-step embedding" + per_preset("diffusion_step_embed_dim"))
    g.add_argument("--batch_size", type=count(1), default=None, help="windows per optimisation step" + per_preset("batch_size"))
    g.add_argument("--lr", type=positive, default=None, help="peak AdamW learning rate" + per_preset("lr"))
    g.add_argument("--weight_decay", type=nonnegative, default=None, help="AdamW weight decay" + per_preset("weight_decay"))
    g.add_argument("--num_steps", type=count(1), default=None, help="optimisation steps (overrides --num_epochs)" + per_preset("num_steps"))
    g.add_argument("--num_epochs", type=count(1), default=None, help="passes over the training windows, if no --num_steps" + per_preset("num_epochs"))
    g.add_argument("--warmup_steps", type=count(0), default=None, help="linear warm-up before the cosine decay" + per_preset("warmup_steps"))
    g.add_argument("--ema_power", type=nonnegative, default=None, help="EMA warm-up power (decay 1 - (1+step)^-power)" + per_preset("ema_power"))
    g.add_argument("--num_inference_steps", type=count(1), default=None, help="DDPM sampling steps stored with the policy" + per_preset("num_inference_steps"))
    g.add_argument("--max_train_episodes", type=count(1), default=None, help="train on at most this many episodes" + per_preset("max_train_episodes"))
    g.add_argument("--val_ratio", type=fraction, default=None, help="fraction of episodes held out for validation" + per_preset("val_ratio"))
    p.add_argument("--grad_clip", type=nonnegative, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--log_every", type=count(1), default=100, help="steps between metric lines (train and val loss)")
    p.add_argument("--save_every", type=count(1), default=1000, help="steps between resumable checkpoints")
    p.add_argument("--eval_every", type=count(0), default=0,
                   help="steps between in-environment evaluations on validation seeds (0: off)")
    p.add_argument("--eval_episodes", type=count(1), default=20, help="episodes per in-environment evaluation")
    p.add_argument("--eval_max_steps", type=count(1), default=300, help="control steps per evaluation episode")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/latest.ckpt")
    add_force_flag(p)
    add_run_flags(p, "seed of the split, initialisation, batches and noise")
    return p.parse_args(argv)


def apply_preset(args):
    """Fill every preset value the user did not set."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.down_dims = tuple(args.down_dims)
    return args


def warmup_cosine(warmup_steps, total_steps):
    """LR multiplier: linear from 0 over warm-up, then cosine from 1 to 0 at total_steps."""

    def factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def main(args):
    args = apply_preset(args)
    if args.val_ratio >= 1:
        raise UserError(f"argument --val_ratio: must be below 1 (some episodes must train), got {args.val_ratio:g}")
    try:  # the model's and sampler's own checks, before any work
        UNetConfig(down_dims=args.down_dims, diffusion_step_embed_dim=args.diffusion_step_embed_dim)
        SamplerConfig(num_inference_steps=args.num_inference_steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    args.run_dir = args.run_dir or default_run_dir(args.output)
    preflight(args.device, files={"--output": args.output}, dirs={"--run_dir": args.run_dir},
              inputs={"--dataset_path": args.dataset_path})
    args.dataset_path = resolve_dataset_path(args.dataset_path)  # fetched here on first use
    with run_dir_claimed(args.run_dir, args.resume, args.force, "pre-training"):
        return distributed.run(train, args)


def train(args, dist_info):
    device, is_main, world = dist_info.device, dist_info.is_main, dist_info.world_size
    generator = seed_everything(args.seed)
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")

    # ---- data ------------------------------------------------------------------------
    arrays = load_pusht_arrays(resolve_dataset_path(args.dataset_path))
    train_ids, val_ids = split_episodes(len(arrays["episode_ends"]), args.val_ratio, args.max_train_episodes,
                                        seed=args.seed)
    train = PushTLowdimDataset(arrays, train_ids)
    val = (PushTLowdimDataset(arrays, val_ids, obs_normalizer=train.obs_normalizer,
                              action_normalizer=train.action_normalizer) if len(val_ids) else None)
    if args.num_steps is None:
        args.num_steps = args.num_epochs * math.ceil(len(train) / args.batch_size)

    # ---- model, optimiser, EMA -------------------------------------------------------
    policy = DiffusionPolicy(
        PolicyConfig(), UNetConfig(down_dims=args.down_dims, diffusion_step_embed_dim=args.diffusion_step_embed_dim),
        SamplerConfig(num_inference_steps=args.num_inference_steps), train.obs_normalizer, train.action_normalizer,
    ).to(device)
    ema = EMA(policy.model, power=args.ema_power)
    ddp_model = distributed.wrap(dist_info, policy.model)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=args.lr, betas=(0.95, 0.999),
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, args.num_steps))

    latest_path = os.path.join(args.run_dir, "latest.ckpt")
    start_step, resumed = 0, None
    if args.resume:
        ckpt = load_resume_checkpoint(latest_path, {k: getattr(args, k) for k in RESUME_KEYS}, map_location=device,
                                      saved_key="args")
        policy.model.load_state_dict(ckpt["model_state_dict"])
        ema.model.load_state_dict(ckpt["ema_model_state_dict"])
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        scheduler.load_state_dict(ckpt["train_state"]["scheduler"])
        generator.set_state(ckpt["train_state"]["generator"])
        start_step = ckpt["train_state"]["step"]
        resumed = resumed_changes(ckpt, args, start_step, ("lr", "grad_clip"))
        resume_lr(optimizer, scheduler, args.lr)
        print(f"resuming {latest_path} at step {start_step}/{args.num_steps}"
              + "".join(f"; --{k} {new} (was {old})" for k, (old, new) in resumed["resumed"]["changed"].items()))

    log = RunLog(args.run_dir, args, args.wandb, job="pretrain", resume=args.resume,
                 enabled=is_main, extra=resumed, resume_at=start_step)
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"pre-training: {n_params / 1e6:.2f}M parameters, {len(train)} windows from {len(train_ids)} episodes "
          f"({len(val_ids)} held out), {args.num_steps} steps of batch {args.batch_size} on {device}"
          + (f" x {world} processes" if world > 1 else ""))

    def train_state(step):
        return {"step": step, "args": plain_values(vars(args)), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state()}

    provenance = {"script": "pretrain_policy.py", "dataset_path": args.dataset_path,
                  "train_episodes": train_ids.tolist(), "val_episodes": val_ids.tolist(),
                  "git_commit": log.info["git_commit"], "preset": args.preset}

    # ---- the loop --------------------------------------------------------------------
    policy.train()
    running, n_running, started, last_metrics = 0.0, 0, time.time(), {}
    bar = tqdm(range(start_step, args.num_steps), initial=start_step, total=args.num_steps, desc="pretrain",
               disable=not (show_progress() and is_main))
    mine = dist_info.shard(torch.arange(args.batch_size))  # this rank's rows of every global batch
    for step in bar:
        # the global batch, its noise and timesteps: the same draws on every rank, then this rank's share
        idx = torch.randint(0, len(train), (args.batch_size,), generator=generator)
        noise, t = policy.draw_noise((args.batch_size, policy.config.pred_horizon, policy.config.action_dim),
                                     generator)
        batch = train.batch(idx[mine])
        loss = policy.compute_loss(batch["obs"].to(device), batch["action"].to(device), model=ddp_model,
                                   noise=noise[mine], t=t[mine])
        loss_value = distributed.mean_over_ranks(dist_info, {"loss": loss.item()})["loss"]
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {step}; the last good checkpoint is "
                            f"{describe_last_good(latest_path, 'step')}. "
                            f"Lower --lr (now {args.lr}) or --grad_clip, then --resume or start afresh")
        optimizer_step(loss, policy.model, optimizer, scheduler, args.grad_clip)
        ema.update(policy.model, step)
        running += loss_value
        n_running += 1
        done = step + 1

        if is_main and (done % args.log_every == 0 or done == args.num_steps):
            last_metrics = {"train_loss": running / n_running, "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": round(time.time() - started, 1)}
            if val is not None:
                last_metrics["val_loss_ema"] = validation_loss(policy, ema.model, val, device)
            log.log(last_metrics, done)
            bar.set_postfix(loss=f"{last_metrics['train_loss']:.4f}",
                            val=f"{last_metrics.get('val_loss_ema', float('nan')):.4f}")
            running, n_running = 0.0, 0
        if is_main and args.eval_every and done % args.eval_every == 0:
            metrics = evaluate_in_env(policy, ema.model, args)
            log.log(metrics, done)
            last_metrics.update(metrics)
        if is_main and (done % args.save_every == 0 or done == args.num_steps):
            save_checkpoint(policy_checkpoint(policy, ema.model, train_state(done), provenance, last_metrics),
                            latest_path)
    bar.close()
    if not is_main:  # rank 0 writes the policy; the others return what they trained
        distributed.barrier(dist_info)
        return {"output": args.output, "run_dir": args.run_dir, "steps": args.num_steps, "rank": dist_info.rank,
                "world_size": world, "params_sha256": distributed.param_digest(policy.model)}

    # ---- the policy: EMA weights, lean training state ------------------------------------
    final_state = {"step": args.num_steps, "args": plain_values(vars(args)), "run_dir": args.run_dir}
    save_checkpoint(policy_checkpoint(policy, ema.model, final_state, provenance, last_metrics), args.output)
    log.close()
    print(f"saved {args.output}")
    distributed.barrier(dist_info)
    return {"output": args.output, "run_dir": args.run_dir, "steps": args.num_steps, "rank": 0, "world_size": world,
            "params_sha256": distributed.param_digest(policy.model), **last_metrics}


@torch.no_grad()
def validation_loss(policy, model, val, device):
    """Noise-prediction MSE of `model` on every validation window, with fixed noise and timesteps."""
    g = torch.Generator().manual_seed(0)
    batch = val.batch(torch.arange(len(val)))
    return policy.compute_loss(batch["obs"].to(device), batch["action"].to(device), generator=g, model=model).item()


@torch.no_grad()
def evaluate_in_env(policy, ema_model, args):
    """Score the EMA policy on validation seeds (never the held-out evaluation seeds)."""
    seeds = list(range(VALIDATION_SEED_START, VALIDATION_SEED_START + args.eval_episodes))
    with swapped_in(policy, ema_model):
        res = rollout_batches(policy, seeds, batch_size=len(seeds), max_steps=args.eval_max_steps,
                              generator=torch.Generator().manual_seed(args.seed))
    return {"val_env_score": float(res["score"].mean()), "val_env_success": float(res["success"].mean())}



if __name__ == "__main__":
    run_cli(main, parse_args)
