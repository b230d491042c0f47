"""A policy call's cost: this repo's UNet against the same UNet with torch's own Mish, side by side.

Usage:
    python -m benchmarks.call_cost
    python -m benchmarks.call_cost --model_path X.ckpt --batch 64 --rounds 7 --json benchmarks/results/call_cost.json

The UNet is about 90 % of every rollout (issue #38), and on the CPU torch's Mish kernel is about
15 % of a forward pass. diffusion_policy.model.mish computes the same function in one exp, in place
(without autograd). The reference is the same policy with every Mish module replaced by torch's
nn.Mish: the simplest form of the same call. Both sample the same observation windows with the same
noise; calls are timed in turn, `--rounds` times, and the median is reported, with the largest
difference of the two sampled chunks (normalised units) and each one's distance to the same call
in float64 (torch's Mish, every weight in double): the two are as accurate.
"""

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from benchmarks import add_output_flags, save_result
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.common.cli import count
from diffusion_policy.common.runlog import machine
from diffusion_policy.common.runtime import resolve_device
from diffusion_policy.model import Mish

PUBLISHED = "../shared/artifacts/pusht_cpu/policy_pretrained.ckpt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=PUBLISHED, help=f"policy checkpoint (default: the published base, {PUBLISHED})")
    p.add_argument("--batch", type=count(1), default=64, help="observation windows per call (envs stepped together)")
    p.add_argument("--rounds", type=count(1), default=7, help="times each call is timed, in turn (the median is kept)")
    p.add_argument("--seed", type=int, default=0, help="draws the observation windows and the sampling noise")
    add_output_flags(p)
    return p.parse_args(argv)


def with_torch_mish(module):
    """A copy of `module` with every Mish replaced by torch's nn.Mish (the reference)."""
    ref = copy.deepcopy(module)
    for parent in ref.modules():
        for name, child in parent.named_children():
            if isinstance(child, Mish):
                setattr(parent, name, nn.Mish())
    return ref


def main(args):
    device = resolve_device(args.device)
    policy = load_policy(args.model_path, device=device).eval()
    reference = copy.copy(policy)  # shares the normalisers and buffers; only its UNet differs
    reference_model = with_torch_mish(policy.model)
    assert not any(isinstance(m, Mish) for m in reference_model.modules())
    g = torch.Generator().manual_seed(args.seed)
    cfg = policy.config
    obs_cond = torch.rand(args.batch, cfg.obs_horizon * cfg.obs_dim, generator=g, device="cpu").to(device) * 2 - 1
    noise = torch.randn(policy.sampler_config.num_inference_steps + 1, args.batch, cfg.pred_horizon, cfg.action_dim,
                        generator=g).to(device)

    calls = {"ours": lambda: policy.sample(obs_cond, noise=noise),
             "torch_mish": lambda: reference.sample(obs_cond, noise=noise, model=reference_model)}
    times = {name: [] for name in calls}
    with torch.no_grad():
        chunks = {name: call() for name, call in calls.items()}  # also the warm-up
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        exact_model = copy.deepcopy(reference_model).double()
        exact_policy = copy.deepcopy(policy).double()
        exact = exact_policy.sample(obs_cond.double(), noise=noise.double(), model=exact_model)
    ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    result = {
        "model_path": args.model_path, "batch": args.batch,
        "down_dims": list(policy.model.config.down_dims),
        "ddpm_steps": policy.sampler_config.num_inference_steps, "threads": torch.get_num_threads(),
        "ms_per_call": {name: round(v, 2) for name, v in ms.items()},
        "ms_per_call_rounds": {name: [round(x * 1e3, 2) for x in t] for name, t in times.items()},
        "speedup": round(ms["torch_mish"] / ms["ours"], 3),
        "max_abs_diff": float((chunks["ours"] - chunks["torch_mish"]).abs().max()),
        "max_abs_diff_to_float64": {name: float((c.double() - exact).abs().max()) for name, c in chunks.items()},
        "machine": machine(),
    }
    print(f"a call of {args.batch} windows, {result['ddpm_steps']} DDPM steps, UNet {result['down_dims']}, "
          f"{result['threads']} thread(s): ours {ms['ours']:.1f} ms, torch's Mish {ms['torch_mish']:.1f} ms "
          f"(x{result['speedup']:.2f}); chunks differ by {result['max_abs_diff']:.2g} at most "
          f"(to float64: ours {result['max_abs_diff_to_float64']['ours']:.2g}, "
          f"torch's {result['max_abs_diff_to_float64']['torch_mish']:.2g})")
    save_result(args.json, result, vars(args))
    return result


if __name__ == "__main__":
    main(parse_args())
