"""Held-out success per minute of pre-training: which width and how many steps the CPU preset should be.

Usage:
    python -m benchmarks.pretrain_study --measure                  # step and call cost per width, one thread
    python -m benchmarks.pretrain_study --rows narrow_1x           # pre-train and evaluate rows (cached)
    python -m benchmarks.pretrain_study --plot docs/pretrain_study.png

Every row is a policy pre-trained by `pretrain_policy.py` (seed 0, the CPU preset but for the
row's width, learning rate and steps; the cosine schedule over its own length) and evaluated on
the 500 held-out starts 100000-100499 with sampling seed 0, paired start by start with the
published base (`--base`, the preset's own policy: the row `preset_1x`, not retrained) on the
same starts. A row's wall time is the preset's wall time times `time`: its steps are the preset's
10,000 times `time` times the measured ratio of the preset's training step to the row's
(`--measure`, the two widths' steps timed in turn on one thread, so both see the same load).
`--measure` also times a policy call (64 observation windows, 10 DDPM steps): what every later
stage pays per call.

Writes benchmarks/results/pretrain_study.json (`--json`): cost (per width: parameters, ms per
training step and per call), rows (per row: width, lr, steps, pre-training wall, success, score,
paired differences [95 %], won/lost/ruined starts, per-call cost), config, commit and machine.
Checkpoints and evaluations go to --out_dir (default ./data/study); each is reused only if its
record (flags, inputs' sha256) matches. A row stopped part-way (the session ended) resumes from its
last checkpoint when run again, its wall time carried over (`carry_wall`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks import ROOT, evaluation, file_digest, reuse_or_make, save_result
from benchmarks.finetune_protocol import episodes, paired
from diffusion_policy.common.cli import positive, run_cli
from diffusion_policy.common.runlog import machine
from diffusion_policy.common.seeds import EVAL_SEED_START
from diffusion_policy.common.stats import start_changes

PRESET = {"down_dims": (64, 128, 256), "lr": 3e-4, "steps": 10_000}
WIDTHS = {"preset": (64, 128, 256), "narrow": (32, 64, 128)}
ROWS = {  # name: (width, lr, time as a multiple of the preset's pre-training wall time, DDPM steps a call)
    "preset_1x": ("preset", 3e-4, 1.0, 10),  # the published base itself
    "preset_2x": ("preset", 3e-4, 2.0, 10),
    "narrow_1x": ("narrow", 1e-3, 1.0, 10),  # the sweep's best learning rate at this width
    "narrow_2x": ("narrow", 1e-3, 2.0, 10),
    # the same weights as the row before "_k", sampled with k DDPM steps: a call costs k / 10
    "preset_1x_k5": ("preset", 3e-4, 1.0, 5),
    "preset_1x_k20": ("preset", 3e-4, 1.0, 20),
}
TRAIN_STEPS = 10  # the DDPM steps of a call at which --measure times it (the checkpoints' own)
NUM_EVAL = 500


def build(down_dims, arrays=None):
    from diffusion_policy.data.dataset import PushTLowdimDataset, load_pusht_arrays, resolve_dataset_path, split_episodes
    from diffusion_policy.ddpm import SamplerConfig
    from diffusion_policy.model import UNetConfig
    from diffusion_policy.policy import DiffusionPolicy, PolicyConfig
    arrays = arrays or load_pusht_arrays(resolve_dataset_path(None))
    train = PushTLowdimDataset(arrays, split_episodes(len(arrays["episode_ends"]), val_ratio=0.05, seed=42)[0])
    torch.manual_seed(0)
    policy = DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=down_dims), SamplerConfig(),
                             train.obs_normalizer, train.action_normalizer)
    return policy, train, arrays


def measure(rounds=5, steps=20):
    """ms per training step (batch 64) and per policy call (64 windows), per width: timed in turn,
    `rounds` times, on this process's threads; the median of the rounds."""
    arrays, runs = None, {}
    for name, dims in WIDTHS.items():
        policy, train, arrays = build(dims, arrays)
        opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)
        runs[name] = (policy, train, opt)
    g = torch.Generator().manual_seed(0)
    times = {name: {"step": [], "call": []} for name in WIDTHS}
    for _ in range(rounds):
        for name, (policy, train, opt) in runs.items():
            policy.train()
            start = time.perf_counter()
            for _ in range(steps):
                batch = train.batch(torch.randint(0, len(train), (64,), generator=g))
                loss = policy.compute_loss(batch["obs"], batch["action"], generator=g)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name]["step"].append((time.perf_counter() - start) / steps * 1e3)
            policy.eval()
            obs = torch.as_tensor(arrays["obs"][:64 * policy.config.obs_horizon]).view(64, policy.config.obs_horizon, -1)
            start = time.perf_counter()
            policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
            times[name]["call"].append((time.perf_counter() - start) * 1e3)
    return {name: {"down_dims": list(WIDTHS[name]),
                   "parameters": sum(p.numel() for p in runs[name][0].model.parameters()),
                   "ms_per_step": round(float(np.median(t["step"])), 2),
                   "ms_per_call": round(float(np.median(t["call"])), 2)} for name, t in times.items()}


