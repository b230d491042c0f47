"""Where a fine-tuned policy's held-out success comes from: the starts it wins and loses.

Usage:
    python -m benchmarks.outcome_flips --name weighted_model_ema998_40it_lr5e5 weighted_model_ema998_40it_lr5e5_control
    python -m benchmarks.outcome_flips --name NAME --json benchmarks/results/outcome_flips.json

For each protocol setting (`data/protocol/<name>/seed<S>_eval.json`, written by
benchmarks/finetune_protocol.py) and each of its seeds, compares the fine-tuned policy with the
pre-trained one start by start on the protocol's held-out starts:

- won: starts the fine-tuned policy solves and the pre-trained one does not; lost: the reverse.
  success_diff = (won - lost) / starts, so a small difference can hide many flips each way;
- the failures by how close they came: a near miss reached --near coverage (default 0.9) but
  never the 0.95 of success, a far miss did not. Push-T's failures are mostly near misses,
  which is why success moves with small changes of the policy.

Nothing is run: it reads the evaluation files. Seconds.
"""

import argparse
import glob
import json
import os
import re

import numpy as np

from benchmarks import add_output_flags, save_result
from diffusion_policy.cli import count, fraction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", nargs="+", required=True, help="protocol settings (directories under --out_dir)")
    p.add_argument("--out_dir", default="./data/protocol", help="the protocol's work directory (default %(default)s)")
    p.add_argument("--num_eval", type=count(1), default=500, help="held-out starts of the protocol (default 500)")
    p.add_argument("--near", type=fraction, default=0.9, help="coverage a failure must reach to count as a near miss")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def outcomes(path):
    """(seeds, success, max_coverage) arrays of an evaluation file."""
    eps = json.load(open(path))["episodes"]
    return (np.array([e["seed"] for e in eps]), np.array([bool(e["success"]) for e in eps]),
            np.array([e["max_coverage"] for e in eps], float))


def flips(pre, ft, near):
    """Counts comparing the fine-tuned policy's outcomes `ft` with the pre-trained `pre` on the same starts."""
    (seeds_p, s_p, c_p), (seeds_f, s_f, c_f) = pre, ft
    if not np.array_equal(seeds_p, seeds_f):
        raise SystemExit("the two evaluations cover different starts")

    def misses(s, c):
        return {"near_misses": int(((~s) & (c >= near)).sum()), "far_misses": int(((~s) & (c < near)).sum())}

    return {"starts": len(s_p), "won": int((s_f & ~s_p).sum()), "lost": int((~s_f & s_p).sum()),
            "success_diff": float(s_f.mean() - s_p.mean()), "fine_tuned": misses(s_f, c_f),
            "pretrained": misses(s_p, c_p)}


def main(args):
    pre_path = os.path.join(args.out_dir, f"pretrained_eval_{args.num_eval}.json")
    if not os.path.exists(pre_path):
        raise SystemExit(f"{pre_path} not found: run benchmarks/finetune_protocol.py first")
    pre = outcomes(pre_path)
    result = {"pretrained_eval": pre_path, "near": args.near, "settings": {}}
    for name in args.name:
        paths = sorted(glob.glob(os.path.join(args.out_dir, name, "seed*_eval.json")))
        if not paths:
            raise SystemExit(f"no evaluations under {os.path.join(args.out_dir, name)}")
        rows = {}
        for path in paths:
            seed = re.search(r"seed(\d+)_eval\.json$", path).group(1)
            rows[seed] = flips(pre, outcomes(path), args.near)
            r = rows[seed]
            print(f"{name} seed {seed}: won {r['won']}, lost {r['lost']} of {r['starts']} "
                  f"({100 * r['success_diff']:+.1f} points); near / far misses {r['fine_tuned']['near_misses']} / "
                  f"{r['fine_tuned']['far_misses']} (pre-trained {r['pretrained']['near_misses']} / "
                  f"{r['pretrained']['far_misses']})")
        result["settings"][name] = rows
    save_result(args.json, result)
    return result


if __name__ == "__main__":
    main(parse_args())
