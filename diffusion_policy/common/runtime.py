"""Device choice, seeding, the optimiser step and the user-error type, shared by the scripts."""

import random

import numpy as np
import torch


def resolve_device(name="auto"):
    """'auto' -> CUDA if present, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but none is available here; use --device auto or cpu")
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch; returns a torch.Generator (CPU) seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def optimizer_step(loss, model, optimizer, scheduler, grad_clip):
    """Backpropagate `loss`, clip the gradient norm of `model` (grad_clip > 0), step both."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def resume_lr(optimizer, scheduler, lr):
    """After loading a resumed optimiser and LambdaLR scheduler, go on with peak learning rate `lr`
    (the run's --lr, which may be lower than the saved one: the advice a diverged run prints) for
    the first parameter group; any further groups (the residual method's critics) are scaled by
    the same factor. Returns the saved peak learning rate of the first group."""
    saved = scheduler.base_lrs[0]
    scheduler.base_lrs = [lr] + [b * lr / saved for b in scheduler.base_lrs[1:]]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    return saved


class UserError(RuntimeError):
    """A failure the user can fix (missing data, wrong checkpoint, diverged run): the message says how."""
