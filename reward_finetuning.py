"""Stage 4: fine-tune the diffusion policy towards a reward, by one of five methods.

Usage:
    python reward_finetuning.py --num_ft_iters 200 --num_eps 3 --warmup_steps 10 --lr 1e-4 --clip_adjoint --noise_pred_model_path ./data/checkpoints/policy_pretrained.ckpt --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt --action_reward_path ./data/reward/action_reward_data_300eps.npy
    python reward_finetuning.py --method residual_step --actor_pessimism 1 --act_within 30   # the best measured (the pipeline's)
    python reward_finetuning.py --method residual_step --actor_pessimism 1 --act_within 30 --control   # its control
    python reward_finetuning.py --method residual --reward_source simulator      # the chunk residual, the simulator's reward
    python reward_finetuning.py --method weighted
    python reward_finetuning.py --method qam                         # Adjoint Matching toward a critic
    python reward_finetuning.py ... --resume
    torchrun --standalone --nproc_per_node=4 reward_finetuning.py --method weighted ...   # 4 GPUs: 4 x --num_eps per iteration

Every method tilts the policy towards the reward r after a chunk's executed steps, from the
reward model (--reward_source model) or from the simulator itself (--reward_source simulator).
Each iteration rolls the current policy out on --num_eps fresh start states from the fine-tuning
seed range (300000+) and updates it on what it saw (diffusion_policy/finetune/):

- --method adjoint (the default: the method README's command; adjoint.py): the sampler chains of
  the calls, the lean adjoint from a_K = -lambda grad r through the frozen base model, and the
  Adjoint Matching loss towards p_base(chunk | obs) exp(lambda r). It steers by the *gradient* of r.
- --method qam (qam.py): Adjoint Matching toward a chunk critic (QAM): the same lean adjoint and loss,
  the terminal adjoint a_K = -lambda grad Q of a critic ensemble learnt beside the denoiser by n-step TD
  on the shaped reward (critic.py, the residual's); a critic step at every optimiser step, an Adjoint
  Matching step at every --am_every-th.
- --method weighted (weighted.py): --num_candidates fresh chunks at the visited states, weighted
  by softmax(lambda r), fitted as a correction to the frozen base model. It uses the *values* of r.
- --method residual (residual.py): the base stays frozen; a bounded residual (at most --alpha per
  executed action) is trained off-policy against an ensemble of chunk critics learnt by n-step TD
  on the shaped reward.
- --method residual_step (residual_step.py): the same residual per control step, from the window of
  the step it is taken in (ResFiT's closed loop inside the base's chunk), against a per-step critic.
  With --actor_pessimism 1 --act_within 30 (the residual acting only near the goal) it is the
  setting that measured best (README, Results).

Settings whose sensible value depends on the method take that method's default, from its config
dataclass; --help lists the common flags, then each method's own under its heading, and a flag of
another method is refused. --control is each method's run with the information taken out (the
weighted method's weights given to random candidates, Adjoint Matching's reward gradients to
random chunks, the residual critic's (return, bootstrap factor) pairs permuted): same data, same
steps; a setting counts only if it beats its control. --tilt_every N logs the tilt meter
(diffusion_policy/finetune/tilt.py): how much of the predicted one-chunk tilt the policy has
realised on fixed states from seeds 500000+. --action_reward_path (optional) is the reward data
the reward model was fitted on: its mean prediction there is logged as a reference level.

Under torchrun (adjoint, weighted) each rank rolls out its own --num_eps episodes from disjoint
seeds with its own sampling noise (seed + rank) and takes its share of one DistributedDataParallel
update; rank 0 alone logs, measures the tilt and writes checkpoints. The residual runs in one process.

Writes the fine-tuned policy (--output), a policy checkpoint like any other whose provenance
holds the resolved config; the run directory holds config.json, metrics.jsonl and the resumable
latest.ckpt (written every iteration).
"""

import argparse
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from diffusion_policy.checkpoint import describe_last_good, load_checkpoint, load_resume_checkpoint, policy_from_checkpoint, save_checkpoint
from diffusion_policy.common import distributed
from diffusion_policy.common.cli import Parser, add_force_flag, add_run_flags, count, preflight, run_cli, show_progress
from diffusion_policy.common.outputs import default_run_dir, run_dir_claimed
from diffusion_policy.common.runlog import RunLog
from diffusion_policy.common.runtime import UserError, optimizer_step, resume_lr, seed_everything
from diffusion_policy.common.seeds import FINETUNE_SEED_START, add_seed_range_flag, check_seeds
from diffusion_policy.ema import EMA, swapped_in
from diffusion_policy.finetune import METHODS
from diffusion_policy.finetune.config import LOOP_FLAGS, LoopConfig
from diffusion_policy.finetune.tilt import build_tilt_meter
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_model import check_fits_policy, load_reward_model
from diffusion_policy.sources import SOURCES, make_source

