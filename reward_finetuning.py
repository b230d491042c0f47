"""Stage 4: fine-tune the diffusion policy towards a reward: reward-weighted denoising or Adjoint Matching.

Usage:
    python reward_finetuning.py --num_ft_iters 200 --num_eps 3 --warmup_steps 10 --lr 1e-4 --clip_adjoint --noise_pred_model_path ./data/checkpoints/policy_pretrained.ckpt --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt --action_reward_path ./data/reward/action_reward_data_300eps.npy
    python reward_finetuning.py --method weighted --reward_source simulator      # the simulator's reward
    python reward_finetuning.py --method weighted --control                       # the same with random weights
    python reward_finetuning.py ... --resume
    torchrun --standalone --nproc_per_node=4 reward_finetuning.py ...   # 4 GPUs: 4 x --num_eps per iteration

Both methods aim at the same target, p_base(chunk | obs) * exp(lambda * r(obs, chunk)), with r
the reward after the chunk's executed steps, from the reward model (--reward_source model) or
from the simulator itself (--reward_source simulator: the chunk run on a copy of the env).
Each iteration rolls the current fine-tuned policy out on --num_eps fresh start states from the
fine-tuning seed range (300000+) and updates it on what it saw:

- --method adjoint (Adjoint Matching, diffusion_policy/finetune/adjoint.py): the sampler chains
  of the calls, the lean adjoint from a_K = -lambda grad r through the frozen base model, and
  --grad_steps_per_iter steps on the Adjoint Matching loss. It steers by the *gradient* of r.
- --method weighted (diffusion_policy/finetune/weighted.py): at up to --states_per_iter calls,
  --num_candidates fresh chunks from the current policy, weighted by softmax(lambda r) (or the
  best one, --weighting best), and --grad_steps_per_iter steps on a weighted denoising loss
  written as a correction to the frozen base model (--anchor_weight). It uses the *values* of r.

--control gives the weighted method's weights to randomly chosen candidates, and Adjoint
Matching's reward gradients to randomly chosen chunks of the same iteration: same data, same
steps, no information; a setting counts only if it beats its control. Method-dependent flags
default per method (their help says which). With --tilt_every N the tilt meter
(diffusion_policy/finetune/tilt.py) logs every N iterations, and at the end, how much of the
predicted one-chunk tilt the policy has realised on fixed states from seeds 500000+.

--action_reward_path (optional, model source) is the reward data the reward model was trained
on: the model's mean prediction on the data's own chunks is logged as `ref_predicted_reward`,
and a reward model fitted on other data is reported.

Under torchrun each rank rolls out its own --num_eps episodes from disjoint seeds (iteration i,
rank r: start_seed + (i * world + r) * num_eps ...) with its own sampling noise (seed + rank)
and takes its share of one DistributedDataParallel update; metrics are averaged over ranks,
and rank 0 alone logs, measures the tilt, evaluates and writes checkpoints.

Writes the fine-tuned policy (--output, default ./data/checkpoints/policy_finetuned_rd0.ckpt),
a policy checkpoint like any other with provenance (base model, reward source, method,
lambda, iterations); the run directory holds config.json, metrics.jsonl and the resumable
latest.ckpt.
"""

import contextlib
import copy
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from diffusion_policy.cli import Parser, count, fraction, nonnegative, positive, preflight
from diffusion_policy import distributed
from diffusion_policy.checkpoint import (
    describe_last_good,
    load_checkpoint,
    load_resume_checkpoint,
    plain_values,
    policy_checkpoint,
    policy_from_checkpoint,
    resumed_changes,
    save_checkpoint,
)
from diffusion_policy.ema import EMA
from diffusion_policy.finetune.adjoint import AdjointMatching
from diffusion_policy.finetune.extrapolate import extrapolated_model
from diffusion_policy.finetune.sources import SOURCES, make_source
from diffusion_policy.finetune.tilt import build_tilt_meter
from diffusion_policy.finetune.weighted import ANCHORS, BEHAVIOURS, TARGETS, WEIGHTINGS, RewardWeighted
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_model import check_fits_policy, load_reward_model
from diffusion_policy.rollout import rollout
from diffusion_policy.runlog import RunLog
from diffusion_policy.runtime import (
    UserError,
    add_run_flags,
    optimizer_step,
    resume_lr,
    run_cli,
    seed_everything,
)
from diffusion_policy.seeds import FINETUNE_SEED_START, VALIDATION_SEED_START

