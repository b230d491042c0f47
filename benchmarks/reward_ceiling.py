"""What a reward's choices are worth: run-time best-of-N on held-out starts, paired with plain sampling.

Usage:
    python -m benchmarks.reward_ceiling --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt
    python -m benchmarks.reward_ceiling --reward_model_path A.ckpt B.ckpt --simulator --n 8
    python -m benchmarks.reward_ceiling --no-simulator --reward_model_path R.ckpt --json benchmarks/results/best_of_model.json

The pre-trained policy (--model_path) acts on the protocol's starts (--num_eval from 100000, default
500; a pilot: --eval_start 400000, the validation starts) with the same sampling noise (--seed 0)
three ways: plain sampling; at every call the best of --n chunks by each reward model
(`evaluate_policy.py --best_of N --reward_model_path R`); and, with --simulator (the ceiling), the
best of --n by the true reward after the chunk on a copy of the env. Each row is paired start by start with plain sampling:

    success_diff = mean over starts of (success_best_of - success_plain), with a paired 95 % interval

A learned reward's success_diff over the simulator's is the fraction of the selection value it
captures. Evaluations are cached under --out_dir (an interrupted run resumes), each with a record of
the files (sha256) and flags that made it: one made from other inputs is refused, not reused. Writes --json
(default benchmarks/results/reward_ceiling.json): rows of {reward_model, reward_source, target, config, n,
success, success_diff, success_diff_ci95, score, score_diff, wall_s_per_call}, the plain row,
and the resolved config, git commit and machine.
"""

import argparse
import json
import os

from benchmarks import file_digest, reuse_or_make, save_result
from benchmarks.finetune_protocol import ROOT, episodes, paired
import evaluate_policy
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.cli import count
from diffusion_policy.common.seeds import ALLOWED, EVAL_SEED_START


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="the policy that acts")
    p.add_argument("--reward_model_path", nargs="*", default=[], help="reward models to choose by (one row each)")
    p.add_argument("--simulator", action=argparse.BooleanOptionalAction, default=True,
                   help="also choose by the true reward after the chunk: the ceiling (default: on)")
    p.add_argument("--n", type=count(2), default=8, help="chunks per call to choose from (default 8)")
    add_paired_eval_flags(p, "reward_ceiling.json")
    return p.parse_args(argv)


def add_paired_eval_flags(p, result_name):
    """The flags of a benchmark that evaluates variants of one policy paired with plain sampling."""
    p.add_argument("--num_eval", type=count(1), default=500, help="starts from --eval_start (default 500)")
    p.add_argument("--eval_start", type=count(EVAL_SEED_START), choices=ALLOWED["evaluation"], default=EVAL_SEED_START,
                   help="first start: 100000, the held-out starts that judge (default), or 400000, the validation "
                        "starts of pilots, which leave the held-out ones unseen until a setting has earned them")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps per episode (default 300)")
    p.add_argument("--out_dir", default="./data/ceiling", help="cached evaluations (default ./data/ceiling)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", result_name),
                   help=f"where the rows go (default benchmarks/results/{result_name})")


def evaluate(args, name, *extra):
    """The cached evaluation `name` of --model_path with extra evaluate_policy.py flags."""
    out = os.path.join(args.out_dir, name, "eval.json")
    flags = ["--num_eps", str(args.num_eval), "--start_seed", str(args.eval_start), "--max_steps", str(args.max_steps),
             "--seed", "0", *extra]
    inputs = {"model": file_digest(args.model_path)}
    if "--reward_model_path" in extra:
        inputs["reward_model"] = file_digest(extra[extra.index("--reward_model_path") + 1])
    return reuse_or_make(out, {**inputs, "flags": flags}, lambda: evaluate_policy.main(evaluate_policy.parse_args(
        ["--model_path", args.model_path, "--output", out, *flags]))["output"])


def main(args):
    plain_path = evaluate(args, "plain")
    plain_success, plain_score = episodes(plain_path, args.num_eval, args.eval_start)
    result = {"plain": {"success": float(plain_success.mean()), "score": float(plain_score.mean())}, "rows": []}
    choices = [(path, ["--reward_model_path", path]) for path in args.reward_model_path]
    if args.simulator:
        choices.append((None, ["--reward_source", "simulator"]))
    for path, flags in choices:
        name = f"best_of_{args.n}_" + ("simulator" if path is None else os.path.splitext(os.path.basename(path))[0])
        out = evaluate(args, name, "--best_of", str(args.n), *flags)
        success, score = episodes(out, args.num_eval, args.eval_start)
        s_diff, s_ci = paired(success, plain_success)
        c_diff, c_ci = paired(score, plain_score)
        reward = load_checkpoint(path, "reward") if path else None
        result["rows"].append({
            "reward_model": path or "simulator", "reward_source": "model" if path else "simulator", "target": reward["config"]["reward_model"]["target"] if reward
            else "reward_after (true)", "config": reward["config"]["reward_model"] if reward else None,
            "provenance": reward.get("provenance") if reward else None, "n": args.n,
            "success": float(success.mean()), "success_diff": s_diff, "success_diff_ci95": s_ci,
            "score": float(score.mean()), "score_diff": c_diff, "score_diff_ci95": c_ci,
            "wall_s_per_call": json.load(open(out))["summary"]["wall_s_per_call"]})
        save_result(args.json, result, vars(args))
        print(f"{name}: success {success.mean():.3f} ({s_diff:+.3f} [{s_ci[0]:+.3f}, {s_ci[1]:+.3f}]), "
              f"score {score.mean():.3f} ({c_diff:+.4f})", flush=True)
    save_result(args.json, result, vars(args))
    return result


if __name__ == "__main__":
    main(parse_args())