GRAD_CLIP = 1.0  # gradient-norm clip of every optimiser step (the method says of which module)
TILT_STATES, TILT_SAMPLES = 64, 16  # the tilt meter's states and chunks per state


@dataclass
class FinetuneConfig:
    """Everything that shapes a run's result: --resume refuses any change to it but params.lr."""

    method: str
    reward_source: str
    noise_pred_model_path: str
    reward_model_path: str
    start_seed: int
    max_steps: int
    warmup_steps: int
    control: bool
    seed: int
    params: LoopConfig  # the method's own config dataclass, its defaults filled in

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if not isinstance(self.params, METHODS[self.method].config_class):
            raise ValueError(f"--method {self.method} needs a {METHODS[self.method].config_class.__name__}")
        if self.reward_source not in SOURCES:
            raise ValueError(f"unknown reward source {self.reward_source!r}; choose from {SOURCES}")


def method_flags():
    """{flag: (type, help, the methods that take it)}: the loop's flags, then each method's own."""
    flags = {k: (kind, text, sorted(METHODS)) for k, (kind, text) in LOOP_FLAGS.items()}
    for name, method in METHODS.items():
        for k, (kind, text) in method.flags.items():
            flags.setdefault(k, (kind, text, []))[2].append(name)
    return flags


def defaults(key, methods):
    """'adjoint X; weighted Y': a method setting's defaults, for --help (a tuple as its flag takes it)."""
    def shown(v):
        return " ".join(map(str, v)) if isinstance(v, tuple) else v
    return "; ".join(f"{m} {shown(asdict(METHODS[m].config_class())[key])}" for m in methods)


def add_method_flags(p):
    """The method settings under their headings: the loop's (every method), then those that two or
    more methods share, then each method's own; a flag is listed once, under the first that fits."""
    flags = method_flags()
    groups = {}
    for key, (kind, text, methods) in flags.items():
        title = ("every method's loop (default per method)" if len(methods) == len(METHODS) else
                 f"--method {' and '.join(methods)}")
        groups.setdefault(title, []).append((key, kind, text, methods))
    for title, items in sorted(groups.items(), key=lambda kv: -len(kv[1][0][3])):
        methods = items[0][3]
        described = (METHODS[methods[0]].about if len(methods) == 1 else
                     None if len(methods) == len(METHODS) else "; ".join(f"{m}: {METHODS[m].about}" for m in methods))
        g = p.add_argument_group(title, described)
        for key, kind, text, _ in items:
            if kind is None:
                g.add_argument(f"--{key}", action="store_true", default=argparse.SUPPRESS, help=f"{text} (default: off)")
            elif isinstance(asdict(METHODS[methods[0]].config_class())[key], tuple):
                g.add_argument(f"--{key}", type=kind, nargs="+", default=argparse.SUPPRESS,
                               help=f"{text} (default: {defaults(key, methods)})")
            else:
                g.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS,
                               help=f"{text} (default: {defaults(key, methods)})")
    return flags


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--method", default="adjoint", choices=sorted(METHODS),
                   help="; ".join(f"{name}: {m.about}" for name, m in METHODS.items()))
    p.add_argument("--reward_source", default="model", choices=SOURCES,
                   help="model: the learned reward model; simulator: the env's own reward (adjoint, weighted: "
                        "each chunk run on a copy of the env)")
    p.add_argument("--noise_pred_model_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="the pre-trained policy: the base model and the fine-tuning start")
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt",
                   help="the reward model from train_reward.py (--reward_source model)")
    p.add_argument("--action_reward_path", default=None,
                   help="the reward data the reward model was fit on: a logged reference level (default: none)")
    p.add_argument("--output", default="./data/checkpoints/policy_finetuned_rd0.ckpt", help="the fine-tuned policy")
    p.add_argument("--run_dir", default=None,
                   help="config.json, metrics.jsonl, latest.ckpt (default: beside --output, <output without .ckpt>_run)")
    p.add_argument("--start_seed", type=count(0), default=FINETUNE_SEED_START,
                   help="first start-state seed; iteration i uses start_seed + i * num_eps onwards")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps per rollout episode")
    p.add_argument("--warmup_steps", type=count(0), default=10, help="optimiser steps of linear learning-rate warm-up")
    p.add_argument("--control", action="store_true",
                   help="the control run: the weights given to random candidates (weighted), each chunk's reward "
                        "gradient to another chunk (adjoint), the critic's (return, bootstrap factor) pairs "
                        "permuted in each batch (residual)")
    p.add_argument("--tilt_every", type=count(0), default=0,
                   help="iterations between tilt-meter readings, also taken at the end; 0: off")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/latest.ckpt")
    add_force_flag(p)
    add_seed_range_flag(p)
    add_run_flags(p, "seed of the sampling noise, the weights' draws and the loss steps")
    flags = add_method_flags(p)
    args = p.parse_args(argv)
    config_cls = METHODS[args.method].config_class
    given = {k: v for k, v in vars(args).items() if k in flags}
    foreign = sorted(k for k in given if k not in {f.name for f in fields(config_cls)})
    if foreign:
        p.error(f"--{foreign[0]} does not apply to --method {args.method} (it is a setting of "
                f"--method {' and '.join(flags[foreign[0]][2])})")
    try:
        params = config_cls(**given)
    except ValueError as e:
        p.error(str(e))
    vars(args).update(asdict(params))  # the resolved settings, as the run records them (config.json)
    fixed = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if f.name != "params"}
    args.config = FinetuneConfig(**fixed, params=params)  # the run's settings, built once
    return args