def row_steps(row, cost):
    width, _, factor, _ = ROWS[row]
    ratio = cost["preset"]["ms_per_step"] / cost[width]["ms_per_step"]
    return int(round(PRESET["steps"] * factor * ratio, -2))


def run_row(row, cost, args, base_eval):
    width, lr, factor, k = ROWS[row]
    trained = row.split("_k")[0]  # a row of fewer DDPM steps samples the weights of the row it names
    ckpt = os.path.join(args.out_dir, f"{trained}.ckpt")
    steps = row_steps(trained, cost)
    if trained == "preset_1x":  # its wall time as its own run logged it
        ckpt = args.base
        wall = torch.load(ckpt, map_location="cpu", weights_only=True)["metrics"].get("elapsed_s")
    else:
        cmd = [sys.executable, "pretrain_policy.py", "--down_dims", *map(str, WIDTHS[width]), "--lr", str(lr),
               "--num_steps", str(steps), "--seed", "0", "--output", ckpt, "--run_dir", ckpt + "_run"]
        if args.dataset_path:
            cmd += ["--dataset_path", args.dataset_path]
        wall_file = ckpt + ".wall_s"
        reuse_or_make(ckpt, {"flags": cmd[2:-4]}, lambda: train_row(cmd, ckpt))
        wall = float(open(wall_file).read()) if os.path.exists(wall_file) else None
    out = evaluate(ckpt, args, k)
    success, score = episodes(out, NUM_EVAL, EVAL_SEED_START)
    pre_success, pre_score = episodes(base_eval, NUM_EVAL, EVAL_SEED_START)
    s_diff, s_ci = paired(success, pre_success)
    c_diff, c_ci = paired(score, pre_score)
    return {"row": row, "width": width, "down_dims": list(WIDTHS[width]), "lr": lr, "time": factor, "ddpm_steps": k,
            "steps": steps if trained != "preset_1x" else PRESET["steps"], "pretrain_wall_s": wall,
            "sha256": file_digest(ckpt, full=True), "success": float(success.mean()), "score": float(score.mean()),
            "success_diff": s_diff, "success_diff_ci95": s_ci, "score_diff": c_diff, "score_diff_ci95": c_ci,
            "starts": start_changes(success, score, pre_success, pre_score),
            # a call is k UNet forwards (the sampler's own arithmetic is negligible): --measure's time at 10 steps x k / 10
            "ms_per_call": round(cost[width]["ms_per_call"] * k / TRAIN_STEPS, 2)}


