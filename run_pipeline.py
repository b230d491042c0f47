"""The whole method from one command: pre-train, collect, fit the reward, fine-tune, evaluate, report.

Usage:
    python run_pipeline.py                          # the CPU preset into data/runs/pipeline_cpu/
    python run_pipeline.py --rounds 2               # two rounds of collect -> reward -> fine-tune
    python run_pipeline.py --smoke                  # tiny settings, a few minutes (CI runs this)
    python run_pipeline.py --name mine --force      # redo every stage of data/runs/mine/

Each stage runs exactly as its own script would (the same `main`, with the preset's arguments,
written out as commands in report.md) into one run directory:

    <run_dir>/checkpoints/policy_pretrained.ckpt      pretrain_policy.py
    <run_dir>/reward/action_reward_data_<N>eps_rd<k>.npy  collect_rewards.py, round k
    <run_dir>/checkpoints/reward_model_rd<k>.ckpt     train_reward.py, round k
    <run_dir>/checkpoints/policy_finetuned_rd<k>.ckpt reward_finetuning.py, round k
    <run_dir>/eval/<policy>/eval.json, media/*.mp4    evaluate_policy.py, every policy
    <run_dir>/report.md, plots/*.png                  the comparison

Round k starts from round k - 1's fine-tuned policy (round 0 from the pre-trained one), which
is both the policy that collects the round's reward data and the base model of its
fine-tuning. Seeds: collection round k uses 200000 + k * num_eps ..., fine-tuning round k
300000 + k * num_ft_iters * num_eps ..., evaluation 100000 ... for every policy.

A stage whose output exists is skipped, and an interrupted stage resumes (--resume) from the
state it left (pre-training and fine-tuning: latest.ckpt; collection: partial.pt, its finished
batches; reward model: latest.pt), so rerunning the same command continues an
interrupted pipeline; --force redoes everything. The run directory's pipeline.json records
the preset and seed; a directory made by another run is refused before any work.
"""

import json
import os
import shlex
import shutil
import time


import collect_rewards
import evaluate_policy
import pretrain_policy
import reward_finetuning
import train_reward
from diffusion_policy.common.cli import Parser, count, preflight, run_cli
from diffusion_policy.report import write_report
from diffusion_policy.common.outputs import file_digest, hold_lock, record_difference, write_record
from diffusion_policy.common.atomic import atomic_open
from diffusion_policy.data.dataset import resolve_dataset_path
from diffusion_policy.common.runlog import run_info
from diffusion_policy.common.runtime import UserError
from diffusion_policy.common.seeds import EVAL_SEED_START, FINETUNE_SEED_START, REWARD_SEED_START

# Per-stage arguments of each preset, as command-line flags of the stage's script.
PRESETS = {
    # 66.6 min alone on 2 Intel Xeon cores for one round (benchmarks/results/pipeline_e2e.json).
    "cpu": {
        "pretrain": ["--preset", "cpu"],
        "collect": ["--num_eps", "300"],
        "reward": ["--num_epochs", "300", "--lr", "1e-2", "--batch_size", "256"],
        # the setting that meets issue #49's bar by the protocol with the learned gate (README, Results); the
        # method README's Adjoint Matching command is reward_finetuning.py with no --method
        "finetune": ["--method", "residual_step", "--actor_pessimism", "1", "--target_noise", "0.02", "--residual_ema",
                     "0.9999", "--act_value", "0.45"],
        "evaluate": ["--num_eps", "500"],  # fewer starts misjudge: +18.0 on 100 was +4.8 on 500 (issue #38)
        "videos": 3,
    },
    # Everything tiny: checks the hand-offs in a few minutes, says nothing about quality.
    "smoke": {
        "pretrain": ["--preset", "tiny", "--num_steps", "30", "--log_every", "10"],
        "collect": ["--num_eps", "6", "--max_steps", "40"],
        "reward": ["--num_epochs", "4", "--batch_size", "64", "--hidden_dims", "32", "32"],
        "finetune": ["--method", "residual_step", "--actor_pessimism", "1", "--target_noise", "0.02", "--residual_ema",
                     "0.9999", "--act_value", "0.45", "--num_ft_iters", "2", "--num_eps", "2", "--max_steps", "24",
                     "--grad_steps_per_iter", "4", "--batch_size", "8", "--buffer_size", "64", "--warmup_iters", "1",
                     "--explore_horizon", "6"],
        "evaluate": ["--num_eps", "3", "--max_steps", "40"],
        "videos": 1,
    },
}
MANIFEST = "pipeline.json"


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="cpu: the CPU preset of every stage (default); smoke: tiny settings for a quick check")
    p.add_argument("--smoke", action="store_true", help="shorthand for --preset smoke")
    p.add_argument("--rounds", type=count(1), default=1, help="rounds of collect -> train reward -> fine-tune")
    p.add_argument("--name", default=None, help="run name: the run directory is data/runs/<name> "
                                                "(default pipeline_<preset>)")
    p.add_argument("--run_dir", default=None, help="the run directory itself (overrides --name; default: data/runs/<name>)")
    p.add_argument("--dataset_path", default="./data/pusht/pusht_cchi_v7_replay.zarr", help="Push-T zarr store")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    p.add_argument("--seed", type=count(0), default=0, help="the seed every stage gets")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    p.add_argument("--wandb", default="off", choices=["off", "online", "offline"],
                   help="log every stage to Weights & Biases (off by default)")
    return p.parse_args(argv)


