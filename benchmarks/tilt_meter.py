"""Did a fine-tuned policy reach its own target? The tilt meter on fixed states, before any evaluation.

Usage:
    python -m benchmarks.tilt_meter --model_path ./data/checkpoints/policy_finetuned_rd0.ckpt \
        --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt --reward_scale 100
    python -m benchmarks.tilt_meter --model_path A.ckpt B.ckpt --reward_source simulator --weighting best \
        --json benchmarks/results/tilt_meter.json
    python -m benchmarks.tilt_meter --model_path A.ckpt --extrapolate 1 2 3    # along the update (--extrapolate)

On --num_states calls of the pre-trained policy's rollouts from the tilt seed range (500000+),
each policy draws --num_samples fresh chunks per state, scored by the reward source. Reported
per policy: realised = E_policy[r] - E_base[r] and the exact tilt's predicted gain at
--reward_scale (or best-of---num_candidates with --weighting best) from the base's own
samples, each with a 95 % interval over states, and their ratio
(diffusion_policy/finetune/tilt.py). Minutes on 2 CPU cores (the simulator source steps an
env copy per chunk).
"""

import argparse
import os
import platform
import time

from benchmarks import add_output_flags, save_result
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.cli import count, nonnegative
from diffusion_policy.finetune.extrapolate import extrapolated_model
from diffusion_policy.finetune.sources import SOURCES, make_source
from diffusion_policy.finetune.tilt import build_tilt_meter
from diffusion_policy.finetune.weighted import WEIGHTINGS
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.runtime import resolve_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", nargs="+", required=True, help="fine-tuned policies to read")
    p.add_argument("--base_path", default="./data/checkpoints/policy_pretrained.ckpt",
                   help="the pre-trained policy (default: %(default)s)")
    p.add_argument("--reward_source", default="model", choices=SOURCES, help="model or simulator (default: model)")
    p.add_argument("--reward_model_path", default="./data/checkpoints/reward_model_rd0.ckpt",
                   help="reward model of the model source (default: %(default)s)")
    p.add_argument("--reward_scale", type=nonnegative, default=100.0, help="lambda of the predicted tilt (default 100)")
    p.add_argument("--weighting", default="softmax", choices=WEIGHTINGS,
                   help="softmax: exact tilt at lambda; best: best of --num_candidates (default softmax)")
    p.add_argument("--num_candidates", type=count(1), default=8, help="k of --weighting best (default 8)")
    p.add_argument("--num_states", type=count(1), default=64, help="fixed states (default 64)")
    p.add_argument("--num_samples", type=count(1), default=16, help="chunks per state and policy (default 16)")
    p.add_argument("--extrapolate", type=float, nargs="+", default=[1.0],
                   help="read each policy moved to base + s (policy - base) for each s, as reward_finetuning.py "
                        "--extrapolate s would save it (default 1: as it is)")
    p.add_argument("--max_steps", type=count(1), default=300, help="control steps of the state rollouts (default 300)")
    add_output_flags(p)
    return p.parse_args(argv)


def main(args):
    device = resolve_device(args.device)
    start = time.perf_counter()
    base = load_policy(args.base_path, device=device)
    reward_model = load_reward_model(args.reward_model_path, device=device) if args.reward_source == "model" else None
    source = make_source(args.reward_source, base, reward_model)
    meter = build_tilt_meter(base, source, args.reward_scale, args.num_states, args.num_samples, args.weighting,
                             args.num_candidates, args.max_steps)
    rows = []
    for path, scale in ((path, scale) for path in args.model_path for scale in args.extrapolate):
        policy = load_policy(path, device=device)
        if scale != 1.0:
            policy.model = extrapolated_model(base.model, policy.model, scale)
        row = {"model_path": path, "extrapolate": scale, **meter.measure(policy)}
        rows.append(row)
        print(f"{path}{f' x {scale:g}' if scale != 1.0 else ''}: realised {row['tilt_realised']:+.4f} [{row['tilt_realised_ci95'][0]:+.4f}, "
              f"{row['tilt_realised_ci95'][1]:+.4f}] of predicted {row['tilt_predicted']:+.4f} "
              f"({row['tilt_fraction']:.2f} x)")
    result = {"base_path": args.base_path, "reward_source": args.reward_source,
              "reward_model_path": args.reward_model_path if reward_model is not None else None,
              "reward_scale": args.reward_scale, "weighting": args.weighting, "num_states": len(meter.states),
              "num_samples": args.num_samples, "rows": rows, "wall_s": round(time.perf_counter() - start, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    save_result(args.json, result)
    return result


if __name__ == "__main__":
    main(parse_args())
