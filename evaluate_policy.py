"""Stage 5: score a policy on held-out start states.

Usage:
    python evaluate_policy.py --num_eps 50 --model_path ./data/checkpoints/policy_finetuned_rd0.ckpt --save_vids
    python evaluate_policy.py --model_path ./data/checkpoints/policy_pretrained.ckpt --num_eps 100
    python evaluate_policy.py --model_path X.ckpt --num_inference_steps 100 --output data/eval/x100/eval.json
    python evaluate_policy.py --model_path X.ckpt --sampler ddim --noise_scale 0.5       # DDIM at temperature 0.5
    python evaluate_policy.py --model_path X.ckpt --best_of 8 --reward_model_path R.ckpt  # run-time best of 8
    python evaluate_policy.py --model_path X.ckpt --best_of 8 --reward_source simulator   # ... by the true reward
    python evaluate_policy.py --model_path RES.ckpt --best_of 8 --reward_source critic    # ... by a residual's critic
    python evaluate_policy.py --model_path RES.ckpt --act_within 0                 # a gated residual, acting everywhere
    python evaluate_policy.py --model_path RES.ckpt --act_value 0.45               # ... gated by its learned frame value
    torchrun --standalone --nproc_per_node=8 evaluate_policy.py --model_path X.ckpt --num_eps 1000

Seeds start at --start_seed (default 100000, the held-out range). All episodes of a batch
step together, one model call per control step. Per episode: score = max over the episode
of clip(coverage / 0.95, 0, 1) (the paper's metric), success = coverage > 0.95 at some step,
max coverage, steps to success. In aggregate: their means with 95 % intervals (normal
approximation for means, Wilson for the success rate). Prints a table, writes eval.json with
per-seed results, and with --save_vids one mp4 per episode under --media_dir.

--sampler ddim samples deterministically from the initial noise (DDIM, eta 0); --noise_scale s
draws that noise from N(0, s^2 I). --best_of N samples N chunks at every call and executes the
one the reward model (or, --reward_source simulator, the true reward after the chunk on a copy of
the env; --reward_source critic, the Q of the chunk critic a --method residual run trained, each
candidate with its residual) rates best (diffusion_policy/selection.py); the wall time per call is
reported.

Under torchrun the seeds are split into contiguous shares, one per process (each with
sampling seed --seed + rank); rank 0 gathers the episodes and writes the results.
"""

import json
import os
import time
import zlib

import imageio.v2 as imageio
import numpy as np
import torch