def check_run_dir(run_dir, identity, force):
    """Refuse a directory that holds another run's files; returns the manifest to write."""
    path = os.path.join(run_dir, MANIFEST)
    if os.path.exists(path):
        try:
            with open(path) as f:
                found = json.load(f).get("identity", {})
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON (empty or cut short): remove it if {run_dir} is yours to redo, "
                            "or pick another --name") from None
        diff = {k: (found.get(k), v) for k, v in identity.items() if found.get(k) != v}
        if diff and not force:
            raise UserError(f"{run_dir} holds another pipeline run ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                            f"pick another --name, or add --force to redo it with these settings")
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise UserError(f"{run_dir} is not empty and has no {MANIFEST}: it is not a pipeline run directory. "
                        f"Pick another --name or --run_dir")


class Pipeline:
    """Runs stages in order, skipping those whose output exists; remembers the commands."""

    def __init__(self, args, run_dir):
        self.args, self.run_dir = args, run_dir
        self.common = ["--seed", str(args.seed), "--device", args.device, "--wandb", args.wandb]
        self.commands, self.stages = [], []

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def stage(self, label, module, argv, output, resume_file=None):
        """Run `module.main` with argv unless `output` exists *and* was made from the same inputs and
        flags (its record: the stage's argv and the sha256 of every input file it names); a stale
        output is redone, saying why. --resume if the stage left resume_file and has no output yet."""
        argv = argv + self.common
        key = {"argv": [a for a in argv if a != "--resume"],
               "inputs": {a: file_digest(a) for a in argv if a != output and os.path.isfile(a)}}
        stale = record_difference(output, key) if not self.args.force else "--force"
        resume_dir = os.path.dirname(resume_file) if resume_file else None
        if resume_file and not self.args.force and os.path.exists(resume_file) and not os.path.exists(output):
            argv = argv + ["--resume"]
        command = "python " + os.path.basename(module.__file__) + " " + shlex.join(argv)
        self.commands.append((label, command))
        if stale is None:
            print(f"[pipeline] {label}: {output} is up to date, skipped")
            self.stages.append({"stage": label, "status": "skipped", "output": output})
            return None
        if os.path.exists(output):
            print(f"[pipeline] {label}: {output} is redone ({stale})")
            if resume_dir and os.path.isdir(resume_dir):  # its resumable state belongs to the stale output
                shutil.rmtree(resume_dir)
        elif self.args.force and resume_dir and os.path.isdir(resume_dir):
            shutil.rmtree(resume_dir)
        print(f"[pipeline] {label}: {command}", flush=True)
        started = time.time()
        result = module.main(module.parse_args(argv))
        write_record(output, key)
        self.stages.append({"stage": label, "status": "ran", "output": output,
                            "wall_s": round(time.time() - started, 1)})
        return result


def main(args):
    if args.smoke:
        args.preset = "smoke"
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    preset = PRESETS[args.preset]
    run_dir = args.run_dir or os.path.join("data", "runs", args.name or f"pipeline_{args.preset}")
    preflight(args.device, dirs={"--run_dir": run_dir})
    check_run_dir(run_dir, {"preset": args.preset, "seed": args.seed}, args.force)  # before any dataset fetch
    try:
        dataset = resolve_dataset_path(args.dataset_path)
    except Exception as e:  # DatasetError: its message says how to get the data
        raise UserError(str(e)) from e
    identity = {"preset": args.preset, "seed": args.seed, "dataset_path": os.path.abspath(dataset)}
    check_run_dir(run_dir, identity, args.force)
    with hold_lock(run_dir, "pipeline"):  # a second pipeline into this directory refuses at once
        return run_stages(args, preset, run_dir, dataset, identity)


def run_stages(args, preset, run_dir, dataset, identity):
    with atomic_open(os.path.join(run_dir, MANIFEST)) as f:
        json.dump({"identity": identity, "rounds": args.rounds, "info": run_info(args)}, f, indent=2)

    pipe = Pipeline(args, run_dir)
    started = time.time()
    pretrained = pipe.path("checkpoints", "policy_pretrained.ckpt")
    pipe.stage("pre-train", pretrain_policy,
               preset["pretrain"] + ["--dataset_path", dataset, "--output", pretrained,
                                     "--run_dir", pipe.path("pretrain")], pretrained, resume_file=pipe.path("pretrain", "latest.ckpt"))

    num_eps = int(_flag(preset["collect"], "--num_eps", 300))
    ft_defaults = reward_finetuning.parse_args([])
    ft_iters = int(_flag(preset["finetune"], "--num_ft_iters", ft_defaults.num_ft_iters))
    ft_eps = int(_flag(preset["finetune"], "--num_eps", ft_defaults.num_eps))
    policies = [("pretrained", pretrained)]
    previous = pretrained
    for k in range(args.rounds):
        data = pipe.path("reward", f"action_reward_data_{num_eps}eps_rd{k}.npy")
        pipe.stage(f"collect rd{k}", collect_rewards,
                   preset["collect"] + ["--model_path", previous, "--output", data,
                                        "--start_seed", str(REWARD_SEED_START + k * num_eps),
                                        "--run_dir", pipe.path(f"collect_rd{k}")], data,
                   resume_file=pipe.path(f"collect_rd{k}", "partial.pt"))
        reward = pipe.path("checkpoints", f"reward_model_rd{k}.ckpt")
        pipe.stage(f"reward model rd{k}", train_reward,
                   preset["reward"] + ["--action_reward_path", data, "--output", reward,
                                       "--run_dir", pipe.path(f"reward_rd{k}")], reward,
                   resume_file=pipe.path(f"reward_rd{k}", "latest.pt"))
        finetuned = pipe.path("checkpoints", f"policy_finetuned_rd{k}.ckpt")
        pipe.stage(f"fine-tune rd{k}", reward_finetuning,
                   preset["finetune"] + ["--noise_pred_model_path", previous, "--reward_model_path", reward,
                                         "--action_reward_path", data, "--output", finetuned,
                                         "--start_seed", str(FINETUNE_SEED_START + k * ft_iters * ft_eps),
                                         "--run_dir", pipe.path(f"finetune_rd{k}")],
                   finetuned, resume_file=pipe.path(f"finetune_rd{k}", "latest.ckpt"))
        policies.append((f"finetuned_rd{k}", finetuned))
        previous = finetuned

    evals = {}
    for name, ckpt in policies:
        out = pipe.path("eval", name, "eval.json")
        pipe.stage(f"evaluate {name}", evaluate_policy,
                   preset["evaluate"] + ["--model_path", ckpt, "--start_seed", str(EVAL_SEED_START), "--output", out],
                   out)
        vids = pipe.path("eval", name, "videos.json")
        pipe.stage(f"videos {name}", evaluate_policy,
                   ["--model_path", ckpt, "--num_eps", str(preset["videos"]),
                                              "--max_steps", _flag(preset["evaluate"], "--max_steps", "300"),
                                              "--save_vids", "--media_dir", pipe.path("media"), "--output", vids],
                   vids)
        with open(out) as f:
            evals[name] = json.load(f)
        with open(vids) as f:
            evals[name]["videos"] = json.load(f)["videos"]

    method = _flag(preset["finetune"], "--method", "adjoint")
    report = write_report(run_dir, args.preset, args.rounds, args.seed, method, policies, evals, pipe.commands,
                          pipe.stages, time.time() - started)
    print(f"[pipeline] wrote {report}")
    final = evals[policies[-1][0]]["summary"]
    return {"run_dir": run_dir, "report": report, "stages": pipe.stages,
            "summaries": {name: evals[name]["summary"] for name, _ in policies},
            "final_success_rate": final["success_rate"], "final_score": final["score"]}


def _flag(argv, flag, default):
    """The value after `flag` in an argv list, else default."""
    return argv[argv.index(flag) + 1] if flag in argv else default


if __name__ == "__main__":
    run_cli(main, parse_args, resume="")
