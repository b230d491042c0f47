"""Stage 2: roll a policy out on unseen start states and record (observation, action chunk, reward).

Usage:
    python collect_rewards.py --num_eps 300 --model_path ./data/checkpoints/policy_pretrained.ckpt
    python collect_rewards.py --num_eps 300 --model_path X.ckpt --gamma 0.9 --output data/reward/mine.npy

Seeds come from the reward-collection range (200000+, disjoint from evaluation and
fine-tuning). All episodes of a batch step together; 300 control steps each. Every policy
call becomes one row (see `diffusion_policy/reward_data.py` for the columns): the window the
policy saw, its whole predicted chunk, what was executed, the reward before and after the
executed steps, its change, and the discounted return-to-go from that call.

Branches (--branches M, default 3): at every call, M more chunks are sampled from the same
window and each is executed on a copy of the environment, while the episode goes on
with the first. Their rows (branch 1..M) record what the other chunks would have earned
from the same state. On-policy rows alone show one chunk per state, so a reward model fit
to them learns mostly how good the state is, and its gradient in the chunk -- all that
fine-tuning sees -- is weak and unreliable; the branches give it the within-state contrasts.
(Measured: docs/findings.md.) Branch rows have no return-to-go
(NaN: a branch has no future of its own). --branches 0 records the rollouts alone.

Terminal episodes: an episode stops being recorded after the call in which it succeeds
(coverage > 0.95); later calls would show the policy idling on a solved task and swamp the
data. For the return-to-go its terminal reward is held for the remaining calls of the
300-step horizon, so a success is worth the reward it reached for the whole rest of the
episode, as if the episode had run on at the goal.

Writes ./data/reward/action_reward_data_<N>eps.npy and its layout sidecar (.json).

Under torchrun the episodes are split into contiguous shares, one per process (sampling seed
--seed + rank); rank 0 gathers the rows, in episode order, and writes the file.
"""

import math
import os
import pickle
import time

import numpy as np
import torch

from diffusion_policy.common.cli import Parser, add_force_flag, add_run_flags, count, fraction, preflight, run_cli, show_progress
from diffusion_policy.common import distributed
from diffusion_policy.common.atomic import atomic_open
from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.common.outputs import default_run_dir, file_digest, run_dir_claimed
from diffusion_policy.reward_data import discounted_return_to_go, save_reward_data, sidecar_path
from diffusion_policy.rollout import rollout
from diffusion_policy.common.resume import check_resumable, resumable_state
from diffusion_policy.common.runlog import RunLog
from diffusion_policy.common.runtime import UserError, seed_everything
from diffusion_policy.common.seeds import REWARD_SEED_START, add_seed_range_flag, check_seeds


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--num_eps", type=count(1), default=300, help="episodes to roll out (consecutive seeds)")
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="policy checkpoint")
    p.add_argument("--start_seed", type=count(0), default=REWARD_SEED_START,
                   help="first start-state seed (reward-collection range: 200000+)")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps per episode")
    p.add_argument("--gamma", type=fraction, default=0.9, help="discount of the return-to-go, per policy call")
    p.add_argument("--branches", type=count(0), default=3,
                   help="extra chunks tried per call on a copy of the env (0: the executed chunks only)")
    p.add_argument("--batch_size", type=count(1), default=100, help="episodes rolled out together")
    p.add_argument("--num_inference_steps", type=count(1), default=None, help="DDPM steps (default: the checkpoint's)")
    p.add_argument("--output", default=None,
                   help="the .npy to write (default ./data/reward/action_reward_data_<num_eps>eps.npy)")
    p.add_argument("--run_dir", default=None,
                   help="config.json, metrics.jsonl and, until the data is written, partial.pt: the batches done "
                        "(default: beside --output, <output without .npy>_run)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted collection from run_dir/partial.pt (its finished batches are kept)")
    add_force_flag(p)
    add_seed_range_flag(p)
    add_run_flags(p, "seed of the sampling noise")
    return p.parse_args(argv)


PARTIAL_KIND = "collection_partial"  # the resumable state's kind (diffusion_policy/common/resume.py)


def partial_settings(args):
    """What an interrupted collection must share with the one that resumes it."""
    keys = ("num_eps", "model_path", "start_seed", "max_steps", "gamma", "branches", "batch_size",
            "num_inference_steps", "seed", "output")
    # the policy file's content too: a replaced file under the same name would mix two policies' episodes
    return {**{k: getattr(args, k) for k in keys}, "model_sha256": file_digest(args.model_path)}