def reference_level(action_reward_path, reward_model, device):
    """Mean predicted reward on the reward data's own chunks, and its mean true target."""
    columns, meta = load_reward_data(action_reward_path)
    with torch.no_grad():
        pred = reward_model.reward(torch.as_tensor(columns["obs"], dtype=torch.float32, device=device),
                                   torch.as_tensor(columns["action_pred"], dtype=torch.float32, device=device))
    return float(pred.mean()), float(columns[reward_model.config.target].mean())


def main(args):
    run_dir = args.run_dir = args.run_dir or default_run_dir(args.output)
    preflight(args.device, files={"--output": args.output}, dirs={"--run_dir": run_dir},
              inputs={"--noise_pred_model_path": args.noise_pred_model_path, "--reward_model_path": args.reward_model_path,
                      "--action_reward_path": args.action_reward_path})
    world, params = int(os.environ.get("WORLD_SIZE", 1)), args.config.params
    check_seeds(args.start_seed, params.num_ft_iters * params.num_eps * world, "fine-tuning", args.any_seed_range)
    policy_ckpt = load_checkpoint(args.noise_pred_model_path, "policy")
    if policy_ckpt["config"]["sampler"].get("sampler", "ddpm") != "ddpm":
        raise UserError(f"{args.noise_pred_model_path} samples with {policy_ckpt['config']['sampler']['sampler']}; every "
                        "method fine-tunes the DDPM sampler's policy: start from a DDPM policy checkpoint")
    METHODS[args.method].check_start(policy_ckpt, args.noise_pred_model_path, params, world)
    reward_ckpt = None
    if args.reward_source == "model":
        reward_ckpt = load_checkpoint(args.reward_model_path, "reward")
        check_fits_policy(reward_ckpt, policy_ckpt, args.reward_model_path, args.noise_pred_model_path)
    METHODS[args.method].check_source(params, args.reward_source, reward_ckpt)
    if args.action_reward_path:
        load_reward_data(args.action_reward_path)
    with run_dir_claimed(run_dir, args.resume, args.force, "fine-tuning"):
        return distributed.run(finetune, args)


