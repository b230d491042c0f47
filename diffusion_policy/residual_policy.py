"""A bounded residual on a frozen diffusion policy's executed actions (`--method residual`).

The base samples its chunk exactly as shipped (DDPM, the same draws from the same generator);
a small MLP reads the normalised observation window and the base's executed actions
(normalised) and adds

    delta = alpha * tanh(f(obs_cond, base_exec))            (each entry within +-alpha)

to them, in the normalised action space ([-1, 1] covers the demonstrations' range; the sum is
clamped to it). The MLP's last layer starts at zero, so an untrained residual, or alpha 0, acts
exactly as the base, draw for draw. Only the executed steps change; the rest of the chunk is the
base's. With `per_step` (ResFiT's closed loop) the residual corrects one action at a time, at
each control step, from the observation window of that step:

    delta_t = alpha * tanh(f(obs_cond_t, base_t))       (base_t: the base chunk's action for step t)

(the rollout asks `step_action` for every step's action, diffusion_policy/rollout.py). With
`act_within` > 0 the residual acts only while the block is near the goal:

    delta = 0   where mean_k |keypoint_k - goal keypoint_k| > act_within   (pixels, the window's last frame)

(the 9 block keypoints of the observation against the same keypoints at Push-T's fixed goal pose); far
from the goal the base acts alone. That gate knows the task's goal pose. With `act_value` L the gate is
learned instead, from the reward model the residual was trained on:

    delta = 0   where value(frame) < L          (the reward model's value of the window's last frame)

`value` is the dynamics reward model's frame part (`FrameValue`, a copy written into the policy
checkpoint: deployment needs no second file, and no goal constant is read). It is a deployment setting: fine-tuning collects with its own
deltas everywhere (residual.py), and the policy it writes carries the gate. The
residual is trained by diffusion_policy/finetune/residual.py (residual_step.py per step); this module is what
evaluation, selection and collection load (checkpoint.py builds it from a checkpoint's
"residual" entry), so it depends on nothing of the fine-tuning package.
"""

import hashlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffusion_policy.common.runtime import UserError
from diffusion_policy.env.geometry import GOAL_POSE, block_keypoints
from diffusion_policy.env.pusht import OBS_DIMS
from diffusion_policy.model import mlp as mish_mlp
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig

GOAL_KEYPOINTS = block_keypoints(GOAL_POSE)  # (9, 2) px: where the block's keypoints are at the goal


