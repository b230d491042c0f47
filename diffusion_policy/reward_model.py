"""The learned reward: r(observation window, action chunk) -> scalar, one MLP or two composed.

Inputs are normalised with the policy's own min-max normalisers (stored here, so the reward
model and the policy agree on what a normalised chunk is): the observation window
(obs_horizon, obs_dim) and the whole predicted action chunk (pred_horizon, 2), flattened and
concatenated (or only the executed steps of the chunk, `action_steps`). The output is trained on a standardised target and mapped back, so `reward`
returns values in the target's units. `reward` is differentiable in the action chunk;
fine-tuning takes its gradient with respect to the normalised chunk.

Two structures (`RewardModelConfig.structure`):

    direct    one MLP: (window, chunk) -> reward
    dynamics  two MLPs, composed: the chunk's effect, (window, chunk) -> the observation after the
              chunk's executed steps (as a change of the window's last frame), and the value of an
              observation, frame -> reward. reward = value(last frame + effect). Both are learned
              from the collected rows (each row records the observation its chunk led to), so the
              model is taught what a chunk does to the scene, not only one number about it.
"""

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from diffusion_policy.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from diffusion_policy.model import mlp
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.reward_data import TARGETS


STRUCTURES = ("direct", "dynamics")



@dataclass
class RewardModelConfig:
    """Shape and structure of the reward model; validates itself."""

    obs_horizon: int = 2
    obs_dim: int = 20
    pred_horizon: int = 16
    action_dim: int = 2
    hidden_dims: tuple = field(default=(256, 256))
    target: str = "reward_after"
    # chunk steps [start, stop) the model reads; None: the whole chunk (what train_reward.py fits).
    # Checkpoints of the dropped --executed_only variant (docs/findings.md) read the executed steps
    action_steps: tuple = None
    structure: str = "direct"  # or "dynamics": value(observation the chunk leads to); see the module

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.structure == "dynamics" and self.target != "reward_after":
            raise ValueError(f"the dynamics structure predicts the reward of the observation a chunk leads to: its "
                             f"target is reward_after, not {self.target!r}")
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive sizes, got {self.hidden_dims}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if min(self.obs_horizon, self.obs_dim, self.pred_horizon, self.action_dim) < 1:
            raise ValueError(f"dimensions must be positive: {self}")
        if self.action_steps is not None:
            self.action_steps = tuple(int(i) for i in self.action_steps)
            start, stop = self.action_steps
            if not 0 <= start < stop <= self.pred_horizon:
                raise ValueError(f"action_steps must be [start, stop) within the {self.pred_horizon}-step chunk, "
                                 f"got {self.action_steps}")

    @property
    def chunk_steps(self):
        return self.action_steps or (0, self.pred_horizon)

    @property
    def input_dim(self):
        start, stop = self.chunk_steps
        return self.obs_horizon * self.obs_dim + (stop - start) * self.action_dim

    def to_dict(self):
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        d["action_steps"] = None if self.action_steps is None else list(self.action_steps)
        return d


class RewardModel(nn.Module):
    """r(obs window, action chunk); normalisers and target statistics kept as buffers."""

    def __init__(self, config: RewardModelConfig, obs_normalizer: MinMaxNormalizer,
                 action_normalizer: MinMaxNormalizer, target_mean=0.0, target_std=1.0):
        super().__init__()
        self.config = config
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))
        if config.structure == "direct":
            self.net = mlp(config.input_dim, config.hidden_dims, 1)
        else:
            self.net = mlp(config.input_dim, config.hidden_dims, config.obs_dim)  # the chunk's effect
            self.value = mlp(config.obs_dim, config.hidden_dims, 1)  # an observation frame's reward
            # per-dimension scale of the effect (the normalised change's std on the training rows)
            self.register_buffer("effect_scale", torch.ones(config.obs_dim))

    def forward(self, obs_norm, action_norm):
        """Standardised prediction from normalised inputs: (B, To, Do), (B, Tp, Da) -> (B,)."""
        if self.config.structure == "dynamics":
            return self.value(self.next_obs(obs_norm, action_norm)).squeeze(-1)
        return self.net(self.inputs(obs_norm, action_norm)).squeeze(-1)

    def inputs(self, obs_norm, action_norm):
        start, stop = self.config.chunk_steps
        return torch.cat([obs_norm.flatten(1), action_norm[:, start:stop].flatten(1)], dim=-1)

    def next_obs(self, obs_norm, action_norm):
        """dynamics: the normalised observation the chunk leads to, (B, To, Do), (B, Tp, Da) -> (B, Do)."""
        return obs_norm[:, -1] + self.net(self.inputs(obs_norm, action_norm)) * self.effect_scale

    def dynamics_loss(self, obs_norm, action_norm, after_norm, y_before, y_after):
        """dynamics: the fit of both parts, every target standardised: the value of the observed frames
        before and after (reward_before, reward_after), the effect against the observed change, and
        their composition (what `forward` returns) against reward_after."""
        effect = self.net(self.inputs(obs_norm, action_norm))
        now, b = obs_norm[:, -1], len(obs_norm)
        value = self.value(torch.cat([now, after_norm, now + effect * self.effect_scale])).squeeze(-1)  # one pass
        mse = nn.functional.mse_loss
        return (mse(value[:b], y_before) + mse(value[b:2 * b], y_after)
                + mse(effect, (after_norm - now) / self.effect_scale) + mse(value[2 * b:], y_after))

    def reward(self, obs_window, action_chunk, normalized=False):
        """The reward in target units: (B, To, Do), (B, Tp, Da) -> (B,).

        normalized=False: raw pixels in; True: already-normalised inputs (the policy's space).
        """
        if not normalized:
            obs_window = self.obs_normalizer.normalize(obs_window)
            action_chunk = self.action_normalizer.normalize(action_chunk)
        return self(obs_window, action_chunk) * self.target_std + self.target_mean

    def frame_reward(self, frames):
        """dynamics: the reward of observation frames, raw (B, Do) -> (B,) in target units (the value part)."""
        if self.config.structure != "dynamics":
            raise ValueError(f"only a dynamics reward model values a single frame; this one is {self.config.structure}")
        return self.value(self.obs_normalizer.normalize(frames)).squeeze(-1) * self.target_std + self.target_mean


