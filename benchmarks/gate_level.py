"""The learned gate's level, chosen on the demonstrations (#49), never on held-out starts.

Usage:
    python -m benchmarks.gate_level --reward_model_path ../shared/artifacts/pusht_cpu/reward_model_rd0.ckpt \
        --json benchmarks/results/gate_level.json

On every frame of the Push-T demonstrations (25,650 frames, 206 episodes) it reads the reward model's
value of the frame v (the dynamics reward model's frame part, what `--act_value` gates on), the true
reward of the frame (clip(coverage / 0.95), from the block's pose), and the goal-pose rule's decision
(`--act_within D`: the block's keypoints on average within D px of their place at the goal). For each
level L of a grid: the fraction of frames the learned gate opens (v >= L), its agreement with the rule,
and with the same gate on the true reward. The level the pipeline uses is the one that agrees most
with the rule of D px (docs/findings.md has the rule, written before the protocol): the learned gate is
asked to open where the hand gate did, from what the reward model learnt, without the goal's pose.
"""

import argparse

import numpy as np
import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy.common.cli import positive, run_cli
from diffusion_policy.data.dataset import load_pusht_arrays, resolve_dataset_path
from diffusion_policy.env.geometry import GOAL_POSE, block_keypoints, coverage, reward_from_coverage
from diffusion_policy.reward_model import load_reward_model

LEVELS = [round(x, 2) for x in np.arange(0.20, 0.81, 0.05)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt",
                   help="the dynamics reward model whose frame value gates (default: %(default)s)")
    p.add_argument("--dataset_path", default=None, help="the demonstrations (default: $PUSHT_DATASET or data/pusht/)")
    p.add_argument("--within", type=positive, default=30.0, help="D of the goal-pose rule it is read against (px)")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def main(args):
    arrays = load_pusht_arrays(resolve_dataset_path(args.dataset_path))
    frames, poses = arrays["obs"], arrays["state"][:, 2:5]
    with torch.no_grad():
        value = load_reward_model(args.reward_model_path).frame_reward(torch.from_numpy(frames)).numpy()
    true = np.array([reward_from_coverage(coverage(p)) for p in poses])
    goal = block_keypoints(GOAL_POSE)
    distance = np.linalg.norm(frames[:, :18].reshape(-1, 9, 2) - goal, axis=-1).mean(-1)
    rule = distance <= args.within
    rows = []
    for level in LEVELS:
        learned = value >= level
        rows.append({"level": level, "open": float(learned.mean()), "agrees_with_rule": float((learned == rule).mean()),
                     "agrees_with_true_reward_gate": float((learned == (true >= level)).mean())})
    best = max(rows, key=lambda r: r["agrees_with_rule"])
    result = {"frames": len(frames), "within": args.within, "rule_open": float(rule.mean()),
              "value_rmse_vs_true": float(np.sqrt(np.mean((value - true) ** 2))), "rows": rows,
              "chosen_level": best["level"], "chosen_agreement": best["agrees_with_rule"]}
    for r in rows:
        print(f"L {r['level']:.2f}: open {r['open']:.3f}, agrees with {args.within:g} px {r['agrees_with_rule']:.3f}, "
              f"with the true reward's gate {r['agrees_with_true_reward_gate']:.3f}")
    print(f"the rule opens on {result['rule_open']:.3f} of {len(frames)} frames; chosen level {best['level']:.2f} "
          f"(agreement {best['agrees_with_rule']:.3f}); frame value RMSE against the true reward "
          f"{result['value_rmse_vs_true']:.3f}")
    save_result(args.json, result, {k: v for k, v in vars(args).items() if k != "json"})
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