def train_row(cmd, ckpt):
    """Run the row's pre-training `cmd` (its --output ckpt, --run_dir ckpt + "_run"), resuming an
    interrupted one; writes its wall time, carried over interruptions, to <ckpt>.wall_s."""
    carried = carry_wall(ckpt)
    started = time.time()
    with open(ckpt + ".log", "a") as log:
        subprocess.run(cmd + (["--resume"] if carried["step"] else []), cwd=ROOT, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    with open(ckpt + ".wall_s", "w") as f:
        f.write(str(round(carried["wall_s"] + time.time() - started, 1)))
    return ckpt


def carry_wall(ckpt):
    """An interrupted row resumes from its last checkpoint (<ckpt>_run/latest.ckpt, every 1,000 steps):
    the wall time of the steps it holds is carried over ({"step", "wall_s"} in <ckpt>.wall_carried:
    each interrupted run adds the elapsed time its last checkpoint recorded; steps redone after
    the checkpoint count once, when redone). {"step": 0, ...} when there is nothing to resume."""
    record_file = ckpt + ".wall_carried"
    record = json.load(open(record_file)) if os.path.exists(record_file) else {"step": 0, "wall_s": 0.0}
    latest = os.path.join(ckpt + "_run", "latest.ckpt")
    if os.path.exists(latest):
        saved = torch.load(latest, map_location="cpu", weights_only=False)
        step = saved["train_state"]["step"]
        if step > record["step"]:  # this run got further than the last one carried: add its time
            record = {"step": step, "wall_s": record["wall_s"] + float(saved["metrics"]["elapsed_s"])}
            with open(record_file, "w") as f:
                json.dump(record, f)
    return record


def evaluate(ckpt, args, k=TRAIN_STEPS):
    extra = ["--num_inference_steps", str(k)] if k != TRAIN_STEPS else []
    return evaluation(ckpt, os.path.join(args.out_dir, f"eval_{file_digest(ckpt)}{f'_k{k}' if extra else ''}.json"),
                      NUM_EVAL, EVAL_SEED_START, extra)


def plot(result, path):
    """Left: success against pre-training time, one line per width (the checkpoints' 10 DDPM steps);
    right: every row's success against its cost per call. Bars: the paired 95 % interval, drawn
    around each row's success (the base's own row has none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    base_wall = next((r["pretrain_wall_s"] for r in result["rows"] if r["row"] == "preset_1x"), None)

    def bars(rows):
        return ([r["success"] - r["success_diff"] + r["success_diff_ci95"][0] for r in rows],
                [r["success"] - r["success_diff"] + r["success_diff_ci95"][1] for r in rows])

    for width, marker in (("preset", "o"), ("narrow", "s")):
        rows = sorted((r for r in result["rows"] if r["width"] == width and r.get("ddpm_steps", TRAIN_STEPS) == TRAIN_STEPS),
                      key=lambda r: r["time"])
        if rows:
            x = [r["time"] for r in rows]
            left.plot(x, [r["success"] for r in rows], marker=marker,
                      label=f"UNet {'/'.join(map(str, WIDTHS[width]))} ({rows[0]['ms_per_call']:.0f} ms a call)")
            left.vlines(x, *bars(rows), alpha=0.4)
    left.set_xlabel("pre-training wall time, multiples of the preset's" + (f" ({base_wall / 60:.0f} min)" if base_wall else ""))
    left.set_xlim(0.5, 2.5)
    left.set_ylabel(f"held-out success ({NUM_EVAL} starts)")
    left.set_title(f"against pre-training time ({TRAIN_STEPS} DDPM steps a call)", fontsize=9)
    left.legend(fontsize=8)
    rows = result["rows"]
    right.scatter([r["ms_per_call"] for r in rows], [r["success"] for r in rows], color="k", s=14)
    right.vlines([r["ms_per_call"] for r in rows], *bars(rows), alpha=0.4)
    for r in rows:
        right.annotate(r["row"], (r["ms_per_call"], r["success"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    right.set_xscale("log")
    right.set_xlabel("ms per policy call (64 windows, one thread; log scale)")
    right.set_title("against the cost of a call (rows _kK: K DDPM steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="time a training step and a policy call per width")
    p.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS), help="rows to pre-train and evaluate")
    p.add_argument("--plot", default=None, help="draw the study's rows into this PNG")
    p.add_argument("--base", default="../shared/artifacts/pusht_cpu/policy_pretrained.ckpt",
                   help="the published base: the row preset_1x and what every row pairs with (default %(default)s)")
    p.add_argument("--dataset_path", default=None, help="Push-T zarr (default: $PUSHT_DATASET or data/pusht/...)")
    p.add_argument("--out_dir", default="./data/study", help="checkpoints and evaluations (default %(default)s)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "pretrain_study.json"),
                   help="the study's JSON, read and extended (default benchmarks/results/pretrain_study.json)")
    p.add_argument("--rounds", type=positive, default=5, help="--measure: timing rounds per width (default 5)")
    return p.parse_args(argv)


def main(args):
    result = json.load(open(args.json)) if os.path.exists(args.json) else {"rows": []}
    if args.measure:
        result["cost"] = measure(int(args.rounds))
        result["cost_machine"] = machine(jobs_side_by_side=1, threads_per_job=torch.get_num_threads())
        print(json.dumps(result["cost"], indent=1))
    if args.rows:
        if "cost" not in result:
            raise SystemExit(f"{args.json} has no cost yet: run --measure first (the rows' steps follow from it)")
        os.makedirs(args.out_dir, exist_ok=True)
        base_eval = evaluate(args.base, args)
        for row in args.rows:
            done = run_row(row, result["cost"], args, base_eval)
            result["rows"] = [r for r in result["rows"] if r["row"] != row] + [done]
            print(json.dumps({k: done[k] for k in ("row", "steps", "pretrain_wall_s", "success", "success_diff",
                                                   "success_diff_ci95")}), flush=True)
            save_result(args.json, {k: v for k, v in result.items() if k not in ("config", "git_commit")},
                        {"rows": ROWS, "preset": PRESET, "num_eval": NUM_EVAL, "base": args.base})
    if args.measure and not args.rows:
        save_result(args.json, {k: v for k, v in result.items() if k not in ("config", "git_commit")},
                    {"rows": ROWS, "preset": PRESET, "num_eval": NUM_EVAL, "base": args.base})
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
