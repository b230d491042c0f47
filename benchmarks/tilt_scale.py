"""Which lambda? How far exp(lambda r) tilts the pre-trained policy, measured from its own samples.

Usage:
    python -m benchmarks.tilt_scale --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt
    python -m benchmarks.tilt_scale --reward_model_path R1.ckpt R2.ckpt --num_states 200 --num_samples 32 \
        --json benchmarks/results/tilt_scale.json

Adjoint Matching fine-tunes towards p_base(chunk | obs) exp(lambda r(obs, chunk)). Only the
spread of r *among the chunks the policy proposes for one observation* matters to that target:
a constant shift of r per observation cancels. This script draws --num_samples chunks from the
pre-trained policy for each of --num_states observations of the reward data (the executed,
non-branch rows, so real states of the policy's own rollouts), scores them with the reward
model, and reports, per reward model:

- the within-state spread of r (standard deviation over one observation's chunks);
- the gain in r of picking the best of k chunks (exact expectation of the maximum of a random
  k-subset of the N samples);
- the gain in r of the exact tilt, E_tilt[r] - E[r], by self-normalised weights softmax(lambda r)
  over the N samples, with their effective sample size (small: the estimate is unreliable);
- the lambda whose tilt gains as much as the best of k (for small lambda the gain is lambda x the
  within-state variance, so a lambda far below 1 / std barely moves the policy);
- the same, per quarter of the states ranked by their mean r (early pushes to the last
  adjustments before success: does a fixed lambda tilt them alike?), and the gain of
  `--weighting standardized` (softmax(lambda z) of each state's standardised r) at --std_lambdas;
- the size of grad r in the normalised chunk, and for each lambda the fraction of the terminal
  adjoint's entries -lambda grad r that `--clip_adjoint` (element-wise, --adjoint_clip_value)
  would clamp: where most are clamped, a larger lambda no longer scales the adjoint.

Nothing is trained and no environment is stepped: a few minutes on 2 CPU cores. Use it to set
`reward_finetuning.py --reward_scale` for a new reward model.
"""

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.cli import count, nonnegative, positive
from diffusion_policy.finetune.tilt import best_of_gain, tilt_gain, tilt_gain_per_state
from diffusion_policy.finetune.weighted import standardize_rows
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.runtime import resolve_device


def matching_lambda(r, target_gain, lam_max=1e4, iters=60):
    """The lambda whose tilt gain equals target_gain (bisection in log lambda; the gain grows
    with lambda). None when even lam_max falls short."""
    if tilt_gain(r, lam_max)[0] < target_gain:
        return None
    lo, hi = 1e-6, lam_max
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if tilt_gain(r, mid)[0] < target_gain else (lo, mid)
    return math.sqrt(lo * hi)


def sample_rewards(policy, reward_model, obs, num_samples, generator):
    """Rewards (S, N) of N pre-trained chunks per observation window obs (S, To, Do), and their
    gradients (S * N, T, D) with respect to the normalised chunk (what the terminal adjoint
    -lambda grad r is made of)."""
    obs_rep = obs.repeat_interleave(num_samples, dim=0)
    x0 = policy.predict_action(obs_rep, generator=generator)["action_pred_norm"].requires_grad_(True)
    r = reward_model.reward(obs_rep.to(x0.device), policy.action_normalizer.unnormalize(x0))
    (grad,) = torch.autograd.grad(r.sum(), x0)
    return r.detach().view(-1, num_samples).cpu(), grad.cpu()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="pre-trained policy")
    p.add_argument("--reward_model_path", nargs="+", default=["./data/checkpoints/reward_model_rd0.ckpt"],
                   help="one or more reward models (train_reward.py)")
    p.add_argument("--action_reward_path", default="./data/reward/action_reward_data_300eps.npy",
                   help="reward data whose observation windows are the states sampled at")
    p.add_argument("--num_states", type=count(1), default=200, help="observation windows drawn from the reward data")
    p.add_argument("--num_samples", type=count(1), default=32, help="chunks sampled from the policy per observation")
    p.add_argument("--lambdas", type=nonnegative, nargs="*", default=[3.0, 10.0, 30.0, 60.0, 100.0, 300.0],
                   help="lambdas whose tilt gain is reported")
    p.add_argument("--std_lambdas", type=nonnegative, nargs="*", default=[1.0, 2.0],
                   help="lambdas of --weighting standardized whose tilt gain is reported")
    p.add_argument("--best_of", type=count(1), nargs="*", default=[2, 4, 8], help="k of the best-of-k gains")
    p.add_argument("--adjoint_clip_value", type=positive, default=1.0,
                   help="the element-wise clamp of reward_finetuning.py --clip_adjoint, for the clamped fraction")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the state draw and the sampling noise")
    add_output_flags(p)
    return p.parse_args(argv)


