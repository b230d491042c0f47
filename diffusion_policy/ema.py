"""Exponential moving average of model weights, with the warm-up decay of Chi et al.

decay(step) = clip(1 - (1 + step / inv_gamma) ** -power, 0, max_decay), and 0 at step 0, so
early averages follow the model closely and later ones average over more steps. With
power = 0 the decay is max_decay from the first step on: a constant-decay average that starts
at the weights it was built from (fine-tuning: the pre-trained model).
"""

import contextlib
import copy

import torch


class EMA:
    """Keeps `self.model`, an averaged copy of the model given at construction."""

    def __init__(self, model, power=0.75, inv_gamma=1.0, max_decay=0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.inv_gamma, self.max_decay = power, inv_gamma, max_decay

    def decay(self, step):
        if self.power <= 0:
            return self.max_decay
        if step <= 0:
            return 0.0
        return min(max(1 - (1 + step / self.inv_gamma) ** -self.power, 0.0), self.max_decay)

    @torch.no_grad()
    def update(self, model, step):
        """ema <- decay * ema + (1 - decay) * model, for the optimisation step just taken (0-based)."""
        d = self.decay(step)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


@contextlib.contextmanager
def swapped_in(policy, model):
    """`policy` acting with noise model `model` (an EMA's, or None: its own) while the block runs, in
    eval mode; its own model and mode are back afterwards. The module is swapped in place and back:
    a shallow copy of the policy would share its module dict."""
    live, training = policy.model, policy.training
    policy.model = model if model is not None else live
    policy.eval()
    try:
        yield policy
    finally:
        policy.model = live
        policy.train(training)
