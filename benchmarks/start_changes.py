"""Start by start: how fine-tuned policies changed the outcomes of a base on the same starts.

Usage:
    python -m benchmarks.start_changes BASE_EVAL.json FT_EVAL.json [FT_EVAL.json ...] [--json out.json]

Each eval.json is evaluate_policy.py's (the same starts and sampling seed for all). Per policy:
success and its paired difference with the base [95 %], the starts won and lost, the starts
ruined (final score down by more than 0.5: a start the base handled that the policy undid), and
the base's near misses (failures at score >= 0.9) it converted (diffusion_policy/common/stats.py).
"""

import argparse
import json
import os

import numpy as np

from benchmarks import save_result
from diffusion_policy.common.cli import run_cli
from diffusion_policy.common.runtime import UserError
from diffusion_policy.common.stats import Z95, start_changes


def outcomes(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give evaluate_policy.py's eval.json of each policy")
    eps = json.load(open(path))["episodes"]
    return {e["seed"]: (float(e["success"]), float(e["score"])) for e in eps}


def compare(base_path, ft_path):
    base, ft = outcomes(base_path), outcomes(ft_path)
    if sorted(base) != sorted(ft):
        raise SystemExit(f"{ft_path} and {base_path} evaluate different starts")
    seeds = sorted(base)
    s, c = np.array([ft[k][0] for k in seeds]), np.array([ft[k][1] for k in seeds])
    bs, bc = np.array([base[k][0] for k in seeds]), np.array([base[k][1] for k in seeds])
    d = s - bs
    half = Z95 * d.std(ddof=1) / np.sqrt(len(d))
    return {"eval": ft_path, "success": float(s.mean()), "success_diff": float(d.mean()),
            "success_diff_ci95": [float(d.mean() - half), float(d.mean() + half)],
            "score_diff": float((c - bc).mean()), **start_changes(s, c, bs, bc)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base policy's eval.json")
    p.add_argument("evals", nargs="+", help="the fine-tuned policies' eval.json files")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(args):
    rows = [compare(args.base, path) for path in args.evals]
    for r in rows:
        print(f"{r['eval']}: success {r['success']:.3f} ({100 * r['success_diff']:+.1f} [{100 * r['success_diff_ci95'][0]:+.1f}, "
              f"{100 * r['success_diff_ci95'][1]:+.1f}]), won {r['won']} / lost {r['lost']}, ruined {r['ruined']}, "
              f"near misses converted {r['near_misses_converted']} of {r['base_near_misses']}")
    save_result(args.json, {"base": args.base, "rows": rows}, {"base": args.base, "evals": args.evals})
    return {"rows": rows}


if __name__ == "__main__":
    run_cli(main, parse_args)
