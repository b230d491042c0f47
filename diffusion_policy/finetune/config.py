"""What every fine-tuning method's config holds: the settings whose sensible value depends on
the method (each method's dataclass gives its own defaults) and the checks they share."""

from dataclasses import dataclass


@dataclass
class MethodConfig:
    num_ft_iters: int
    num_eps: int
    lr: float
    reward_scale: float  # lambda: the target is p_base(chunk | obs) exp(lambda r)
    grad_steps_per_iter: int
    ema_decay: float  # constant-decay EMA of the weights, saved as the policy; 0: off

    def __post_init__(self):
        for name in ("num_ft_iters", "num_eps", "grad_steps_per_iter"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.reward_scale >= 0:
            raise ValueError(f"reward_scale must be >= 0, got {self.reward_scale!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