def load_partial(path, args):
    """The batches an interrupted collection finished, refused if missing or made with other settings."""
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: no {path} (the collection finished or never completed a batch); "
                        "run without --resume")
    try:
        with open(path, "rb") as f:
            partial = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise UserError(f"cannot resume: {path} is not a readable partial collection ({type(e).__name__}: cut "
                        "short?); run without --resume to start afresh") from None
    return check_resumable(path, partial, PARTIAL_KIND, partial_settings(args))


def episode_rows(calls, seeds, episode_offset, gamma, horizon_calls):
    """Rows of one rollout batch: the calls made before each episode succeeded."""
    rows = {k: [] for k in ("episode", "seed", "call", "branch", "step", "obs", "action_pred", "action_exec",
                            "reward_before", "reward_after", "reward_diff", "return_to_go", "obs_after")}
    branches = calls["branch_reward_after"].shape[2] if "branch_reward_after" in calls else 0
    for i, seed in enumerate(seeds):
        n_calls = int(calls["active"][i].sum())  # active calls form a prefix
        if n_calls == 0:  # solved at its start state: no decision was made
            continue
        after = calls["reward_after"][i, :n_calls]
        # the terminal reward is held for the rest of the horizon
        held = np.concatenate([after, np.full(horizon_calls - n_calls, after[-1])])
        rows["return_to_go"].append(discounted_return_to_go(held, gamma)[:n_calls])
        rows["episode"].append(np.full(n_calls, episode_offset + i))
        rows["seed"].append(np.full(n_calls, seed))
        rows["call"].append(np.arange(n_calls))
        rows["step"].append(calls["step"][:n_calls])
        rows["obs"].append(calls["obs"][i, :n_calls])
        rows["action_pred"].append(calls["action_pred"][i, :n_calls])
        rows["action_exec"].append(calls["action_exec"][i, :n_calls])
        rows["reward_before"].append(calls["reward_before"][i, :n_calls])
        rows["reward_after"].append(after)
        rows["obs_after"].append(calls["obs_after"][i, :n_calls])
        rows["reward_diff"].append(after - calls["reward_before"][i, :n_calls])
        rows["branch"].append(np.zeros(n_calls))
        for b in range(branches):
            b_after = calls["branch_reward_after"][i, :n_calls, b]
            rows["episode"].append(np.full(n_calls, episode_offset + i))
            rows["seed"].append(np.full(n_calls, seed))
            rows["call"].append(np.arange(n_calls))
            rows["branch"].append(np.full(n_calls, b + 1))
            rows["step"].append(calls["step"][:n_calls])
            rows["obs"].append(calls["obs"][i, :n_calls])
            rows["action_pred"].append(calls["branch_action_pred"][i, :n_calls, b])
            rows["action_exec"].append(calls["branch_action_exec"][i, :n_calls, b])
            rows["reward_before"].append(calls["reward_before"][i, :n_calls])
            rows["reward_after"].append(b_after)
            rows["obs_after"].append(calls["branch_obs_after"][i, :n_calls, b])
            rows["reward_diff"].append(b_after - calls["reward_before"][i, :n_calls])
            rows["return_to_go"].append(np.full(n_calls, np.nan))
    return rows


def main(args):
    args.output = args.output or os.path.join("data", "reward", f"action_reward_data_{args.num_eps}eps.npy")
    args.run_dir = args.run_dir or default_run_dir(args.output)
    if os.path.splitext(args.output)[1] != ".npy":
        raise UserError(f"--output {args.output} must end in .npy: its layout sidecar is written beside it as "
                        f"{sidecar_path(args.output)}")
    preflight(args.device, files={"--output": args.output, "its sidecar": sidecar_path(args.output)},
              dirs={"--run_dir": args.run_dir}, inputs={"--model_path": args.model_path})
    check_seeds(args.start_seed, args.num_eps, "reward collection", args.any_seed_range)
    policy_from_checkpoint(load_checkpoint(args.model_path, "policy"), num_inference_steps=args.num_inference_steps)
    with run_dir_claimed(args.run_dir, args.resume, args.force, "collection"):
        return distributed.run(collect, args)


