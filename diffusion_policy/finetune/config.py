"""What every fine-tuning method's config holds and what the loop calls on a method.

`LoopConfig`: the settings the loop itself reads (iterations, episodes, the learning rate, steps
per iteration), checked here; each method's dataclass gives its own defaults. `MethodConfig`
adds what the two methods that move the denoiser share: lambda of the tilt and the EMA.
`FinetuneMethod`: the loop's defaults for a method that trains the policy's noise model.
"""

import copy
from dataclasses import dataclass


@dataclass
class LoopConfig:
    num_ft_iters: int
    num_eps: int
    lr: float
    grad_steps_per_iter: int

    def __post_init__(self):
        for name in ("num_ft_iters", "num_eps", "grad_steps_per_iter"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class MethodConfig(LoopConfig):
    reward_scale: float  # lambda: the target is p_base(chunk | obs) exp(lambda r)
    ema_decay: float  # constant-decay EMA of the weights, saved as the policy; 0: off

    def __post_init__(self):
        super().__post_init__()
        if not self.reward_scale >= 0:
            raise ValueError(f"reward_scale must be >= 0, got {self.reward_scale!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")


class FinetuneMethod:
    """The loop's calls beyond collect / prepare / loss / summary, for a method that trains ft.model:
    its parameters, the module whose gradient norm is clipped, a hook after each optimiser step, and
    the method's own state for --resume (none)."""

    @staticmethod
    def make_policy(base, config):
        """The policy to train: a copy of the frozen base whose noise model takes gradients."""
        ft = copy.deepcopy(base)
        ft.model.requires_grad_(True)
        return ft

    def param_groups(self):
        return [{"params": list(self.ft.model.parameters())}]

    @property
    def clipped(self):
        return self.ft.model

    def after_step(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
