"""How much of a fine-tuning run's update is noise? Average several runs' updates and look.

Usage:
    python -m benchmarks.soup_probe --name weighted_default --model_path data/protocol/X/seed0.ckpt \
        data/protocol/X/seed1.ckpt data/protocol/X/seed2.ckpt --extrapolate 1 2 3

Each fine-tuned policy's update (its acting weights minus the pre-trained policy's) is the
tilt the runs share plus noise of its own. The uniform soup base + s * mean_i(update_i)
keeps the first and divides the second's variance by the number of runs; moving further
along it (s > 1) scales both. For each s the soup is evaluated on the protocol's held-out
starts (100000+, evaluate_policy.py --seed 0) and paired start by start with the pre-trained
policy's cached evaluation (benchmarks/finetune_protocol.py writes it), and read by the tilt
meter. This is a probe of one soup, not the protocol: a soup made of the protocol's three
training seeds is a single run. Writes benchmarks/results/soup_probe_<name>.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks import save_result
from benchmarks.finetune_protocol import ROOT, episodes, paired
from diffusion_policy.checkpoint import load_checkpoint, save_checkpoint
from diffusion_policy.cli import count, nonnegative
from diffusion_policy.finetune.extrapolate import soup_checkpoint
from diffusion_policy.seeds import EVAL_SEED_START


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="benchmarks/results/soup_probe_<name>.json")
    p.add_argument("--model_path", nargs="+", required=True, help="fine-tuned policies of the same base")
    p.add_argument("--base_path", default="./data/checkpoints/policy_pretrained.ckpt", help="(default: %(default)s)")
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt", help="(default: %(default)s)")
    p.add_argument("--reward_scale", type=nonnegative, default=100.0, help="lambda of the tilt meter (default 100)")
    p.add_argument("--extrapolate", type=float, nargs="+", default=[1.0], help="s of each soup (default 1)")
    p.add_argument("--num_eval", type=count(1), default=500, help="held-out starts from 100000 (default 500)")
    p.add_argument("--parallel", type=count(1), default=2, help="evaluations at a time, one thread each (default 2)")
    p.add_argument("--pretrained_eval", default=None,
                   help="the pre-trained policy's evaluation on the same starts (default: the protocol's, "
                        "data/protocol/pretrained_eval_<num_eval>.json)")
    p.add_argument("--out_dir", default="./data/protocol/soups", help="soups and evaluations (default %(default)s)")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"), help="(default benchmarks/results)")
    return p.parse_args(argv)


def main(args):
    started = time.time()
    work = os.path.join(args.out_dir, args.name)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pre_eval = os.path.join(ROOT, args.pretrained_eval or os.path.join("data", "protocol",
                                                                       f"pretrained_eval_{args.num_eval}.json"))
    if not os.path.exists(pre_eval):
        raise SystemExit(f"{pre_eval} is missing: run benchmarks.finetune_protocol first (it evaluates the pre-trained policy)")
    base = load_checkpoint(args.base_path, "policy")
    members = [load_checkpoint(p, "policy") for p in args.model_path]
    paths = {}
    for s in args.extrapolate:
        paths[s] = os.path.join(work, f"soup_x{s:g}.ckpt")
        save_checkpoint(soup_checkpoint(members, base, s), paths[s])

    def evaluate(s):
        out = paths[s].replace(".ckpt", "_eval.json")
        if not os.path.exists(out):
            subprocess.run([sys.executable, "evaluate_policy.py", "--model_path", paths[s], "--num_eps", str(args.num_eval),
                            "--start_seed", str(EVAL_SEED_START), "--seed", "0", "--output", out, "--no_progress"],
                           cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        return out

    tilt_json = os.path.join(work, "tilt.json")
    with ThreadPoolExecutor(args.parallel) as pool:
        tilt = pool.submit(subprocess.run, [
            sys.executable, "-m", "benchmarks.tilt_meter", "--model_path", *[paths[s] for s in args.extrapolate],
            "--base_path", args.base_path, "--reward_model_path", args.reward_model_path,
            "--reward_scale", str(args.reward_scale), "--json", tilt_json], cwd=ROOT, env=env, check=True,
            stdout=subprocess.DEVNULL)
        evals = {s: pool.submit(evaluate, s) for s in args.extrapolate}
        tilt.result()
        pre_success, pre_score = episodes(pre_eval, args.num_eval, EVAL_SEED_START)
        tilts = {row["model_path"]: row for row in json.load(open(tilt_json))["rows"]}
        rows = []
        for s in args.extrapolate:
            success, score = episodes(evals[s].result(), args.num_eval, EVAL_SEED_START)
            s_diff, s_ci = paired(success, pre_success)
            c_diff, c_ci = paired(score, pre_score)
            t = tilts[paths[s]]
            rows.append({"extrapolate": s, "success": float(success.mean()), "score": float(score.mean()),
                         "success_diff": s_diff, "success_diff_ci95": s_ci, "score_diff": c_diff,
                         "score_diff_ci95": c_ci, **{k: t[k] for k in ("tilt_realised", "tilt_realised_ci95",
                                                                        "tilt_predicted", "tilt_fraction")}})
            print(f"x {s:g}: success {success.mean():.3f} ({s_diff:+.3f} [{s_ci[0]:+.3f}, {s_ci[1]:+.3f}]), score "
                  f"{c_diff:+.4f}, tilt {t['tilt_realised']:+.4f} of {t['tilt_predicted']:+.4f}", flush=True)
    result = {"name": args.name, "members": args.model_path, "base_path": args.base_path,
              "pretrained": {"success": float(pre_success.mean()), "score": float(pre_score.mean())},
              "num_eval": args.num_eval, "rows": rows, "wall_s": round(time.time() - started, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.parallel} jobs side by side"}
    save_result(os.path.join(args.results_dir, f"soup_probe_{args.name}.json"), result)
    return result


if __name__ == "__main__":
    main(parse_args())