def collect(args, dist_info):
    device = dist_info.device
    seed_everything(args.seed + dist_info.rank)
    output = args.output
    ckpt = load_checkpoint(args.model_path, "policy")
    policy = policy_from_checkpoint(ckpt, device=device, num_inference_steps=args.num_inference_steps)
    partial_path = os.path.join(args.run_dir, "partial.pt" if dist_info.world_size == 1
                                else f"partial_rank{dist_info.rank}.pt")
    partial = load_partial(partial_path, args) if args.resume else None
    log = RunLog(args.run_dir, args, args.wandb, job="collect_rewards", enabled=dist_info.is_main, resume=args.resume)
    cfg = policy.config
    horizon_calls = math.ceil(args.max_steps / cfg.action_horizon)
    seeds = list(range(args.start_seed, args.start_seed + args.num_eps))
    mine = dist_info.shard(list(range(len(seeds))))  # this process's episodes (all of them in one process)
    generator = torch.Generator().manual_seed(args.seed + dist_info.rank)

    started = time.time()
    rows, scores, successes, done = None, [], [], 0
    if partial is not None:
        rows, scores, successes, done = partial["rows"], partial["scores"], partial["successes"], partial["done"]
        generator.set_state(torch.from_numpy(partial["generator"]))
        print(f"resuming {partial_path}: {done} of {math.ceil(len(mine) / args.batch_size)} batches done")
    for k, b in enumerate(range(0, len(mine), args.batch_size)):
        if k < done:
            continue
        index = mine[b:b + args.batch_size]
        batch = [seeds[i] for i in index]
        res = rollout(policy, batch, max_steps=args.max_steps, generator=generator, record_calls=True,
                      branches=args.branches, progress=show_progress() and dist_info.is_main,
                      desc=f"collect {b + len(batch)}/{len(mine)}")
        part = episode_rows(res["calls"], batch, index[0], args.gamma, horizon_calls)
        rows = part if rows is None else {k: rows[k] + part[k] for k in rows}
        scores.append(res["score"])
        successes.append(res["success"])
        with atomic_open(partial_path, "wb") as f:  # Ctrl-C from here on loses at most the batch in flight
            pickle.dump(resumable_state(PARTIAL_KIND, partial_settings(args), done=k + 1, rows=rows, scores=scores,
                                        successes=successes, generator=generator.get_state().numpy()), f)
    parts = distributed.gather_objects(dist_info, (rows, scores, successes))
    if not dist_info.is_main:
        return {"rank": dist_info.rank, "episodes": len(mine)}
    filled = [part for part, _, _ in parts if part]  # a process with no episode sends None
    columns = {k: np.concatenate([v for part in filled for v in part[k]]) for k in filled[0]}
    scores = np.concatenate([v for _, part, _ in parts for v in part])
    successes = np.concatenate([v for _, _, part in parts for v in part])

    meta = {
        "obs_horizon": cfg.obs_horizon, "obs_dim": cfg.obs_dim, "pred_horizon": cfg.pred_horizon,
        "action_horizon": cfg.action_horizon, "gamma": args.gamma, "max_steps": args.max_steps,
        "policy_checkpoint": args.model_path, "policy_provenance": ckpt.get("provenance", {}),
        "seeds": [seeds[0], seeds[-1]], "num_eps": args.num_eps, "branches": args.branches,
        "num_inference_steps": policy.sampler_config.num_inference_steps, "sampling_seed": args.seed,
        "terminal": "recording stops after the call that succeeds; return_to_go holds the terminal reward",
    }
    save_reward_data(output, columns, meta)
    for path in [partial_path] + [os.path.join(args.run_dir, f"partial_rank{r}.pt") for r in range(dist_info.world_size)]:
        if os.path.exists(path):
            os.remove(path)
    summary = {"episodes": args.num_eps, "calls": int((columns["branch"] == 0).sum()), "rows": int(len(columns["branch"])),
               "mean_score": float(scores.mean()), "success_rate": float(successes.mean()),
               "mean_reward_after": float(columns["reward_after"].mean()), "wall_time_s": round(time.time() - started, 1)}
    log.log(summary, step=0)
    log.close()
    print(f"collected {summary['episodes']} episodes, {summary['calls']} policy calls ({summary['rows']} rows, "
          f"{args.branches} branches per call) in {summary['wall_time_s']} s; "
          f"rollouts: mean score {summary['mean_score']:.3f}, success rate {summary['success_rate']:.3f}")
    print(f"wrote {output} and {os.path.splitext(output)[0]}.json")
    return {**summary, "output": output}


if __name__ == "__main__":
    run_cli(main, parse_args)
