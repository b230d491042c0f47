"""Running under torchrun: process group, device per rank, and the few collectives the scripts use.

Without a launcher (no WORLD_SIZE in the environment) everything here is a no-op and a script
behaves exactly as a single process. Under

    torchrun --standalone --nproc_per_node=N script.py ...          # one machine
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:PORT --rdzv_id=JOB script.py ...   # several machines

each process gets RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins the group (NCCL on GPUs, gloo
on CPUs) and picks cuda:LOCAL_RANK when CUDA is used.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffusion_policy.common.runtime import resolve_device


@dataclass
class Dist:
    """Where this process stands: rank, world size, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, items):
        """This rank's contiguous share of `items` (the first ranks take one more if uneven)."""
        n, w, r = len(items), self.world_size, self.rank
        start = r * (n // w) + min(r, n % w)
        return items[start:start + n // w + (1 if r < n % w else 0)]


def is_main_process():
    """Rank 0 under torchrun, or a single process (read from the environment torchrun sets)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device_arg="auto"):
    """Join the process group if launched by torchrun; returns a Dist (world size 1 otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=resolve_device(device_arg))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def run(fn, args):
    """fn(args, Dist) inside the process group (if any), which is left however fn ends."""
    d = setup(args.device)
    try:
        return fn(args, d)
    finally:
        cleanup(d)


def cleanup(d):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(d, values):
    """All-reduce a dict of floats to their mean over ranks (unchanged in one process)."""
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(d.device)
    dist.all_reduce(t)
    return {k: float(v) / d.world_size for k, v in zip(keys, t.cpu().tolist())}


def gather_objects(d, obj):
    """A list of every rank's `obj` in rank order on every rank ([obj] in one process)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d):
    if d.enabled:
        dist.barrier()


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap(d, model):
    """DistributedDataParallel around `model` under torchrun, else the model itself."""
    if not d.enabled:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def param_digest(model):
    """SHA-256 of a model's parameters, bit for bit: equal on every rank while they stay in sync."""
    import hashlib

    h = hashlib.sha256()
    for p in unwrap(model).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
