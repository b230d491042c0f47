"""Short pre-training probes that choose the CPU preset: validation loss at equal wall time.

Usage:
    python -m benchmarks.pretrain_sweep --minutes 6 --json benchmarks/results/pretrain_sweep.json

Each candidate (learning rate, batch size, width) trains for the same wall-clock budget on
this machine (constant learning rate after a short warm-up, no EMA) and is scored by the
noise-prediction MSE on the held-out validation episodes with fixed noise and timesteps,
so the numbers compare across candidates. It is a proxy for policy quality, used to rule out
unstable or slow settings, not to report success rates.
"""

import argparse
import json
import time

import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy.common.cli import positive
from diffusion_policy.data.dataset import (
    PushTLowdimDataset,
    load_pusht_arrays,
    resolve_dataset_path,
    split_episodes,
)
from diffusion_policy.ddpm import SamplerConfig
from diffusion_policy.model import UNetConfig
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig

CANDIDATES = [
    {"lr": 1e-4, "batch_size": 64, "down_dims": (64, 128, 256)},
    {"lr": 3e-4, "batch_size": 64, "down_dims": (64, 128, 256)},
    {"lr": 1e-3, "batch_size": 64, "down_dims": (64, 128, 256)},
    {"lr": 3e-4, "batch_size": 128, "down_dims": (64, 128, 256)},
    {"lr": 1e-3, "batch_size": 64, "down_dims": (32, 64, 128)},
]


def val_loss(policy, val):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        batch = val.batch(torch.arange(len(val)))
        return policy.compute_loss(batch["obs"], batch["action"], generator=g).item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", default=None, help="Push-T zarr (default data/pusht/...)")
    p.add_argument("--minutes", type=positive, default=6.0, help="wall-clock training budget per candidate")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def main(args):
    arrays = load_pusht_arrays(resolve_dataset_path(args.dataset_path))
    train_ids, val_ids = split_episodes(len(arrays["episode_ends"]), val_ratio=0.05, seed=42)
    train = PushTLowdimDataset(arrays, train_ids)
    val = PushTLowdimDataset(arrays, val_ids, obs_normalizer=train.obs_normalizer,
                             action_normalizer=train.action_normalizer)
    results = []
    for cand in CANDIDATES:
        torch.manual_seed(0)
        policy = DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=cand["down_dims"]), SamplerConfig(),
                                 train.obs_normalizer, train.action_normalizer)
        opt = torch.optim.AdamW(policy.model.parameters(), lr=cand["lr"], weight_decay=1e-6)
        g = torch.Generator().manual_seed(0)
        curve, step, start = [], 0, time.perf_counter()
        budget = args.minutes * 60
        while time.perf_counter() - start < budget:
            for group in opt.param_groups:
                group["lr"] = cand["lr"] * min(1.0, (step + 1) / 200)
            batch = train.batch(torch.randint(0, len(train), (cand["batch_size"],), generator=g))
            loss = policy.compute_loss(batch["obs"], batch["action"], generator=g)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
            opt.step()
            step += 1
            elapsed = time.perf_counter() - start
            if len(curve) < int(elapsed / (budget / 4)):
                curve.append({"minutes": round(elapsed / 60, 2), "step": step, "val_loss": round(val_loss(policy, val), 5)})
        row = {**cand, "down_dims": list(cand["down_dims"]), "steps": step,
               "val_loss": round(val_loss(policy, val), 5), "curve": curve}
        print(json.dumps(row), flush=True)
        results.append(row)
    save_result(args.json, {"rows": results}, vars(args))
    return {"results": results}


if __name__ == "__main__":
    main(parse_args())
