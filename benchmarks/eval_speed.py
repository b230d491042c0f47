"""Evaluation wall time: the batched rollout vs. one environment at a time, same policy.

Usage:
    python -m benchmarks.eval_speed --model_path ./data/checkpoints/policy_pretrained.ckpt
    python -m benchmarks.eval_speed --model_path X.ckpt --num_eps 100 --json benchmarks/results/eval_speed.json

Both roll the same policy out on the same held-out seeds for the full 300 steps (early stop
when all episodes of a batch succeed, as in evaluation). The batched form makes one model
call per control step for all episodes (`rollout`); the reference loops over episodes, each
with its own environment and a batch-of-one model call per control step: the simplest
implementation of the same evaluation. Scores agree statistically, not bit for bit (the
noise draws differ with the batch shape).
"""

import argparse
import time

import numpy as np
import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.common.cli import count
from diffusion_policy.common.runlog import machine
from diffusion_policy.rollout import rollout
from diffusion_policy.common.runtime import resolve_device
from diffusion_policy.common.seeds import EVAL_SEED_START


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="policy checkpoint")
    p.add_argument("--num_eps", type=count(1), default=100, help="episodes, from seed 100000")
    p.add_argument("--sequential_eps", type=count(1), default=None,
                   help="episodes for the one-at-a-time loop (default: all of --num_eps)")
    add_output_flags(p)
    return p.parse_args(argv)


def main(args):
    policy = load_policy(args.model_path, device=resolve_device(args.device))
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + args.num_eps))
    n_seq = args.sequential_eps or args.num_eps

    start = time.perf_counter()
    batched = rollout(policy, seeds, generator=torch.Generator().manual_seed(0))
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    sequential = [rollout(policy, [s], generator=torch.Generator().manual_seed(0)) for s in seeds[:n_seq]]
    t_seq = time.perf_counter() - start

    per_ep_batched, per_ep_seq = t_batched / len(seeds), t_seq / n_seq
    result = {
        "num_eps": len(seeds), "sequential_eps": n_seq,
        "batched_wall_s": round(t_batched, 2), "sequential_wall_s": round(t_seq, 2),
        "batched_s_per_episode": round(per_ep_batched, 3), "sequential_s_per_episode": round(per_ep_seq, 3),
        "speedup": round(per_ep_seq / per_ep_batched, 2),
        "batched_score": float(batched["score"].mean()),
        "sequential_score": float(np.mean([r["score"][0] for r in sequential])),
        "num_inference_steps": policy.sampler_config.num_inference_steps,
        "machine": machine(),
    }
    print(f"batched     {t_batched:8.1f} s for {len(seeds)} episodes ({per_ep_batched:.3f} s/episode)")
    print(f"sequential  {t_seq:8.1f} s for {n_seq} episodes ({per_ep_seq:.3f} s/episode)")
    print(f"speedup     {result['speedup']:8.2f}x per episode; scores {result['batched_score']:.3f} vs "
          f"{result['sequential_score']:.3f}")
    save_result(args.json, result, vars(args))
    return result


if __name__ == "__main__":
    main(parse_args())
