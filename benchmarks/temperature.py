"""The pre-trained policy at other samplers and temperatures, paired with the policy as shipped (DDPM).

Usage:
    python -m benchmarks.temperature                                   # DDIM at s = 1, 0.5, 0
    python -m benchmarks.temperature --rows ddim:1 ddim:0.5 ddim:0 ddpm:0.5

Each row samples the initial noise from N(0, s^2 I) (`evaluate_policy.py --sampler S
--noise_scale s`) on the protocol's starts (--num_eval from 100000, --seed 0) and is paired start by
start with plain DDPM sampling. These are the untrained baselines a noise-space policy is read
against: shrinking the noise alone can change success. Evaluations are cached under --out_dir.
Writes --json (default benchmarks/results/temperature.json): rows of {sampler, noise_scale, success,
score, success_diff, success_diff_ci95, score_diff}, the DDPM row, the config, commit and machine.
"""

import argparse

from benchmarks import save_result
from benchmarks.finetune_protocol import episodes, paired
from benchmarks.reward_ceiling import add_paired_eval_flags, evaluate


def row(text):
    """'ddim:0.5' -> ('ddim', 0.5)."""
    sampler, _, scale = text.partition(":")
    if sampler not in ("ddpm", "ddim"):
        raise argparse.ArgumentTypeError(f"expected ddpm:S or ddim:S, got {text!r}")
    try:
        scale = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a noise scale after ':', got {text!r}") from None
    if not scale >= 0:
        raise argparse.ArgumentTypeError(f"the noise scale must be >= 0, got {scale}")
    return sampler, scale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="the policy")
    p.add_argument("--rows", type=row, nargs="+", default=[("ddim", 1.0), ("ddim", 0.5), ("ddim", 0.0)],
                   help="sampler:noise_scale rows (default ddim:1 ddim:0.5 ddim:0)")
    add_paired_eval_flags(p, "temperature.json")
    return p.parse_args(argv)


def main(args):
    plain_success, plain_score = episodes(evaluate(args, "plain"), args.num_eval, args.eval_start)
    result = {"ddpm": {"success": float(plain_success.mean()), "score": float(plain_score.mean())}, "rows": []}
    for sampler, scale in args.rows:
        out = evaluate(args, f"{sampler}_s{scale:g}", "--sampler", sampler, "--noise_scale", str(scale))
        success, score = episodes(out, args.num_eval, args.eval_start)
        s_diff, s_ci = paired(success, plain_success)
        result["rows"].append({"sampler": sampler, "noise_scale": scale, "success": float(success.mean()),
                               "score": float(score.mean()), "success_diff": s_diff, "success_diff_ci95": s_ci,
                               "score_diff": paired(score, plain_score)[0]})
        save_result(args.json, result, {**vars(args), "rows": [list(r) for r in args.rows]})
        print(f"{sampler} s={scale:g}: success {success.mean():.3f} ({s_diff:+.3f} [{s_ci[0]:+.3f}, {s_ci[1]:+.3f}])",
              flush=True)
    return result


if __name__ == "__main__":
    main(parse_args())