from diffusion_policy.common.cli import Parser, add_run_flags, count, fraction, nonnegative, preflight, run_cli, show_progress
from diffusion_policy.common import distributed
from diffusion_policy.common.atomic import atomic_open, atomic_path
from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.residual_policy import critic_from_checkpoint
from diffusion_policy.sources import CriticValue, make_source
from diffusion_policy.common.outputs import claim_evaluation_dir, default_run_dir, hold_lock
from diffusion_policy.reward_model import check_fits_policy, load_reward_model
from diffusion_policy.rollout import rollout_batches
from diffusion_policy.common.runlog import RunLog
from diffusion_policy.common.runtime import UserError, seed_everything
from diffusion_policy.common.seeds import EVAL_SEED_START, add_seed_range_flag, check_seeds
from diffusion_policy.selection import BestOf
from diffusion_policy.common.stats import mean_ci, wilson_ci


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="a policy checkpoint (pre-trained or fine-tuned)")
    p.add_argument("--num_eps", type=count(1), default=100, help="number of episodes (consecutive seeds)")
    p.add_argument("--start_seed", type=count(0), default=EVAL_SEED_START, help="first start-state seed (held out: 100000+)")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps per episode")
    p.add_argument("--num_inference_steps", type=count(1), default=None,
                   help="DDPM sampling steps (default: the checkpoint's)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                   help="ddpm: ancestral; ddim: deterministic given the initial noise (default: the checkpoint's)")
    p.add_argument("--noise_scale", type=nonnegative, default=None,
                   help="the initial noise ~ N(0, s^2 I), a sampling temperature (default: the checkpoint's, 1)")
    p.add_argument("--act_within", type=nonnegative, default=None,
                   help="a residual policy's gate: its residual acts only while the block's keypoints are this many "
                        "pixels from the goal's on average, the base alone elsewhere (a rule that knows the goal "
                        "pose); 0: everywhere (default: the checkpoint's gate)")
    p.add_argument("--act_value", type=fraction, default=None,
                   help="a residual policy's learned gate: its residual acts only where the reward model's value of "
                        "the current frame (which the checkpoint carries) is at least this, in (0, 1] (default: the "
                        "checkpoint's gate)")
    p.add_argument("--best_of", type=count(1), default=1,
                   help="chunks sampled per call, the best by --reward_source executed; 1: plain sampling")
    p.add_argument("--reward_source", choices=("model", "simulator", "critic"), default="model",
                   help="what --best_of chooses by: the reward model, the true reward after the chunk, or the "
                        "chunk critic a --method residual run trained (its Q: acting with the chunk, then the policy)")
    p.add_argument("--critic_path", default=None,
                   help="the critic of --reward_source critic: a policy written by --method residual, or its run's "
                        "<run_dir>/latest.ckpt (default: --model_path)")
    p.add_argument("--reward_model_path", default=None,
                   help="the reward model of --best_of N > 1 with --reward_source model (default: none)")
    p.add_argument("--batch_size", type=count(1), default=100, help="episodes rolled out together")
    p.add_argument("--save_vids", action="store_true", help="write one mp4 per episode under --media_dir")
    p.add_argument("--media_dir", default="./data/media", help="where videos go")
    p.add_argument("--render_size", type=count(16), default=256, help="video frame size in pixels (even)")
    p.add_argument("--output", default=None,
                   help="eval.json path (default: ./data/eval/<checkpoint path, / as __>/eval.json)")
    p.add_argument("--run_dir", default=None,
                   help="config.json and metrics.jsonl (default: beside --output, <output without .json>_run/)")
    add_seed_range_flag(p)
    add_run_flags(p, "seed of the sampling noise")
    args = p.parse_args(argv)
    if args.render_size % 2:
        p.error(f"argument --render_size: must be even (the H.264 encoder takes even frame sizes), got {args.render_size}")
    if args.best_of > 1 and args.reward_source == "model" and not args.reward_model_path:
        p.error("--best_of N > 1 chooses by the reward model: give --reward_model_path (or --reward_source simulator)")
    return args


class VideoStream:
    """One mp4 per episode from `rollout`'s on_frames: each frame is kept zlib-compressed as it comes
    (Push-T's flat drawings shrink some 30-fold), and when a batch ends its episodes are encoded one
    at a time, each file appearing under its name only when complete. Memory is bounded by one
    batch's compressed frames, never every episode's raw frames."""

    def __init__(self, media_dir, name):
        os.makedirs(media_dir, exist_ok=True)
        self.media_dir, self.name, self.frames, self.paths = media_dir, name, {}, []

    def add(self, seeds, frames):
        if frames is not None:
            for seed, frame in zip(seeds, frames):
                self.frames.setdefault(seed, []).append((zlib.compress(frame.tobytes(), 1), frame.shape))
            return
        for seed in seeds:  # the batch's episodes are over: encode them, one writer at a time
            path = os.path.join(self.media_dir, f"vis_{self.name}_seed{seed}.mp4")
            with atomic_path(path) as tmp:
                with imageio.get_writer(tmp, fps=10, macro_block_size=1) as writer:
                    for data, shape in self.frames.pop(seed):
                        writer.append_data(np.frombuffer(zlib.decompress(data), np.uint8).reshape(shape))
            self.paths.append(path)


def summarize(result):
    """Aggregate metrics with 95 % intervals from a rollout result."""
    n = len(result["score"])
    steps = result["steps_to_success"][result["success"]]
    score, success = mean_ci(result["score"]), wilson_ci(int(result["success"].sum()), n)
    cov = mean_ci(result["max_coverage"])
    return {
        "num_eps": n,
        "score": score[0], "score_ci95": [score[1], score[2]],
        "success_rate": success[0], "success_rate_ci95": [success[1], success[2]],
        "mean_max_coverage": cov[0], "mean_max_coverage_ci95": [cov[1], cov[2]],
        "mean_steps_to_success": float(steps.mean()) if len(steps) else None,
    }


def format_table(summary, title):
    rows = [
        ("score (max reward)", summary["score"], summary["score_ci95"]),
        ("success rate", summary["success_rate"], summary["success_rate_ci95"]),
        ("mean max coverage", summary["mean_max_coverage"], summary["mean_max_coverage_ci95"]),
    ]
    lines = [title, f"{'metric':<22}{'mean':>8}   95 % interval"]
    lines += [f"{name:<22}{m:>8.3f}   [{lo:.3f}, {hi:.3f}]" for name, m, (lo, hi) in rows]
    steps = summary["mean_steps_to_success"]
    lines.append(f"{'steps to success':<22}{(f'{steps:.1f}' if steps is not None else 'n/a'):>8}   (successful episodes)")
    return "\n".join(lines)


def main(args):
    # named after the whole checkpoint path: two checkpoints of one file name never share an eval.json
    args.output = args.output or os.path.join("data", "eval", os.path.splitext(os.path.normpath(args.model_path))[0]
                                              .lstrip(os.sep).replace(os.sep, "__"), "eval.json")
    # config.json and metrics.jsonl of this evaluation, its own: evaluations side by side never share one
    args.run_dir = args.run_dir or default_run_dir(args.output)
    preflight(args.device, files={"--output": args.output},
              inputs={"--model_path": args.model_path, "--reward_model_path": args.reward_model_path},
              dirs={"--run_dir": args.run_dir, "--media_dir": args.media_dir if args.save_vids else None})
    check_seeds(args.start_seed, args.num_eps, "evaluation", args.any_seed_range)
    policy_ckpt = load_checkpoint(args.model_path, "policy")
    policy = policy_from_checkpoint(policy_ckpt, num_inference_steps=args.num_inference_steps, sampler=args.sampler,
                                    noise_scale=args.noise_scale, act_within=args.act_within,
                                    act_value=args.act_value)  # refuses settings that do not fit, before any work
    if args.best_of > 1 and args.reward_source == "model":
        check_fits_policy(load_checkpoint(args.reward_model_path, "reward"), policy_ckpt, args.reward_model_path,
                          args.model_path)
    if args.best_of > 1 and args.reward_source == "critic":
        args.critic_path = args.critic_path or args.model_path
        critic_source(args.critic_path, policy)  # refuses a missing or unfitting critic
    if not distributed.is_main_process():
        return distributed.run(evaluate, args)
    with hold_lock(args.run_dir, "evaluation"):  # a second evaluation into the same output refuses at once
        claim_evaluation_dir(args.run_dir)
        return distributed.run(evaluate, args)


def critic_source(path, policy):
    """Selection by the chunk critic that `path` carries (diffusion_policy/sources.py, CriticValue)."""
    try:
        return CriticValue(critic_from_checkpoint(load_checkpoint(path, "policy"), path), policy)
    except ValueError as e:
        raise UserError(f"--critic_path: {e}") from None


def evaluate(args, dist_info):
    device = dist_info.device
    seed_everything(args.seed + dist_info.rank)
    ckpt = load_checkpoint(args.model_path, "policy")
    policy = policy_from_checkpoint(ckpt, device=device, num_inference_steps=args.num_inference_steps,
                                    sampler=args.sampler, noise_scale=args.noise_scale, act_within=args.act_within,
                                    act_value=args.act_value)
    source = None
    if args.best_of > 1:
        if args.reward_source == "critic":
            source = critic_source(args.critic_path, policy)
        else:
            reward_model = load_reward_model(args.reward_model_path, device) if args.reward_source == "model" else None
            source = make_source(args.reward_source, policy, reward_model)
    chooser = BestOf(policy, args.best_of, source)
    name = os.path.splitext(os.path.basename(args.model_path))[0]
    output = args.output
    log = RunLog(args.run_dir, args, args.wandb, job="evaluate",
                 enabled=dist_info.is_main)

    seeds = list(range(args.start_seed, args.start_seed + args.num_eps))
    videos = VideoStream(args.media_dir, name) if args.save_vids else None
    started = time.time()
    res = rollout_batches(policy, dist_info.shard(seeds), args.batch_size, max_steps=args.max_steps,
                          generator=torch.Generator().manual_seed(args.seed + dist_info.rank),
                          render_size=args.render_size if args.save_vids else None,
                          progress=show_progress() and dist_info.is_main, desc=f"evaluate {name}",
                          choose=chooser, on_frames=videos.add if videos is not None else None)
    videos = videos.paths if videos is not None else []
    keys = ("seeds", "score", "success", "max_coverage", "steps_to_success")
    parts = distributed.gather_objects(dist_info, ({k: res[k] for k in keys}, videos))
    if not dist_info.is_main:
        return {"rank": dist_info.rank, "num_eps": len(res["seeds"])}
    res = {k: np.concatenate([part[k] for part, _ in parts]) for k in keys}
    videos = [v for _, vids in parts for v in vids]
    wall = time.time() - started

    summary = summarize(res)
    summary.update({"model_path": args.model_path, "start_seed": args.start_seed, "max_steps": args.max_steps,
                    "num_inference_steps": policy.sampler_config.num_inference_steps,
                    "sampler": policy.sampler_config.sampler, "noise_scale": policy.sampler_config.noise_scale,
                    "best_of": args.best_of, "reward_source": args.reward_source if args.best_of > 1 else None,
                    "reward_model_path": args.reward_model_path if source is not None and source.name == "model" else None,
                    "critic_path": args.critic_path if source is not None and source.name == "critic" else None,
                    "wall_s_per_call": round(chooser.seconds_per_call, 4), "wall_time_s": round(wall, 1)})
    per_episode = [
        {"seed": int(s), "score": float(sc), "success": bool(su), "max_coverage": float(mc),
         "steps_to_success": int(st) if st >= 0 else None}
        for s, sc, su, mc, st in zip(res["seeds"], res["score"], res["success"], res["max_coverage"],
                                     res["steps_to_success"])
    ]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_open(output) as f:
        json.dump({"summary": summary, "episodes": per_episode, "videos": videos}, f, indent=2)
    log.log(summary, step=0)
    log.log_videos(videos[:4])
    log.close()

    print(format_table(summary, f"{name}: {len(seeds)} episodes, seeds {seeds[0]}-{seeds[-1]}, "
                                f"{summary['num_inference_steps']} {summary['sampler'].upper()} steps"
                                + (f", best of {args.best_of} by the {args.reward_source}" if args.best_of > 1 else "")
                                + f", {wall:.0f} s ({summary['wall_s_per_call']:.3f} s per call)"))
    print(f"wrote {output}" + (f" and {len(videos)} videos in {args.media_dir}" if videos else ""))
    return {**summary, "output": output, "videos": videos, "episodes": per_episode}


if __name__ == "__main__":
    run_cli(main, parse_args, resume=None)