def resume_state(path, config, ft, ema, method, optimizer, scheduler, generator, world, rank):
    """Load the resumable state of an interrupted run into the run's objects; returns (iteration, record)."""
    ckpt = load_resume_checkpoint(path, asdict(config), may_change=("lr",), map_location=ft.device)
    state = ckpt["train_state"]
    if state["world_size"] != world:
        raise UserError(f"{path} was written by {state['world_size']} processes, this run has "
                        f"{world}: resume with the same number of processes")
    saved = policy_from_checkpoint(ckpt, use_ema=False, device=ft.device)
    method.check_resume(ckpt, path, config.noise_pred_model_path)
    ft.load_state_dict(saved.state_dict())
    if ema is not None:
        ema.model.load_state_dict(ckpt["ema_model_state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    method.load_state_dict(state.get("method") or {})
    generator.set_state(state["generators"][rank])
    lr = config.params.lr
    saved_lr = resume_lr(optimizer, scheduler, lr)
    print(f"resuming {path} at iteration {state['iteration']}/{config.params.num_ft_iters}"
          + (f"; --lr {lr} (was {saved_lr})" if saved_lr != lr else ""))
    return state["iteration"], {"resumed": {"at": state["iteration"],
                                            "changed": {"lr": [saved_lr, lr]} if saved_lr != lr else {}}}


def step_means(steps):
    """Each metric's mean over the optimiser steps that logged it."""
    keys = dict.fromkeys(k for s in steps for k in s)
    return {k: float(np.mean([s[k] for s in steps if k in s])) for k in keys}


@dataclass
class Run:
    """The objects of one fine-tuning run: the frozen base, the policy being trained, where rewards
    come from, the method, its optimiser and learning-rate schedule, the EMA of the weights (or None)."""

    base_ckpt: dict
    base: torch.nn.Module
    ft: torch.nn.Module
    reward_model: torch.nn.Module | None
    method: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: EMA | None


def build_run(config, dist_info, generator):
    params, spec, device = config.params, METHODS[config.method], dist_info.device
    base_ckpt = load_checkpoint(config.noise_pred_model_path, "policy")
    base = policy_from_checkpoint(base_ckpt, device=device).requires_grad_(False)
    ft = spec.make_policy(base, params)
    reward_model = None
    if config.reward_source == "model":
        reward_model = load_reward_model(config.reward_model_path, device=device).requires_grad_(False)
    source = make_source(config.reward_source, ft, reward_model, generator)
    ema = spec.make_ema(ft, params)
    method = spec(params, base, ft, spec.wrap(dist_info, ft.model), source, generator, config.control)
    optimizer = torch.optim.AdamW(method.param_groups(), lr=params.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(1, config.warmup_steps)))
    return Run(base_ckpt, base, ft, reward_model, method, optimizer, scheduler, ema)


def check_finite(loss, it, config, dist_info, latest_path):
    """A non-finite loss on any rank stops the run, nothing saved; the message names the last good state."""
    if distributed.mean_over_ranks(dist_info, {"finite": float(torch.isfinite(loss))})["finite"] != 1.0:
        raise UserError(f"fine-tuning loss became {loss.item()} at iteration {it}; the last good checkpoint is "
                        f"{describe_last_good(latest_path, 'iteration')}. Lower --lr (now {config.params.lr}) and "
                        f"--resume, or start afresh{METHODS[config.method].nan_advice}")


def banner(config, ft, world, device):
    params = config.params
    return (f"fine-tuning ({config.method}{', control' if config.control else ''}){METHODS[config.method].describe(params)} on the {config.reward_source} "
            f"reward, {ft.sampler_config.num_inference_steps} DDPM steps, {params.num_eps * world} episodes per "
            f"iteration, {params.num_ft_iters} iterations on {device}")


def finetune(args, dist_info):
    device, is_main, world, rank = dist_info.device, dist_info.is_main, dist_info.world_size, dist_info.rank
    config, run_dir = args.config, args.run_dir  # built by parse_args; the run directory resolved by main
    params = config.params
    seed_everything(config.seed + rank)
    generator = torch.Generator().manual_seed(config.seed + rank)
    latest_path = os.path.join(run_dir, "latest.ckpt")

    # ---- models: frozen base, the policy to train, reward source, method ---------------------
    r = build_run(config, dist_info, generator)
    ft, method, optimizer, scheduler, ema = r.ft, r.method, r.optimizer, r.scheduler, r.ema
    start_iter, resumed = 0, None
    if args.resume:
        start_iter, resumed = resume_state(latest_path, config, ft, ema, method, optimizer, scheduler, generator,
                                           world, rank)
    log = RunLog(run_dir, args, args.wandb, job="finetune", resume=args.resume, enabled=is_main,
                 extra={"config": asdict(config), **(resumed or {})}, resume_at=start_iter)
    reference = {}
    if args.action_reward_path and r.reward_model is not None:
        ref_pred, ref_true = reference_level(args.action_reward_path, r.reward_model, device)
        reference = {"ref_predicted_reward": ref_pred, "ref_true_target": ref_true}
        log.log(reference, start_iter)
    meter = None
    if is_main and args.tilt_every > 0:
        meter = build_tilt_meter(r.base, method.tilt_source(make_source(config.reward_source, r.base, r.reward_model,
                                                                        generator)),
                                 METHODS[config.method].tilt_scale(params), TILT_STATES, TILT_SAMPLES, config.max_steps)
    provenance = {"script": "reward_finetuning.py", "config": asdict(config), "method": config.method,
                  "reward_source": config.reward_source, "control": config.control, "world_size": world,
                  "base_provenance": r.base_ckpt.get("provenance", {}), "git_commit": log.info["git_commit"],
                  "reward_target": r.reward_model.config.target if r.reward_model else "reward_after (simulator)"}
    if is_main:
        print(banner(config, ft, world, device))
    metrics, started = {}, time.time()
    bar = tqdm(range(start_iter, params.num_ft_iters), initial=start_iter, total=params.num_ft_iters, desc="finetune",
               disable=not (show_progress() and is_main))
    for it in bar:
        # ---- collect: roll the current policy out on fresh starts ------------------------------
        first = config.start_seed + (it * world + rank) * params.num_eps
        batch, env_metrics = method.collect(list(range(first, first + params.num_eps)), config.max_steps)
        if batch is None:  # nothing to learn from yet (every episode succeeded, or the buffer is short of a batch)
            log.log({"num_trajectories": 0, **env_metrics}, it + 1)
            continue
        # ---- prepare: the method's per-iteration work (weights, or the lean adjoint) -----------
        batch = method.prepare(batch)
        # ---- update: optimiser steps on what was collected, the EMA after each -----------------
        ft.train()
        steps = []
        for i in range(params.grad_steps_per_iter):
            loss, step_metrics = method.loss(batch, i)
            check_finite(loss, it, config, dist_info, latest_path)
            optimizer_step(loss, method.clipped, optimizer, scheduler, GRAD_CLIP)
            method.after_step()
            if ema is not None:
                ema.update(ft.model, scheduler.last_epoch)
            steps.append({"loss": loss.item(), **step_metrics})
        # ---- log: losses over the steps, the iteration's summary, the tilt ---------------------
        metrics = distributed.mean_over_ranks(dist_info, {**step_means(steps), **method.summary(batch), **env_metrics})
        for key in ("num_trajectories", "num_states"):
            if key in metrics:
                metrics[key] = int(round(metrics[key] * world))
        metrics.update(lr=scheduler.get_last_lr()[0], elapsed_s=round(time.time() - started, 1))
        done = it + 1
        if meter is not None and (done % args.tilt_every == 0 or done == params.num_ft_iters):
            with swapped_in(ft, ema.model if ema is not None else None) as policy:
                metrics.update(meter.measure(policy))
        log.log(metrics, done)
        bar.set_postfix(loss=f"{metrics['loss']:.3g}", score=f"{metrics['env_score']:.2f}")
        # ---- save: the resumable state, every iteration ----------------------------------------
        generators = distributed.gather_objects(dist_info, generator.get_state())  # collective: every rank
        if is_main:
            state = {"iteration": done, "config": asdict(config), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "generators": generators, "world_size": world,
                     "method": method.state_dict()}
            save_checkpoint(method.checkpoint(ft, ema, state, provenance, metrics), latest_path)
    bar.close()
    return finish(args, dist_info, r, provenance, metrics, log, {**reference, "wall_s": round(time.time() - started, 1)})


def finish(args, dist_info, r, provenance, metrics, log, extra):
    """Rank 0 writes the fine-tuned policy; every rank returns its summary."""
    out = {"output": args.output, "run_dir": args.run_dir, "rank": dist_info.rank, "world_size": dist_info.world_size,
           "params_sha256": distributed.param_digest(r.ft.model)}
    if not dist_info.is_main:
        distributed.barrier(dist_info)
        return out
    final_state = {"iteration": args.config.params.num_ft_iters, "config": asdict(args.config), "run_dir": args.run_dir}
    save_checkpoint(r.method.checkpoint(r.ft, r.ema, final_state, provenance, metrics), args.output)
    log.close()
    print(f"saved {args.output}")
    distributed.barrier(dist_info)
    return {**out, "config": asdict(args.config), **extra, **metrics}


if __name__ == "__main__":
    run_cli(main, parse_args)