def main(args):
    device = resolve_device(args.device)
    policy = load_policy(args.model_path, device=device)
    columns, _ = load_reward_data(args.action_reward_path)
    rows = np.flatnonzero(columns["branch"] == 0)
    pick = np.random.default_rng(args.seed).choice(rows, size=min(args.num_states, len(rows)), replace=False)
    obs = torch.as_tensor(columns["obs"][pick], dtype=torch.float32)
    results = []
    for path in args.reward_model_path:
        start = time.perf_counter()
        reward_model = load_reward_model(path, device=device)
        r, grad = sample_rewards(policy, reward_model, obs, args.num_samples,
                                 torch.Generator().manual_seed(args.seed))
        std, g_abs = r.std(dim=1), grad.abs().flatten()
        row = {"reward_model": path, "target": reward_model.config.target,
               "within_state_std_mean": float(std.mean()), "within_state_std_median": float(std.median()),
               "across_state_std": float(r.mean(1).std()),
               "grad_norm_quantiles": {f"{q:g}": float(v) for q, v in zip(
                   (0.5, 0.9, 0.99), torch.quantile(grad.flatten(1).norm(dim=1), torch.tensor([0.5, 0.9, 0.99])))},
               "best_of": {}, "tilt": {}}
        for k in args.best_of:
            gain = best_of_gain(r, k)
            lam = matching_lambda(r, gain)
            row["best_of"][str(k)] = {"gain": gain, "matching_lambda": lam}
        for lam in args.lambdas:
            gain, ess = tilt_gain(r, lam)
            clipped = float((lam * g_abs >= args.adjoint_clip_value).float().mean())
            row["tilt"][f"{lam:g}"] = {"gain": gain, "ess_fraction": ess, "terminal_clipped_fraction": clipped}
        z = standardize_rows(r)
        row["standardized"] = {f"{lam:g}": float(tilt_gain_per_state(z, lam, reward=r).mean()) for lam in args.std_lambdas}
        row["by_reward_quartile"] = []
        for part in np.array_split(r.mean(1).argsort().numpy(), 4):
            sub = r[part]
            row["by_reward_quartile"].append({
                "mean_r": float(sub.mean()), "within_state_std_mean": float(sub.std(dim=1).mean()),
                "tilt_gain": {f"{lam:g}": tilt_gain(sub, lam)[0] for lam in args.lambdas},
                "standardized_gain": {f"{lam:g}": float(tilt_gain_per_state(z[part], lam, reward=sub).mean())
                                      for lam in args.std_lambdas}})
        row["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(f"{path} ({row['target']}): within-state std {row['within_state_std_mean']:.4f} "
              f"(median {row['within_state_std_median']:.4f}), across states {row['across_state_std']:.4f}; "
              "|grad r| quantiles 50/90/99 % " + " / ".join(f"{v:.3f}" for v in row["grad_norm_quantiles"].values()))
        for k, v in row["best_of"].items():
            lam = "beyond 1e4" if v["matching_lambda"] is None else f"{v['matching_lambda']:.1f}"
            print(f"  best of {k:>2}: gain {v['gain']:.4f}, matched by lambda {lam}")
        for lam, v in row["tilt"].items():
            print(f"  lambda {lam:>5}: tilt gain {v['gain']:.4f}, effective samples {v['ess_fraction']:.2f} x N, "
                  f"terminal adjoint entries clamped at {args.adjoint_clip_value:g}: {v['terminal_clipped_fraction']:.3f}")
        for lam, gain in row["standardized"].items():
            print(f"  standardized lambda {lam}: tilt gain {gain:.4f}")
        for q, part in enumerate(row["by_reward_quartile"]):
            print(f"  quarter {q + 1} by mean r ({part['mean_r']:.3f}): within-state std {part['within_state_std_mean']:.4f}, "
                  "tilt gain " + ", ".join(f"lambda {k} {v:.4f}" for k, v in part["tilt_gain"].items()))
    result = {"model_path": args.model_path, "action_reward_path": args.action_reward_path,
              "num_states": len(pick), "num_samples": args.num_samples, "seed": args.seed, "rows": results,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    save_result(args.json, result)
    return result


if __name__ == "__main__":
    main(parse_args())