def reward_checkpoint(model, provenance=None, metrics=None, train_state=None):
    return {
        "format_version": FORMAT_VERSION,
        "kind": "reward",
        "config": {"reward_model": model.config.to_dict()},
        "normalizer": {
            "obs": {"low": model.obs_normalizer.low.cpu().clone(), "high": model.obs_normalizer.high.cpu().clone()},
            "action": {"low": model.action_normalizer.low.cpu().clone(),
                       "high": model.action_normalizer.high.cpu().clone()},
        },
        "target": {"name": model.config.target, "mean": float(model.target_mean), "std": float(model.target_std)},
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "train_state": train_state,
        "provenance": provenance or {},
        "metrics": metrics or {},
    }


def reward_model_from_checkpoint(ckpt, device="cpu"):
    model = RewardModel(RewardModelConfig(**ckpt["config"]["reward_model"]),
                        MinMaxNormalizer(**ckpt["normalizer"]["obs"]), MinMaxNormalizer(**ckpt["normalizer"]["action"]),
                        ckpt["target"]["mean"], ckpt["target"]["std"])
    model.load_state_dict(ckpt["model_state_dict"])
    return model.to(device).eval()


def load_reward_model(path, device="cpu"):
    """A reward model ready to score, from a reward checkpoint file."""
    return reward_model_from_checkpoint(load_checkpoint(path, "reward"), device)


def check_fits_policy(reward_ckpt, policy_ckpt, reward_path, policy_path):
    """Refuse a reward model whose observation or chunk shape is not the policy's."""
    r, p = reward_ckpt["config"]["reward_model"], policy_ckpt["config"]["policy"]
    keys = ("obs_horizon", "obs_dim", "pred_horizon", "action_dim")
    differ = {k: (r.get(k), p.get(k)) for k in keys if r.get(k) != p.get(k)}
    if differ:
        raise CheckpointError(f"the reward model {reward_path} does not fit the policy {policy_path}: "
                              + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
                              + "; train the reward model on data collected with this policy")


@dataclass
class FitRows:
    """Reward data prepared for fitting a RewardModel (train_reward.py): inputs normalised (on the
    run's device), the split, the targets standardised by the training rows' mean and std, and what
    validation reads."""

    columns: dict  # the reward data's columns (rows without a target dropped)
    is_val: np.ndarray  # (N,) bool: the row's episode is held out
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    y: torch.Tensor  # the target, in its own units
    mean: float
    std: float
    x_obs: torch.Tensor  # normalised observation windows
    x_act: torch.Tensor  # normalised whole chunks
    y_std: torch.Tensor  # the standardised target
    val_states: np.ndarray  # a key per validation state (episode, call): its chunks share it
    val_coverage: np.ndarray  # the validation rows' coverage before the chunk
    x_after: torch.Tensor | None = None  # dynamics structure: the normalised frame each chunk led to
    y_before: torch.Tensor | None = None  # ... and the standardised reward before the chunk

    def predict(self, model, idx):
        """The model's predictions for rows idx, in target units, as numpy."""
        with torch.no_grad():
            return (model(self.x_obs[idx], self.x_act[idx]) * self.std + self.mean).cpu().numpy()

    def loss(self, model, idx, structure):
        if structure == "dynamics":
            return model.dynamics_loss(self.x_obs[idx], self.x_act[idx], self.x_after[idx], self.y_before[idx],
                                       self.y_std[idx])
        return torch.nn.functional.mse_loss(model(self.x_obs[idx], self.x_act[idx]), self.y_std[idx])
