"""The judge of a fine-tuning setting: three training seeds, 500 held-out starts, paired intervals.

Usage:
    python -m benchmarks.finetune_protocol --name weighted_model -- --method weighted
    python -m benchmarks.finetune_protocol --name weighted_model --control -- --method weighted
    python -m benchmarks.finetune_protocol --name adjoint_model -- --clip_adjoint --action_reward_path ...
    python -m benchmarks.finetune_protocol --name weighted_sim -- --method weighted --reward_source simulator
    python -m benchmarks.finetune_protocol --name residual_model --parallel 1 --beside 1 -- --method residual &
    python -m benchmarks.finetune_protocol --name residual_model --parallel 1 --beside 1 --control -- --method residual
    python -m benchmarks.finetune_protocol --name residual_model --eval_name within30 --eval_args="--act_within 30" -- --method residual

Everything after `--` goes to reward_finetuning.py unchanged (the setting under test). The
protocol fine-tunes the same pre-trained policy (--model_path) with training seeds --seeds
(default 0 1 2), evaluates every fine-tuned policy and the pre-trained one on the same
held-out starts (--num_eval from 100000, default 500; a pilot: --eval_start 400000, the validation starts) with the same sampling noise
(evaluate_policy.py --seed 0), and compares each with the pre-trained policy start by start:

    success_diff = mean over starts of (success_ft - success_pre), with a paired 95 % interval
                   (normal approximation over the per-start differences)

Jobs run --parallel at a time (default 2), each with one thread (OMP_NUM_THREADS=1): on 2
cores two runs side by side take about the time of one. Runs whose checkpoint or evaluation
already exist under data/protocol/<name>/ are not redone, so an interrupted protocol resumes; each
records what made it (<file>.key.json: the start policy's sha256, the flags, the seed), and one made
from another policy or other flags is refused, naming the difference, never reused under the new
command. The pre-trained policy's evaluation is keyed by its file's sha256.
--eval_args judges a deployment setting of the same runs: the flags go to evaluate_policy.py for the
fine-tuned policies (not the pre-trained one), the runs of --name are reused (made if missing), their
evaluations are seed<S>_eval_<eval_name>.json and the result finetune_<name>_<eval_name>[_control].json.
--control adds --control to every run (the weights given to random candidates) and writes
finetune_<name>_control.json; a setting counts only if it beats its control. The JSON is
rewritten as each seed's evaluation ends. Written to benchmarks/results/finetune_<name>.json:
method, reward_source, command, runs (per seed: success, score, success_diff,
success_diff_ci95, score_diff, score_diff_ci95, starts (won, lost, ruined: score down by more than
0.5, the base's near misses and those converted), ruined_vs_other_noise (the starts ruined against the base
drawn with another sampling seed, 1: the scale on which a gated and an ungated policy compare), tilt_realised,
tilt_predicted, wall_s),
mean_success_diff, mean_score_diff, wall_s_per_run, pretrained (its path, sha256: 16 hex digits,
sha256_full, success and score, other_noise: its success and score under sampling seed 1 and the starts that draw
ruins against seed 0's: seeds written earlier under the same name are kept only if they
started from that very file), and what reruns it: config (the protocol's flags and each run's resolved reward_finetuning
config, seed as "S"), git_commit, machine.
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from diffusion_policy.common.atomic import atomic_open
from benchmarks import ROOT, eval_key, evaluation, file_digest, read_json, refuse_if_stale, reuse_or_make, save_result
from diffusion_policy.common.cli import count, run_cli
from diffusion_policy.common.runlog import machine
from diffusion_policy.common.runtime import UserError
from diffusion_policy.common.seeds import EVAL_SEED_START, VALIDATION_SEED_START
from diffusion_policy.common.stats import Z95, start_changes


def paired(ft, pre):
    """Mean of ft - pre over the same starts, and its 95 % interval [low, high]."""
    d = np.asarray(ft, float) - np.asarray(pre, float)
    half = Z95 * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)]


def episodes(eval_path, num_eval, start_seed):
    """(success, score) arrays of an eval.json, checked to cover exactly the protocol's starts."""
    eps = read_json(eval_path, "an evaluation")["episodes"]
    seeds = [e["seed"] for e in eps]
    if seeds != list(range(start_seed, start_seed + num_eval)):
        raise SystemExit(f"{eval_path} holds seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), not the protocol's")
    return np.array([e["success"] for e in eps], float), np.array([e["score"] for e in eps], float)


