"""What every fine-tuning method's config holds and what the loop calls on a method.

`LoopConfig`: the settings the loop itself reads (iterations, episodes, the learning rate, steps
per iteration), checked here; each method's dataclass gives its own defaults. `MethodConfig`
adds what the two methods that move the denoiser share: lambda of the tilt and the EMA.

`FinetuneMethod`: the interface the loop (reward_finetuning.py) runs a method through, with the
defaults of a method that trains no weights of the denoiser itself. A method is a subclass with
`name` (its --method value), `config_class` (its dataclass), `about` (one line of --help) and
`flags` (its own settings as command-line flags); the loop names none of them.
`DenoiserMethod`: the defaults of a method that trains the policy's noise model (adjoint,
weighted): a copy of the base that takes gradients, DDP across ranks, the EMA of its weights,
lambda as the tilt meter's scale.
"""

import copy
from dataclasses import dataclass

from diffusion_policy.checkpoint import policy_checkpoint
from diffusion_policy.common import distributed
from diffusion_policy.common.cli import count, fraction, nonnegative, positive
from diffusion_policy.common.runtime import UserError
from diffusion_policy.ema import EMA


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


# the loop's settings: every method has them, each with its own default ({field: (type, help)})
LOOP_FLAGS = {
    "num_ft_iters": (count(1), "fine-tuning iterations (rollouts + update)"),
    "num_eps": (count(1), "episodes rolled out per iteration (fresh seeds)"),
    "lr": (positive, "AdamW learning rate after warm-up (residual: the actor's)"),
    "grad_steps_per_iter": (count(1), "optimiser steps per iteration (residual: a step of batch 256 is about 8 ms "
                                      "on one Intel core, so the default's are about 16 s of each iteration)"),
}


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


TILT_FLAGS = {
    "reward_scale": (nonnegative, "lambda: the target is p_base * exp(lambda r)"),
    "ema_decay": (fraction, "constant-decay EMA of the weights, saved as the policy; 0: off"),
}


class FinetuneMethod:
    """The loop's calls on a method: class-level (before the run's objects exist) check_start,
    make_policy, make_ema, wrap, tilt_scale, describe; then per run collect / prepare / loss /
    summary (in each method's module), param_groups, clipped, after_step, checkpoint and the
    method's own resumable state."""

    name = ""  # the --method value
    config_class = LoopConfig
    about = ""  # one line for --help
    flags = {}  # the method's own settings beyond LOOP_FLAGS: {field: (type, help)}; type None: a switch
    nan_advice = ""  # what else to lower when the loss turns non-finite (appended to the message)

    @classmethod
    def check_start(cls, policy_ckpt, path, config, world):
        """Refuse, in one line, a start this method cannot take (the policy checkpoint at `path`)."""

    @classmethod
    def check_source(cls, config, reward_source, reward_ckpt):
        """Refuse, in one line, a reward source this config cannot use (reward_ckpt: the reward model's, or None)."""

    def check_resume(self, ckpt, path, base_path):
        """Refuse, in one line, to resume from the resumable checkpoint `ckpt` (at `path`) on the base at `base_path`."""

    @staticmethod
    def make_policy(base, config):
        raise NotImplementedError

    @classmethod
    def make_ema(cls, ft, config):
        """The EMA of the trained weights, saved as the policy; None: none kept."""
        return None

    @classmethod
    def wrap(cls, dist_info, model):
        """The module the loss calls (DDP under torchrun, where the method shards)."""
        return model

    @classmethod
    def tilt_scale(cls, config):
        """lambda of the one-chunk tilt the tilt meter predicts (0: the meter reports the reward's level)."""
        return 0.0

    @classmethod
    def describe(cls, config):
        """Words the run's banner adds after the method's name."""
        return ""

    def tilt_source(self, source):
        """What the tilt meter scores chunks by: the run's reward source, or what the method climbs instead."""
        return source

    def param_groups(self):
        raise NotImplementedError

    @property
    def clipped(self):
        """The module whose gradient norm is clipped at every optimiser step."""
        raise NotImplementedError

    def after_step(self):
        pass

    def checkpoint(self, ft, ema, train_state, provenance, metrics):
        """The policy checkpoint of the trained policy (what evaluate_policy.py and later rounds load)."""
        return policy_checkpoint(ft, ema.model if ema is not None else None, train_state, provenance, metrics)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class DenoiserMethod(FinetuneMethod):
    """A method that trains the policy's noise model itself (its config a MethodConfig)."""

    nan_advice = " with a lower --reward_scale"

    @classmethod
    def check_start(cls, policy_ckpt, path, config, world):
        if policy_ckpt.get("residual"):
            raise UserError(f"{path} carries a residual (--method residual); --method {cls.name} fine-tunes the "
                            "denoiser itself: start from a policy without a residual")

    @staticmethod
    def make_policy(base, config):
        """The policy to train: a copy of the frozen base whose noise model takes gradients."""
        ft = copy.deepcopy(base)
        ft.model.requires_grad_(True)
        return ft

    @classmethod
    def make_ema(cls, ft, config):
        return EMA(ft.model, power=0.0, max_decay=config.ema_decay) if config.ema_decay > 0 else None

    @classmethod
    def wrap(cls, dist_info, model):
        return distributed.wrap(dist_info, model)

    @classmethod
    def tilt_scale(cls, config):
        return config.reward_scale

    @classmethod
    def describe(cls, config):
        return f" with lambda = {config.reward_scale}"

    def param_groups(self):
        return [{"params": list(self.ft.model.parameters())}]

    @property
    def clipped(self):
        return self.ft.model