METHODS = {"adjoint": AdjointMatching, "weighted": RewardWeighted}
DEFAULT_METHOD = "adjoint"
# flags whose default depends on --method (None on the command line = this table)
METHOD_DEFAULTS = {
    "adjoint": {"num_ft_iters": 200, "num_eps": 3, "lr": 1e-4, "reward_scale": 10.0, "grad_steps_per_iter": 1,
                "ema_decay": 0.0},
    # the best of the protocol's settings (docs/finetuning.md): lr 5e-5, 40 iterations, EMA 0.998
    "weighted": {"num_ft_iters": 40, "num_eps": 8, "lr": 5e-5, "reward_scale": 100.0, "grad_steps_per_iter": 16,
                 "ema_decay": 0.998},
}
# Settings that must not change when a run is resumed (--lr may: a diverged run's advice).
RESUME_KEYS = ("noise_pred_model_path", "reward_model_path", "num_ft_iters", "num_eps", "warmup_steps",
               "reward_scale", "num_loss_steps", "grad_steps_per_iter", "clip_adjoint", "adjoint_clip_value", "clip_loss", "ema_decay",
               "seed", "start_seed", "method", "reward_source", "weighting", "num_candidates", "states_per_iter",
               "batch_states", "replay_iters", "anchor", "anchor_weight", "behaviour", "control", "target", "candidates", "shuffles", "sim_sigma", "sim_pairs", "sim_horizon",
               "reanchor_every")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    per = "(default: " + "; ".join(f"{m} {{{m}}}" for m in METHODS) + ")"

    def per_method(key):
        return per.format(**{m: METHOD_DEFAULTS[m][key] for m in METHODS})

    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help=f"weighted: reward-weighted denoising; adjoint: Adjoint Matching (default: {DEFAULT_METHOD})")
    p.add_argument("--reward_source", default="model", choices=SOURCES,
                   help="model: the reward MLP; simulator: run each chunk on a copy of the env (default: model)")
    p.add_argument("--noise_pred_model_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="the pre-trained policy: the base model and the fine-tuning start")
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt",
                   help="the reward model from train_reward.py (--reward_source model)")
    p.add_argument("--action_reward_path", default=None,
                   help="the reward data the reward model was fit on: a logged reference level, not training data (default: none)")
    p.add_argument("--output", default="./data/checkpoints/policy_finetuned_rd0.ckpt", help="the fine-tuned policy")
    p.add_argument("--run_dir", default=None, help="config.json, metrics.jsonl, latest.ckpt (default data/runs/<name>)")
    p.add_argument("--num_ft_iters", type=count(1), default=None,
                   help="fine-tuning iterations (rollouts + update) " + per_method("num_ft_iters"))
    p.add_argument("--num_eps", type=count(1), default=None,
                   help="episodes rolled out per iteration (fresh seeds) " + per_method("num_eps"))
    p.add_argument("--start_seed", type=count(0), default=FINETUNE_SEED_START,
                   help="first start-state seed; iteration i uses start_seed + i * num_eps onwards (default 300000)")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps per rollout episode (default 300)")
    p.add_argument("--lr", type=positive, default=None, help="AdamW learning rate after warm-up " + per_method("lr"))
    p.add_argument("--warmup_steps", type=count(0), default=10,
                   help="optimiser steps of linear learning-rate warm-up (default 10)")
    p.add_argument("--weight_decay", type=nonnegative, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad_clip", type=nonnegative, default=1.0, help="clip the gradient norm to this, 0: off (default 1)")
    p.add_argument("--reward_scale", type=nonnegative, default=None,
                   help="lambda: the target is p_base * exp(lambda r) " + per_method("reward_scale")[:-1]
                        + "; weighted with --weighting standardized 1)")
    p.add_argument("--grad_steps_per_iter", type=count(1), default=None,
                   help="optimiser steps per iteration on the same rollouts " + per_method("grad_steps_per_iter"))
    p.add_argument("--ema_decay", type=fraction, default=None,
                   help="constant-decay EMA of the fine-tuned weights, saved as the policy, 0: off (the live "
                        "weights are saved) " + per_method("ema_decay"))
    p.add_argument("--reanchor_every", type=count(0), default=0,
                   help="every this many iterations the policy so far (the EMA if kept) becomes the new base, "
                        "anchor and proposer, and the optimiser, EMA and method restart from it, exactly as a "
                        "second run started from the first's output would; 0: one base throughout (default 0)")
    p.add_argument("--extrapolate", type=positive, default=1.0,
                   help="save base + s (fine-tuned - base) of the acting (EMA) weights: s > 1 goes further "
                        "along the update (diffusion_policy/finetune/extrapolate.py); the resumable state "
                        "keeps the fine-tuned weights (default 1: as fine-tuned)")
    p.add_argument("--num_inference_steps", type=count(1), default=None, help="DDPM steps (default: the checkpoint's)")
    g = p.add_argument_group("weighted method")
    g.add_argument("--weighting", default="softmax", choices=WEIGHTINGS,
                   help="softmax: w = softmax(lambda r) per state; best: the best candidate only; standardized: "
                        "softmax(lambda z), z the state's rewards standardised ((r - mean) / std), so lambda is in "
                        "units of each state's own spread (its default is then 1) (default: softmax)")
    g.add_argument("--target", default="posterior", choices=TARGETS,
                   help="posterior: regress on the tilt's conditional expectation given the noised chunk, the "
                        "candidates integrated out; sample: the weighted denoising loss on each noised candidate "
                        "(default: posterior)")
    g.add_argument("--shuffles", type=count(0), default=4,
                   help="posterior target: subtract the correction averaged over this many shufflings of the "
                        "weights, so that uninformative weights change nothing on average; 0: subtract the "
                        "unweighted posterior, as at first (default 4)")
    g.add_argument("--candidates", default="current", choices=("current", "base"),
                   help="who proposes the candidates at the visited states: base, the pre-trained policy (its "
                        "tilt is the target), or current, the policy being fine-tuned (default: current)")
    g.add_argument("--behaviour", default="policy", choices=BEHAVIOURS,
                   help="what acts in the fine-tuning rollouts: policy, the current policy (candidates drawn "
                        "afterwards at some of its calls), or best, the best of --num_candidates chunks by the "
                        "reward model at every call (the tilted policy's own states; the same candidates are the "
                        "update's batch; --reward_source model only) (default: policy)")
    g.add_argument("--num_candidates", type=count(2), default=8, help="chunks drawn per visited state (default 8)")
    g.add_argument("--states_per_iter", type=count(1), default=256,
                   help="visited states kept per iteration, at random (default 256)")
    g.add_argument("--replay_iters", type=count(1), default=1,
                   help="draw each optimiser step's states from the scored candidates of the last this many "
                        "iterations, each with the weights it got when collected; 1: this iteration's only "
                        "(default 1)")
    g.add_argument("--batch_states", type=count(1), default=128,
                   help="states per optimiser step, each with all its candidates (default 128)")
    g.add_argument("--anchor", default="base", choices=ANCHORS,
                   help="the reference the correction is added to: base, the frozen pre-trained model (the fit "
                        "settles on the base's tilt), or current, the fine-tuned model itself without gradient "
                        "(each step tilts what the policy proposes now; the tilts compound), or ema, the EMA of the "
                        "weights (a reference that follows the policy slowly: about one more tilt per EMA time "
                        "constant); current and ema need --target posterior (default: base)")
    g.add_argument("--anchor_weight", type=positive, default=1.0,
                   help="beta: pull towards the pre-trained model's noise prediction; 1 fits the exact tilt, "
                        "more stops short of it (default 1)")
    g.add_argument("--control", action="store_true",
                   help="the control run: each state's weights given to its candidates in random order "
                        "(weighted), each chunk's reward gradient given to another chunk of the iteration (adjoint)")
    g = p.add_argument_group("adjoint method")
    g.add_argument("--num_loss_steps", type=count(1), default=4,
                   help="sampler steps in the loss per optimiser step (half from the noisiest 60 %%; default 4)")
    g.add_argument("--clip_adjoint", action="store_true", help="clamp the adjoint element-wise (logged)")
    g.add_argument("--adjoint_clip_value", type=positive, default=1.0, help="the clamp of --clip_adjoint (default 1)")
    g.add_argument("--clip_loss", action="store_true",
                   help="drop per-sample losses above an EMA of their 90 %% quantile x 2 (logged)")
    g = p.add_argument_group("simulator reward source")
    g.add_argument("--sim_sigma", type=positive, default=0.05,
                   help="std of the antithetic perturbations of the normalised executed steps (adjoint; default 0.05)")
    g.add_argument("--sim_pairs", type=count(1), default=8, help="antithetic pairs per gradient estimate (adjoint; default 8)")
    g.add_argument("--sim_horizon", type=count(0), default=0,
                   help="after the chunk, the pre-trained policy goes on for this many more calls on the copy and "
                        "the chunk is worth the best reward reached; 0: the reward after the chunk (default 0)")
    g = p.add_argument_group("monitoring")
    g.add_argument("--tilt_every", type=count(0), default=0,
                   help="iterations between tilt-meter readings, also taken at the end; 0: off (default 0)")
    g.add_argument("--tilt_states", type=count(1), default=64, help="states of the tilt meter (default 64)")
    g.add_argument("--tilt_samples", type=count(1), default=16, help="chunks per state of the tilt meter (default 16)")
    g.add_argument("--eval_every", type=count(0), default=0,
                   help="iterations between evaluations on validation seeds 400000+, 0: off (default 0)")
    g.add_argument("--eval_episodes", type=count(1), default=50, help="episodes per periodic evaluation (default 50)")
    g.add_argument("--save_every", type=count(1), default=10, help="iterations between resumable checkpoints (default 10)")
    g.add_argument("--resume", action="store_true", help="continue from run_dir/latest.ckpt")
    add_run_flags(p, "seed of the sampling noise, the weights' draws and the loss steps (default 0)")
    args = p.parse_args(argv)
    if args.behaviour == "best" and args.reward_source != "model":
        p.error("--behaviour best scores every call's candidates with the reward model: use --reward_source model")
    if args.anchor != "base" and args.target != "posterior":
        p.error(f"--anchor {args.anchor} needs --target posterior: the sample loss's weighted term has no minimum "
                "without the pull towards a fixed reference")
    if args.weighting == "standardized" and args.reward_scale is None:
        args.reward_scale = 1.0  # in units of each state's spread of reward
    for key, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.anchor == "ema" and not args.ema_decay > 0:
        p.error("--anchor ema needs an EMA of the weights: give --ema_decay > 0")
    return args


def reference_level(action_reward_path, reward_model, device):
    """Mean predicted reward on the reward data's own chunks, and its mean true target."""
    columns, meta = load_reward_data(action_reward_path)
    with torch.no_grad():
        pred = reward_model.reward(torch.as_tensor(columns["obs"], dtype=torch.float32, device=device),
                                   torch.as_tensor(columns["action_pred"], dtype=torch.float32, device=device))
    return float(pred.mean()), float(columns[reward_model.config.target].mean())


@contextlib.contextmanager
def acting_weights(ft, ema, base=None, extrapolate=1.0):
    """The policy as it would be saved: the EMA weights (extrapolated from `base` by
    `extrapolate`, if not 1) swapped in while the block runs."""
    live = ft.model
    acting = ema.model if ema is not None else live
    if extrapolate != 1.0:
        acting = extrapolated_model(base.model, acting, extrapolate)
    ft.model = acting  # swapped in place and back: a shallow copy would share the module dict
    try:
        yield ft
    finally:
        ft.model = live


def reanchor(ctx, optimizer, scheduler, seed):
    """--reanchor_every: the policy so far (the EMA if kept) becomes the base, the anchor and the
    proposer; the optimiser, its warm-up, the EMA, the random streams and the method's state
    restart from it. The run then goes on exactly as a new run started from its output would
    (tests/test_finetune.py): rounds of one tilt each, the next round's tilt taken around the
    last round's policy. Returns the fresh method."""
    acting = (ctx.ema.model if ctx.ema is not None else ctx.ft.model).state_dict()
    for module in (ctx.base.model, ctx.ft.model):
        module.load_state_dict(acting)
    optimizer.state.clear()
    scheduler.last_epoch = -1
    scheduler.step()  # the warm-up from its first step, as a fresh scheduler starts
    seed_everything(seed)
    ctx.generator.manual_seed(seed)
    return METHODS[ctx.args.method](ctx)


def tilt_meter(base, source, args):
    """The tilt meter of this run (diffusion_policy/finetune/tilt.py), at the run's lambda and weighting."""
    return build_tilt_meter(base, source, args.reward_scale, args.tilt_states, args.tilt_samples,
                            args.weighting if args.method == "weighted" else "softmax", args.num_candidates,
                            args.max_steps)


def main(args):
    name = os.path.splitext(os.path.basename(args.output))[0]
    preflight(args.device, files={"--output": args.output},
              dirs={"--run_dir": args.run_dir or os.path.join("data", "runs", name)})
    policy_ckpt = load_checkpoint(args.noise_pred_model_path, "policy")
    if args.reward_source == "model":
        check_fits_policy(load_checkpoint(args.reward_model_path, "reward"), policy_ckpt, args.reward_model_path,
                          args.noise_pred_model_path)
    if args.action_reward_path:
        load_reward_data(args.action_reward_path)
    return distributed.run(finetune, args)


def finetune(args, dist_info):
    device, is_main, world, rank = dist_info.device, dist_info.is_main, dist_info.world_size, dist_info.rank
    seed_everything(args.seed + rank)
    generator = torch.Generator().manual_seed(args.seed + rank)
    name = os.path.splitext(os.path.basename(args.output))[0]
    run_dir = args.run_dir or os.path.join("data", "runs", name)
    latest_path = os.path.join(run_dir, "latest.ckpt")

    # ---- models: frozen base, trainable copy, reward source -----------------------------
    base_ckpt = load_checkpoint(args.noise_pred_model_path, "policy")
    base = policy_from_checkpoint(base_ckpt, device=device, num_inference_steps=args.num_inference_steps)
    base.requires_grad_(False)
    ft = copy.deepcopy(base)
    ft.model.requires_grad_(True)
    reward_model = None
    if args.reward_source == "model":
        reward_model = load_reward_model(args.reward_model_path, device=device).requires_grad_(False)
    source = make_source(args.reward_source, ft, reward_model, args.sim_sigma, args.sim_pairs, generator,
                         args.sim_horizon, continuation=base)
    ema = EMA(ft.model, power=0.0, max_decay=args.ema_decay) if args.ema_decay > 0 else None
    ddp_model = distributed.wrap(dist_info, ft.model)  # the loss goes through it; rollouts use ft.model
    optimizer = torch.optim.AdamW(ft.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / max(1, args.warmup_steps)))

    def step(loss, it):
        """One optimiser step on `loss`; a non-finite loss on any rank stops the run, nothing saved."""
        finite = distributed.mean_over_ranks(dist_info, {"finite": float(torch.isfinite(loss))})["finite"] == 1.0
        if not finite:
            raise UserError(f"fine-tuning loss became {loss.item()} at iteration {it}; the last good checkpoint "
                            f"is {describe_last_good(latest_path, 'iteration')}. Lower --lr (now {args.lr}) and --resume, or "
                            f"start afresh with a lower --reward_scale"
                            + (" or --clip_adjoint" if args.method == "adjoint" else ""))
        optimizer_step(loss, ft.model, optimizer, scheduler, args.grad_clip)
        if ema is not None:
            ema.update(ft.model, scheduler.last_epoch)

    ctx = SimpleNamespace(args=args, base=base, ft=ft, ddp_model=ddp_model, source=source, generator=generator,
                          device=device, control=args.control, step=step, ema=ema)
    method = METHODS[args.method](ctx)

    start_iter, resumed = 0, None
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
        method.load_state_dict(state.get("method_state", {}))
        if "base" in state:  # --reanchor_every: the base of the round it stopped in
            base.model.load_state_dict(state["base"])
        start_iter = state["iteration"]
        resumed = resumed_changes(ckpt, args, start_iter, ("lr",))
        resume_lr(optimizer, scheduler, args.lr)
        print(f"resuming {latest_path} at iteration {start_iter}/{args.num_ft_iters}"
              + "".join(f"; --{k} {new} (was {old})" for k, (old, new) in resumed["resumed"]["changed"].items()))

    log = RunLog(run_dir, args, args.wandb, args.wandb_project, job="finetune", resume=args.resume,
                 enabled=is_main, extra=resumed, resume_at=start_iter)
    reference = {}
    if args.action_reward_path and reward_model is not None:
        reward_path = load_checkpoint(args.reward_model_path, "reward")["provenance"].get("action_reward_path")
        ref_pred, ref_true = reference_level(args.action_reward_path, reward_model, device)
        reference = {"ref_predicted_reward": ref_pred, "ref_true_target": ref_true}
        if reward_path and os.path.abspath(reward_path) != os.path.abspath(args.action_reward_path):
            print(f"note: the reward model was fit on {reward_path}, not {args.action_reward_path}")
        log.log(reference, start_iter)
    meter = tilt_meter(base, make_source(args.reward_source, base, reward_model, generator=generator,
                                         horizon=args.sim_horizon), args) \
        if is_main and args.tilt_every > 0 else None
    provenance = {
        "script": "reward_finetuning.py", "method": args.method, "reward_source": args.reward_source,
        "base_model": args.noise_pred_model_path, "base_provenance": base_ckpt.get("provenance", {}),
        "reward_model": args.reward_model_path if reward_model is not None else None,
        "reward_target": reward_model.config.target if reward_model is not None else "reward_after (simulator)",
        "reward_scale": args.reward_scale, "control": args.control,
        "num_ft_iters": args.num_ft_iters, "num_eps": args.num_eps, "world_size": world,
        "grad_steps_per_iter": args.grad_steps_per_iter, "reanchor_every": args.reanchor_every,
        "git_commit": log.info["git_commit"],
    }

    def train_state(iteration):
        generators = distributed.gather_objects(dist_info, generator.get_state())  # collective: every rank
        return {"iteration": iteration, "args": plain_values(vars(args)), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generators[0], "generators": generators,
                "world_size": world, "method_state": method.state_dict(),
                **({"base": base.model.state_dict()} if args.reanchor_every else {})}

    if is_main:
        print(f"fine-tuning ({args.method}{', control' if args.control else ''}) with lambda = {args.reward_scale} "
              f"on the {args.reward_source} reward"
              + (f" '{reward_model.config.target}'" if reward_model is not None else "")
              + f", {ft.sampler_config.num_inference_steps} DDPM steps, {args.num_eps * world} episodes per "
              f"iteration, {args.num_ft_iters} iterations on {device}" + (f" x {world} processes" if world > 1 else ""))
    metrics, started = {}, time.time()
    bar = tqdm(range(start_iter, args.num_ft_iters), initial=start_iter, total=args.num_ft_iters, desc="finetune",
               disable=args.no_progress or not is_main)
    for it in bar:
        if args.reanchor_every and it and it % args.reanchor_every == 0:
            method = reanchor(ctx, optimizer, scheduler, args.seed + rank)
        first = args.start_seed + (it * world + rank) * args.num_eps
        batch, env_metrics = method.collect(list(range(first, first + args.num_eps)))
        if batch is None:  # every episode succeeded from its start state: nothing to learn from
            log.log({"num_trajectories": 0, **env_metrics}, it + 1)
            continue
        metrics = distributed.mean_over_ranks(dist_info, {**method.update(batch, it), **env_metrics})
        for key in ("num_trajectories", "num_states"):
            if key in metrics:
                metrics[key] = int(round(metrics[key] * world))
        metrics.update(lr=scheduler.get_last_lr()[0], elapsed_s=round(time.time() - started, 1))
        done = it + 1
        if is_main and args.eval_every and done % args.eval_every == 0:
            metrics.update(evaluate(ft, ema, args))
        if meter is not None and (done % args.tilt_every == 0 or done == args.num_ft_iters):
            with acting_weights(ft, ema) as policy:
                metrics.update(meter.measure(policy))
            if done == args.num_ft_iters and args.extrapolate != 1.0:  # the saved policy's reading, and this one's
                metrics = {**metrics, **{f"{k}_unextrapolated": v for k, v in metrics.items() if k.startswith("tilt_")}}
                with acting_weights(ft, ema, base, args.extrapolate) as policy:
                    metrics.update(meter.measure(policy))
        log.log(metrics, done)
        bar.set_postfix(loss=f"{metrics['loss']:.3g}", score=f"{metrics['env_score']:.2f}")
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
    with acting_weights(ft, ema, base, args.extrapolate) as policy:
        acting = policy.model
    save_checkpoint(policy_checkpoint(ft, acting, final_state, {**provenance, "extrapolate": args.extrapolate},
                                      metrics), args.output)
    log.close()
    print(f"saved {args.output}")
    distributed.barrier(dist_info)
    return {"output": args.output, "run_dir": run_dir, "rank": 0, "world_size": world,
            "params_sha256": distributed.param_digest(ft.model), "wall_s": round(time.time() - started, 1),
            **reference, **metrics}


@torch.no_grad()
def evaluate(ft, ema, args):
    """Score the current policy (the EMA copy if kept) on validation seeds 400000+."""
    seeds = list(range(VALIDATION_SEED_START, VALIDATION_SEED_START + args.eval_episodes))
    with acting_weights(ft, ema) as policy:
        res = rollout(policy, seeds, max_steps=args.max_steps, generator=torch.Generator().manual_seed(args.seed))
    return {"val_score": float(res["score"].mean()), "val_success": float(np.mean(res["success"]))}


if __name__ == "__main__":
    run_cli(main, parse_args)