TILT_KEYS = ("tilt_realised", "tilt_realised_ci95", "tilt_predicted", "tilt_predicted_ci95", "tilt_fraction")


def last_tilt(run_dir):
    """The last tilt-meter reading of a fine-tuning run, or {}."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    for n, line in enumerate(open(path), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path} is damaged at line {n} (not JSON: cut short by a full disk or a killed process); "
                            "remove the run's checkpoint and run directory to make it again") from None
        if "tilt_realised" in row:
            rows.append(row)
    return {k: rows[-1][k] for k in TILT_KEYS} if rows else {}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ft_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the setting's name: benchmarks/results/finetune_<name>.json")
    p.add_argument("--control", action="store_true", help="run the setting's control (adds --control to every run)")
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="the pre-trained policy every run starts from (default: %(default)s)")
    p.add_argument("--seeds", type=count(0), nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--num_eval", type=count(1), default=500, help="held-out starts from --eval_start (default 500)")
    p.add_argument("--eval_start", type=count(EVAL_SEED_START), default=EVAL_SEED_START,
                   help=f"first evaluation start: {EVAL_SEED_START} (held out, the judge), or {VALIDATION_SEED_START} "
                        f"(validation: pilots) (default {EVAL_SEED_START})")
    p.add_argument("--parallel", type=count(1), default=2, help="jobs at a time, one thread each (default 2)")
    p.add_argument("--beside", type=count(0), default=0,
                   help="jobs of other processes running beside this protocol's, for the machine record (e.g. 1 "
                        "when a setting and its control run as two protocols of --parallel 1) (default 0)")
    p.add_argument("--eval_args", default="",
                   help="flags for evaluate_policy.py when it scores the fine-tuned policies, a deployment setting of the "
                        "same runs (e.g. --eval_args=\"--act_within 30\"); needs --eval_name (default: none)")
    p.add_argument("--eval_name", default=None,
                   help="the deployment setting's name: evaluations seed<S>_eval_<eval_name>.json, result "
                        "finetune_<name>_<eval_name>[_control].json")
    p.add_argument("--tilt_every", type=count(0), default=4,
                   help="tilt-meter readings during each run unless the setting gives its own (default 4)")
    p.add_argument("--out_dir", default="./data/protocol", help="checkpoints, runs and evaluations (default %(default)s)")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="where finetune_<name>.json goes (default benchmarks/results)")
    args = p.parse_args(own)
    args.ft_args = ft_args
    if bool(args.eval_args.strip()) != bool(args.eval_name):
        p.error("--eval_args and --eval_name go together: the evaluations of a deployment setting need a name of their own")
    if args.eval_name and not args.eval_name.replace("_", "").isalnum():
        p.error(f"argument --eval_name: letters, digits and _ only (it names files), got {args.eval_name!r}")
    return args


def run_job(cmd, env, log):
    """Run one job (a script's command line) to its end in a process of its own; its exit status.
    The tests swap in an in-process runner, which spares each job the interpreter's start."""
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def main(args):
    name = args.name + ("_control" if args.control else "")
    work = os.path.join(args.out_dir, name)  # the runs: shared by every deployment setting (--eval_args) of them
    eval_args = shlex.split(args.eval_args)
    eval_suffix = f"_eval_{args.eval_name}" if args.eval_name else "_eval"
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ft_args = list(args.ft_args) + (["--control"] if args.control else [])
    if "--tilt_every" not in ft_args:
        ft_args += ["--tilt_every", str(args.tilt_every)]
    lock = threading.Lock()

    failed = threading.Event()

    def run(cmd, log_path):
        if failed.is_set():  # one job failed: start nothing more
            raise SystemExit("stopped after an earlier failure")
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
        started = time.time()
        with open(log_path, "a") as log:
            returncode = run_job(cmd, env, log)
        if returncode:
            failed.set()
            raise SystemExit(f"failed ({returncode}): {' '.join(cmd)}; see {log_path}")
        return time.time() - started

    def train_key(seed):
        return {"start": model_digest, "flags": ft_args, "seed": seed}

    def evaluate(model_path, out, extra=()):
        return evaluation(model_path, out, args.num_eval, args.eval_start, extra, run=run)

    model_digest = file_digest(args.model_path)
    # the pre-trained policy's evaluation is shared by every setting judged against that very file
    starts = f"{args.num_eval}" if args.eval_start == EVAL_SEED_START else f"{args.eval_start}_{args.num_eval}"
    pre_eval = os.path.join(args.out_dir, f"pretrained_eval_{starts}_{model_digest}.json")
    # the base again under another draw of its sampling noise: the scale a ruined start is read on (a gated
    # policy's episodes are the base's own draws until the gate opens, so "ruined 0" against the same draw
    # says less than it seems; the base against itself ruins some)
    pre_eval_noise = os.path.join(args.out_dir, f"pretrained_eval_{starts}_{model_digest}_noise1.json")
    cmd_shown = ["python", "reward_finetuning.py", "--noise_pred_model_path", args.model_path, *ft_args, "--seed", "S"]
    wall_file = os.path.join(work, "wall_s.json")

    def walls():  # re-read: another protocol process of the same --name may have added its seeds
        if not os.path.exists(wall_file):
            return {}
        try:
            return json.load(open(wall_file))
        except ValueError:  # cut short: the wall times are a record, not a result; started afresh
            print(f"{wall_file} is damaged (not JSON): the wall times it held are lost, written again", flush=True)
            os.remove(wall_file)
            return {}

    def one_seed(seed):
        ckpt, run_dir = os.path.join(work, f"seed{seed}.ckpt"), os.path.join(work, f"seed{seed}")

        def train():
            wall = run([sys.executable, "reward_finetuning.py", "--noise_pred_model_path", args.model_path, *ft_args,
                        "--seed", str(seed), "--output", ckpt, "--run_dir", run_dir],
                       os.path.join(work, f"seed{seed}.log"))
            with lock:
                known = {**walls(), str(seed): round(wall, 1)}
                with atomic_open(wall_file) as f:
                    json.dump(known, f, indent=2)
            return ckpt

        reuse_or_make(ckpt, train_key(seed), train)
        return evaluate(ckpt, os.path.join(work, f"seed{seed}{eval_suffix}.json"), eval_args)

    # every cached output checked before any work: one made from other inputs is refused, never paired; a
    # damaged evaluation is made again, a damaged checkpoint or run record named in one line
    refuse_if_stale(pre_eval, eval_key(args.model_path, pre_eval, args.num_eval, args.eval_start), remake=True)
    refuse_if_stale(pre_eval_noise, eval_key(args.model_path, pre_eval_noise, args.num_eval, args.eval_start,
                                             sampling_seed=1), remake=True)
    for seed in args.seeds:
        ckpt, ckpt_eval = os.path.join(work, f"seed{seed}.ckpt"), os.path.join(work, f"seed{seed}{eval_suffix}.json")
        refuse_if_stale(ckpt, train_key(seed))
        if os.path.exists(ckpt):
            refuse_if_stale(ckpt_eval, eval_key(ckpt, ckpt_eval, args.num_eval, args.eval_start, eval_args), remake=True)
            read_json(os.path.join(work, f"seed{seed}", "config.json"), "the run's record")
            last_tilt(os.path.join(work, f"seed{seed}"))

    started = time.time()
    shown = " ".join(cmd_shown) + (f"; evaluated with {' '.join(eval_args)}" if eval_args else "")
    judged = args.name + (f"_{args.eval_name}" if args.eval_name else "") + ("_control" if args.control else "")
    result = {"name": judged, "command": shown, "seeds": args.seeds, "num_eval": args.num_eval,
              "eval_seeds": [args.eval_start, args.eval_start + args.num_eval - 1], "runs": {},
              "machine": machine(jobs_side_by_side=args.parallel + args.beside, threads_per_job=1)}
    out_path = os.path.join(args.results_dir, f"finetune_{judged}.json")

    def written_runs():  # the seeds another process of the same --name, command and start policy has written
        earlier = read_json(out_path, "the protocol's result") if os.path.exists(out_path) else {}
        same_start = earlier.get("pretrained", {}).get("sha256") == model_digest
        return earlier.get("runs", {}) if earlier.get("command") == result["command"] and same_start else {}

    result["runs"] = {s: r for s, r in written_runs().items() if int(s) not in args.seeds}
    config = {"protocol": {k: v for k, v in vars(args).items() if k != "ft_args"}, "finetune_args": ft_args}
    with ThreadPoolExecutor(args.parallel) as pool:
        pre_future = pool.submit(evaluate, args.model_path, pre_eval)  # first: later protocols reuse it
        # before the seeds, so that each seed's result is written as it ends (with --parallel 1 too)
        noise_future = pool.submit(evaluation, args.model_path, pre_eval_noise, args.num_eval, args.eval_start, (), run, 1)
        futures = {s: pool.submit(one_seed, s) for s in args.seeds}
        pre_success, pre_score = episodes(pre_future.result(), args.num_eval, args.eval_start)
        other_success, other_score = episodes(noise_future.result(), args.num_eval, args.eval_start)
        result["pretrained"] = {"model_path": args.model_path, "sha256": model_digest,
                                "sha256_full": file_digest(args.model_path, full=True), "success": float(pre_success.mean()),
                                "score": float(pre_score.mean()),
                                "other_noise": {"sampling_seed": 1, "success": float(other_success.mean()),
                                                "score": float(other_score.mean()),
                                                "ruined_vs_itself": start_changes(other_success, other_score, pre_success,
                                                                                  pre_score)["ruined"]}}
        for seed, future in futures.items():
            ft_success, ft_score = episodes(future.result(), args.num_eval, args.eval_start)
            run_dir = os.path.join(work, f"seed{seed}")
            run_config = {**read_json(os.path.join(run_dir, "config.json"), "the run's record")["config"], "seed": "S"}
            result.update(method=run_config["method"], reward_source=run_config["reward_source"])
            config["finetune"] = run_config
            s_diff, s_ci = paired(ft_success, pre_success)
            c_diff, c_ci = paired(ft_score, pre_score)
            result["runs"][str(seed)] = {
                "success": float(ft_success.mean()), "score": float(ft_score.mean()),
                "success_diff": s_diff, "success_diff_ci95": s_ci, "score_diff": c_diff, "score_diff_ci95": c_ci,
                "starts": start_changes(ft_success, ft_score, pre_success, pre_score),
                "ruined_vs_other_noise": start_changes(ft_success, ft_score, other_success, other_score)["ruined"],
                **last_tilt(run_dir), "wall_s": walls().get(str(seed)),
                "machine": result["machine"]["summary"]}  # seeds run in other sessions may be on another kind
            for s_, r in written_runs().items():  # keep seeds another process wrote meanwhile
                result["runs"].setdefault(s_, r)
            result["runs"] = dict(sorted(result["runs"].items(), key=lambda kv: int(kv[0])))
            result["seeds"] = [int(s_) for s_ in result["runs"]]
            runs = list(result["runs"].values())
            result["mean_success_diff"] = float(np.mean([r["success_diff"] for r in runs]))
            result["mean_score_diff"] = float(np.mean([r["score_diff"] for r in runs]))
            known = [r["wall_s"] for r in runs if r["wall_s"] is not None]
            result["wall_s_per_run"] = float(np.mean(known)) if known else None
            save_result(out_path, result, config)
            print(f"seed {seed}: success {ft_success.mean():.3f} ({s_diff:+.3f}, [{s_ci[0]:+.3f}, {s_ci[1]:+.3f}]), "
                  f"score {ft_score.mean():.3f} ({c_diff:+.4f}), tilt {result['runs'][str(seed)].get('tilt_realised')} "
                  f"of {result['runs'][str(seed)].get('tilt_predicted')}", flush=True)
    result["protocol_wall_s"] = round(time.time() - started, 1)
    save_result(out_path, result, config)
    print(f"{judged}: mean success diff {result['mean_success_diff']:+.3f}, mean score diff "
          f"{result['mean_score_diff']:+.4f} over seeds {result['seeds']} (pre-trained {result['pretrained']['success']:.3f})")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args, resume="")