@dataclass
class ResidualNetConfig:
    """The residual MLP's shape and bound; checks itself."""

    alpha: float = 0.08  # the bound of every entry, in normalised action units (2 = the full range)
    hidden_dims: tuple = (256, 256)
    per_step: bool = False  # correct each control step's action from that step's window (else the chunk at the call)
    act_within: float = 0.0  # px: act only while the block's keypoints are this close to the goal's on average; 0: everywhere
    act_value: float | None = None  # act only where the learned frame value is at least this; None: no such gate

    def __post_init__(self):
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (the residual's bound, normalised units), got {self.alpha!r}")
        self.act_within = float(self.act_within)
        if not self.act_within >= 0:
            raise ValueError(f"act_within must be >= 0 (pixels from the goal; 0: everywhere), got {self.act_within!r}")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive sizes, got {self.hidden_dims}")
        if self.act_value is not None:
            self.act_value = float(self.act_value)
            if not 0.0 < self.act_value <= 1.0:
                raise ValueError(f"act_value must be in (0, 1] (a level of the reward, clip(coverage / 0.95)), got "
                                 f"{self.act_value!r}")
            if self.act_within:
                raise ValueError("act_value and act_within are two gates: give one (act_within 0 with act_value)")
        if not isinstance(self.per_step, bool):
            raise ValueError(f"per_step must be True or False, got {self.per_step!r}")

    def to_dict(self):
        return {**asdict(self), "hidden_dims": list(self.hidden_dims)}


def mlp(sizes, layer_norm=True):
    """Linear layers of `sizes`, each hidden one followed by LayerNorm (optional) and ReLU."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(sizes[i + 1]), nn.ReLU()] if layer_norm else [nn.ReLU()]
    return nn.Sequential(*layers)


class ResidualNet(nn.Module):
    """(obs_cond (B, C), base_exec (B, H, D) normalised) -> delta (B, H, D), |delta| <= alpha;
    per step: H = 1, the one action of the step."""

    def __init__(self, config: ResidualNetConfig, cond_dim, action_horizon, action_dim):
        super().__init__()
        self.config = config
        self.exec_shape = (1 if config.per_step else action_horizon, action_dim)
        action_horizon = self.exec_shape[0]
        self.net = mlp([cond_dim + action_horizon * action_dim, *config.hidden_dims, action_horizon * action_dim])
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs_cond, base_exec):
        raw = self.net(torch.cat([obs_cond, base_exec.flatten(1)], dim=1))
        return self.config.alpha * torch.tanh(raw).view(-1, *self.exec_shape)


def critic_dims(policy_config, per_step=False):
    """(cond_dim, exec_dim) of the chunk critic of a policy with this PolicyConfig: the flattened
    observation window and executed chunk it reads (per step: one action)."""
    return (policy_config.obs_horizon * policy_config.obs_dim,
            (1 if per_step else policy_config.action_horizon) * policy_config.action_dim)


class ChunkCritic(nn.Module):
    """An ensemble of Q(obs_cond, executed chunk) MLPs: (B, C), (B, H, D) normalised -> (E, B).

    Trained by --method residual (diffusion_policy/finetune/residual.py); saved in the policy
    checkpoint it writes ("critic"), where run-time selection by the critic loads it from."""

    def __init__(self, cond_dim, exec_dim, hidden_dims, num_critics):
        super().__init__()
        self.shape = {"cond_dim": int(cond_dim), "exec_dim": int(exec_dim),
                      "hidden_dims": [int(h) for h in hidden_dims], "num_critics": int(num_critics)}
        self.heads = nn.ModuleList(mlp([cond_dim + exec_dim, *hidden_dims, 1]) for _ in range(num_critics))

    def forward(self, cond, act):
        x = torch.cat([cond, act.flatten(1)], dim=1)
        return torch.stack([h(x).squeeze(-1) for h in self.heads])

    def to_checkpoint(self):
        return {"config": dict(self.shape), "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}


def critic_from_checkpoint(ckpt, path):
    """The chunk critic a policy checkpoint carries ("critic", written by --method residual), or that a
    residual run's resumable checkpoint (<run_dir>/latest.ckpt: its method state) holds."""
    entry = ckpt.get("critic")
    if entry is None:
        method = ((ckpt.get("train_state") or {}).get("method") or {})
        if "critic" in method and "config" in method:  # the shapes the method built it with (residual.py)
            cond_dim, exec_dim = critic_dims(PolicyConfig(**ckpt["config"]["policy"]),
                                             bool(method["config"].get("per_step", False)))
            entry = {"config": {"cond_dim": cond_dim, "exec_dim": exec_dim,
                                "hidden_dims": list(method["config"]["hidden_dims"]),
                                "num_critics": method["config"]["num_critics"]},
                     "state_dict": method["critic"]}
    if entry is None:
        raise ValueError(f"{path} carries no chunk critic (--method residual saves it with the policy since "
                         "issue #37's item 6; earlier runs keep it in <run_dir>/latest.ckpt): give one of those")
    critic = ChunkCritic(**entry["config"])
    critic.load_state_dict(entry["state_dict"])
    return critic.eval()


def weights_sha256(module):
    """A digest of a module's weights (names and bytes): what a residual checkpoint pins its base by."""
    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_frame_value_source(reward_ckpt, why, otherwise):
    """Refuse, in one line, a reward source without a frame value (only a dynamics reward model has one; reward_ckpt:
    the reward model's checkpoint, None for the simulator). `why` says what reads it, `otherwise` what to do instead."""
    structure = reward_ckpt["config"]["reward_model"].get("structure", "direct") if reward_ckpt else None
    if structure != "dynamics":
        raise UserError(f"{why}: give --reward_source model with a dynamics reward model (train_reward.py's default "
                        f"structure), or {otherwise}")


class FrameValue(nn.Module):
    """The learned value of an observation frame: raw (N, obs_dim) -> (N,), the dynamics reward model's frame
    part (diffusion_policy/reward_model.py: its obs normaliser, value MLP and target statistics), held by a
    residual policy for its learned gate (`act_value`) and written with it. Its layers are built with the global
    generator forked (their initial draw is always overwritten by the reward model's weights): a run that copies it
    draws the same critic and actor as before the gate existed (7ad45b2 had shifted every residual run's draw)."""

    def __init__(self, obs_low, obs_high, hidden_dims, target_mean, target_std):
        super().__init__()
        self.obs_normalizer = MinMaxNormalizer(obs_low, obs_high)
        self.hidden_dims = [int(h) for h in hidden_dims]
        with torch.random.fork_rng(devices=[]):  # weights always copied in: their fresh draw must not shift the run's
            self.value = mish_mlp(len(self.obs_normalizer.low), self.hidden_dims, 1)  # the reward model's own layout
        self.target = (float(target_mean), float(target_std))

    @classmethod
    def of(cls, reward_model):
        """A copy of a dynamics reward model's frame value (its weights detached from it)."""
        if reward_model.config.structure != "dynamics":
            raise ValueError(f"only a dynamics reward model values a frame; this one is {reward_model.config.structure}")
        out = cls(reward_model.obs_normalizer.low, reward_model.obs_normalizer.high, reward_model.config.hidden_dims,
                  float(reward_model.target_mean), float(reward_model.target_std))
        out.value.load_state_dict(reward_model.value.state_dict())
        return out.to(reward_model.target_mean.device).eval()

    @torch.no_grad()
    def forward(self, frames):
        x = self.obs_normalizer.normalize(torch.as_tensor(frames, dtype=torch.float32, device=self.obs_normalizer.low.device))
        return self.value(x).squeeze(-1) * self.target[1] + self.target[0]

    def to_checkpoint(self):
        return {"obs_low": self.obs_normalizer.low.cpu().clone(), "obs_high": self.obs_normalizer.high.cpu().clone(),
                "hidden_dims": list(self.hidden_dims), "target_mean": self.target[0], "target_std": self.target[1],
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.value.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, entry):
        out = cls(entry["obs_low"], entry["obs_high"], entry["hidden_dims"], entry["target_mean"], entry["target_std"])
        out.value.load_state_dict(entry["state_dict"])
        return out.eval()


class ResidualDiffusionPolicy(DiffusionPolicy):
    """A DiffusionPolicy whose executed actions get the residual's bounded correction."""

    def __init__(self, policy_config, unet_config, sampler_config, obs_normalizer, action_normalizer,
                 residual_config: ResidualNetConfig):
        super().__init__(policy_config, unet_config, sampler_config, obs_normalizer, action_normalizer)
        if residual_config.act_within and policy_config.obs_dim != OBS_DIMS["keypoints"]:
            raise ValueError(f"act_within reads the block's keypoints: it needs keypoint observations "
                             f"({OBS_DIMS['keypoints']} entries), this policy's have {policy_config.obs_dim}")
        self.residual = ResidualNet(residual_config, policy_config.obs_horizon * policy_config.obs_dim,
                                    policy_config.action_horizon, policy_config.action_dim)
        self.frame_value = None  # FrameValue (a submodule once set): what the learned gate reads

    @classmethod
    def on(cls, policy, residual_config):
        """`policy`'s base (its noise model, normalisers and sampler) with a fresh residual."""
        if isinstance(policy, ResidualDiffusionPolicy):
            raise ValueError("the policy already has a residual")
        out = cls(policy.config, policy.unet_config, policy.sampler_config, policy.obs_normalizer,
                  policy.action_normalizer, residual_config)
        out.model.load_state_dict(policy.model.state_dict())
        return out.to(policy.device)

    @property
    def is_gated(self):
        return bool(self.residual.config.act_within) or self.residual.config.act_value is not None

    def acting(self, frame):
        """(N,) bool: where the residual acts, from the last raw observation frame (N, obs_dim): everywhere
        without a gate; with act_value where the learned frame value is at least act_value; with act_within
        where the block's keypoints are within act_within px of the goal's on average."""
        frame = torch.as_tensor(frame, dtype=torch.float32, device="cpu")
        if self.residual.config.act_value is not None:
            if self.frame_value is None:
                raise ValueError("act_value gates on a learned frame value, and this policy holds none (a residual "
                                 "trained on a dynamics reward model's reward carries one)")
            return (self.frame_value(frame) >= self.residual.config.act_value).cpu()
        if not self.residual.config.act_within:
            return torch.ones(len(frame), dtype=torch.bool)
        keypoints = frame[:, :GOAL_KEYPOINTS.size].reshape(len(frame), *GOAL_KEYPOINTS.shape)
        distance = (keypoints - torch.as_tensor(GOAL_KEYPOINTS, dtype=torch.float32)).norm(dim=-1).mean(-1)
        return distance <= self.residual.config.act_within

    def gated(self, delta, frame):
        """delta with the rows where the residual does not act (`acting`) set to zero (as is with act_within 0)."""
        if not self.is_gated:  # every step of an ungated policy: nothing to read or multiply
            return delta
        return delta * self.acting(frame).to(delta.device).view(-1, *[1] * (delta.ndim - 1)).to(delta.dtype)

    def base_sha256(self):
        return weights_sha256(self.model)

    @property
    def per_step(self):
        """True: the residual corrects every control step (step_action), not the chunk at the call."""
        return self.residual.config.per_step

    @torch.no_grad()
    def step_action(self, history, out, j):
        """The raw action (N, D) of the j-th executed step of the call `out` (its chunk as the base sampled
        it), corrected from the window `history` (N, obs_horizon, obs_dim) of that step."""
        base = out["action_pred_norm"][:, self.config.obs_horizon - 1 + j]
        return self.step_delta(history, base)[0]

    def step_delta(self, history, base, delta=None):
        """(raw action, normalised action, delta) of one step: base (N, D) normalised, corrected by the
        residual's delta from the window `history`, gated by act_within (or by the `delta` given, as is)."""
        if delta is None:
            delta = self.residual(self.obs_cond(torch.as_tensor(history, dtype=torch.float32)), base[:, None])[:, 0]
            delta = self.gated(delta, history[:, -1])
        acted = (base + delta).clamp(-1.0, 1.0)
        return self.action_normalizer.unnormalize(acted), acted, delta

    def corrected(self, chunk, delta):
        """The chunk (B, Tp, D) with delta (B, H, D) added to its executed steps, clamped to [-1, 1]."""
        start = self.config.obs_horizon - 1
        out = chunk.clone()
        out[:, start:start + self.config.action_horizon] = (self.executed(chunk) + delta).clamp(-1.0, 1.0)
        return out

    @torch.no_grad()
    def predict_action(self, obs_history, generator=None, noise=None, num_inference_steps=None,
                       return_trajectory=False):
        """As DiffusionPolicy.predict_action, the executed steps corrected; also "base_action_pred_norm"
        (the base's chunk) and "residual" (delta, (B, action_horizon, D) normalised)."""
        out = super().predict_action(obs_history, generator=generator, noise=noise,
                                     num_inference_steps=num_inference_steps, return_trajectory=return_trajectory)
        base_chunk = out["action_pred_norm"]
        if self.per_step:  # the base's chunk: the rollout corrects each step as it is taken (step_action)
            return {**out, "base_action_pred_norm": base_chunk}
        obs_cond = self.obs_cond(torch.as_tensor(obs_history))
        delta = self.gated(self.residual(obs_cond, self.executed(base_chunk)), obs_history[:, -1])
        return {**out, **self.with_delta(base_chunk, delta)}

    def with_delta(self, base_chunk, delta):
        """The output dict of acting with base_chunk (normalised) corrected by delta."""
        chunk = self.corrected(base_chunk, delta)
        action_pred = self.action_normalizer.unnormalize(chunk)
        return {"action": self.executed(action_pred), "action_pred": action_pred, "action_pred_norm": chunk,
                "base_action_pred_norm": base_chunk, "residual": delta}
