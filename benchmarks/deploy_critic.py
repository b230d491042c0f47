"""Deployment by the critic (issue #37, item 6): a residual run's policy with best of N by its own critic,
beside the residual alone and best of N by the reward model, on the same starts.

Usage:
    python -m benchmarks.deploy_critic --runs data/protocol/residual_model/seed0.ckpt data/protocol/residual_model/seed1.ckpt
    python -m benchmarks.deploy_critic --runs RUN --rows critic --best_of 8 --num_eval 200 --eval_start 400000

A run is a residual fine-tuning's policy (.ckpt); its critic is read from the policy (saved with it
since item 6) or from its run's resumable state (`latest.ckpt` in the run directory). Rows, each
evaluated by evaluate_policy.py on the same starts with the same sampling seed (0), paired start by
start with the base (`--base`, the policy the runs started from) on those starts:

    alone    RUN.ckpt as it is
    critic   RUN.ckpt, best of N by the critic's mean Q (each candidate: a base chunk + its residual)
    model    RUN.ckpt, best of N by the reward model (`--reward_model_path`)
    base_model  the base, best of N by the reward model (once, not per run)

Every evaluation is cached under --out_dir keyed by the policy file's sha256 and its flags, so rows
add up over sessions; jobs run --parallel at a time, one thread each. Writes --json (default
benchmarks/results/deploy_critic.json): per run and row success, score, the paired differences
[95 %], won/lost/ruined starts and the wall time per call, with config, commit and machine.
"""

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor

from benchmarks import ROOT, evaluation, file_digest, run_logged, save_result
from benchmarks.finetune_protocol import episodes, paired
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.cli import count, run_cli
from diffusion_policy.common.outputs import default_run_dir
from diffusion_policy.common.runlog import machine
from diffusion_policy.common.seeds import EVAL_SEED_START
from diffusion_policy.common.stats import start_changes

PUBLISHED = "../shared/artifacts/pusht_cpu"
ROWS = ("alone", "critic", "model", "base_model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True,
                   help="residual policies (.ckpt); the critic: in the policy, or its run's latest.ckpt")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to evaluate (default: all)")
    p.add_argument("--base", default=os.path.join(PUBLISHED, "policy_pretrained.ckpt"),
                   help="the policy the runs started from (default: the published base)")
    p.add_argument("--reward_model_path", default=os.path.join(PUBLISHED, "reward_model_rd0.ckpt"),
                   help="the reward model of the rows model and base_model (default: the published one)")
    p.add_argument("--best_of", type=count(2), default=8, help="candidates per call (default 8)")
    p.add_argument("--num_eval", type=count(1), default=200, help="starts from --eval_start (default 200)")
    p.add_argument("--eval_start", type=count(0), default=400_000,
                   help=f"first start: 400000 (validation, default) or {EVAL_SEED_START} (held out)")
    p.add_argument("--parallel", type=count(1), default=2, help="evaluations at a time, one thread each")
    p.add_argument("--out_dir", default="./data/deploy", help="cached evaluations (default %(default)s)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "deploy_critic.json"),
                   help="the result (default benchmarks/results/deploy_critic.json)")
    return p.parse_args(argv)


def critic_path_of(policy_path):
    """Where a residual policy's critic is: the policy itself (since item 6), or its run's resumable
    checkpoint (the protocol's <name>/seedN/latest.ckpt beside seedN.ckpt, or the default run dir)."""
    if not os.path.isfile(policy_path):
        raise SystemExit(f"{policy_path} not found: --runs takes residual policies (.ckpt)")
    if "critic" in load_checkpoint(policy_path, "policy"):
        return policy_path
    stem = os.path.splitext(policy_path)[0]
    for path in (os.path.join(stem, "latest.ckpt"), os.path.join(default_run_dir(policy_path), "latest.ckpt")):
        if os.path.isfile(path):
            return path
    raise SystemExit(f"{policy_path} carries no critic and neither {stem}/latest.ckpt nor "
                     f"{default_run_dir(policy_path)}/latest.ckpt exists")


def run_job(cmd, log_path):
    """One evaluation in a process of its own with one thread (the tests run it in theirs)."""
    run_logged(cmd, log_path, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))


def main(args):
    critics = {run: critic_path_of(run) for run in args.runs}
    os.makedirs(args.out_dir, exist_ok=True)
    pick = ["--best_of", str(args.best_of)]
    jobs = {("base", "alone"): (args.base, [])}  # the reference every row is paired with
    if "base_model" in args.rows:
        jobs[("base", "base_model")] = (args.base, [*pick, "--reward_model_path", args.reward_model_path])
    for run in args.runs:
        flags = {"alone": [], "critic": [*pick, "--reward_source", "critic", "--critic_path", critics[run]],
                 "model": [*pick, "--reward_model_path", args.reward_model_path]}
        for row in args.rows:
            if row in flags:
                jobs[(run, row)] = (run, flags[row])

    def out_of(key):
        model, extra = jobs[key]
        tag = "_".join(x for x in extra if not x.startswith("--") and "/" not in x)
        return os.path.join(args.out_dir, f"eval_{args.eval_start}_{args.num_eval}_{file_digest(model)}"
                                          f"{'_' + key[1] + '_' + tag if extra else ''}.json")

    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {key: pool.submit(evaluation, model, out_of(key), args.num_eval, args.eval_start, extra,
                                   lambda cmd, log: run_job(cmd, log))
                   for key, (model, extra) in jobs.items()}
        outs = {key: f.result() for key, f in futures.items()}

    pre_success, pre_score = episodes(outs[("base", "alone")], args.num_eval, args.eval_start)
    result = {"best_of": args.best_of, "num_eval": args.num_eval,
              "eval_seeds": [args.eval_start, args.eval_start + args.num_eval - 1],
              "base": {"model_path": args.base, "sha256": file_digest(args.base), "success": float(pre_success.mean()),
                       "score": float(pre_score.mean())}, "rows": [],
              "machine": machine(jobs_side_by_side=args.parallel, threads_per_job=1)}
    for (run, row), out in outs.items():
        if (run, row) == ("base", "alone"):
            continue
        success, score = episodes(out, args.num_eval, args.eval_start)
        s_diff, s_ci = paired(success, pre_success)
        c_diff, c_ci = paired(score, pre_score)
        summary = json.load(open(out))["summary"]
        result["rows"].append({"run": run, "row": row, "model_path": jobs[(run, row)][0], "flags": jobs[(run, row)][1],
                               "success": float(success.mean()), "score": float(score.mean()),
                               "success_diff": s_diff, "success_diff_ci95": s_ci, "score_diff": c_diff,
                               "score_diff_ci95": c_ci, "starts": start_changes(success, score, pre_success, pre_score),
                               "wall_s_per_call": summary["wall_s_per_call"], "eval": out})
        print(f"{run} {row}: success {success.mean():.3f} ({s_diff:+.3f} [{s_ci[0]:+.3f}, {s_ci[1]:+.3f}]), score "
              f"{c_diff:+.4f}, {summary['wall_s_per_call']:.3f} s a call")
    save_result(args.json, result, vars(args))
    return result


if __name__ == "__main__":
    run_cli(main, parse_args, resume="")
