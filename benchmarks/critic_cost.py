"""What an optimiser step of the residual's critic ensemble costs per ensemble size (REDQ's 10 against 2).

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.critic_cost --sizes 2 5 10 --json benchmarks/results/critic_cost.json

One critic step as `--method residual` takes it (batch 256, the default 256-256 heads over the
observation window and the executed chunk): the target ensemble's minimum, the squared TD error
of every head, and the actor's pass through the heads, backward and AdamW. Timed for the
ensemble as shipped (`ChunkCritic`: one MLP per head, run in turn) and, beside it in the same
run, for the same heads batched into one matrix product per layer (torch.baddbmm): whether
batching would make a large ensemble affordable. The best of `--rounds` rounds, in ms.
"""

import argparse
import math
import time

import torch
from torch import nn

from benchmarks import add_output_flags, save_result
from diffusion_policy.common.cli import count, run_cli
from diffusion_policy.residual_policy import ChunkCritic


class BatchedCritic(nn.Module):
    """The same ensemble with each layer's heads in one (E, in, out) tensor: (B, C), (B, H, D) -> (E, B)."""

    def __init__(self, in_dim, hidden_dims, num_critics):
        super().__init__()
        sizes = [in_dim, *hidden_dims, 1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_critics, a, b).uniform_(-1, 1) / math.sqrt(a))
                                        for a, b in zip(sizes[:-1], sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_critics, 1, b)) for b in sizes[1:])
        self.gains = nn.ParameterList(nn.Parameter(torch.ones(num_critics, 1, h)) for h in hidden_dims)
        self.shifts = nn.ParameterList(nn.Parameter(torch.zeros(num_critics, 1, h)) for h in hidden_dims)

    def forward(self, cond, act):
        x = torch.cat([cond, act.flatten(1)], 1).expand(len(self.weights[0]), -1, -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < len(self.gains):
                x = torch.relu(nn.functional.layer_norm(x, x.shape[-1:]) * self.gains[k] + self.shifts[k])
        return x.squeeze(-1)


def step_ms(critic, target, cond, act, steps, rounds):
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-4)
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                goal = target(cond, act).min(0).values
            loss = ((critic(cond, act) - goal) ** 2).mean(1).sum() - critic(cond, act).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return round(best, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=count(1), nargs="+", default=[2, 5, 10], help="ensemble sizes (default 2 5 10)")
    p.add_argument("--steps", type=count(1), default=50, help="optimiser steps per round (default 50)")
    p.add_argument("--rounds", type=count(1), default=3, help="rounds; the best is kept (default 3)")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def main(args):
    torch.manual_seed(0)
    cond, act = torch.randn(256, 40), torch.randn(256, 8, 2)  # obs window (2 x 20), executed chunk (8 x 2)
    rows = []
    for size in args.sizes:
        shipped = step_ms(ChunkCritic(40, 16, (256, 256), size), ChunkCritic(40, 16, (256, 256), size), cond, act,
                          args.steps, args.rounds)
        batched = step_ms(BatchedCritic(56, (256, 256), size), BatchedCritic(56, (256, 256), size), cond, act,
                          args.steps, args.rounds)
        rows.append({"num_critics": size, "ms_per_step": shipped, "ms_per_step_batched": batched,
                     "batched_speedup": round(shipped / batched, 2)})
        print(rows[-1], flush=True)
    save_result(args.json, {"rows": rows, "threads": torch.get_num_threads()}, vars(args))
    return {"rows": rows}


if __name__ == "__main__":
    run_cli(main, parse_args)
