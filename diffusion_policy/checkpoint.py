"""Self-describing checkpoints: plain dicts of tensors and Python values.

Every checkpoint loads with `torch.load(weights_only=True)` and carries what is needed to
rebuild its model: `format_version`, `kind` ("policy" or "reward"), `config`, weights,
normaliser stats, and for resumable runs the training state. Writes are atomic.

A policy checkpoint:
    {"format_version": 1, "kind": "policy",
     "config": {"policy": ..., "model": ..., "sampler": ...},
     "normalizer": {"obs": {"low", "high"}, "action": {"low", "high"}},
     "model_state_dict": live weights, "ema_model_state_dict": EMA weights (what is evaluated),
     "train_state": {...} or None, "provenance": {...}, "metrics": {...}}
and for a policy with a residual (`--method residual`, diffusion_policy/residual_policy.py) also
     "residual": {"config": {alpha, hidden_dims}, "state_dict": its weights,
                  "base_sha256": the digest of the frozen base's weights it was trained on}
"""

import os

import torch

from diffusion_policy.common.atomic import atomic_path
from diffusion_policy.common.resume import check_resumable, plain_values
from diffusion_policy.ddpm import SamplerConfig
from diffusion_policy.model import UNetConfig
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig
from diffusion_policy.residual_policy import FrameValue, ResidualDiffusionPolicy, ResidualNetConfig
from diffusion_policy.common.runtime import UserError

FORMAT_VERSION = 1
KINDS = ("policy", "reward")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or of the wrong kind."""


def save_checkpoint(ckpt, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    if ckpt.get("kind") not in KINDS or "format_version" not in ckpt:
        raise ValueError(f"a checkpoint needs format_version and kind in {KINDS}")
    for key in ("model_state_dict", "ema_model_state_dict"):
        bad = [name for name, v in (ckpt.get(key) or {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # the divergence guard of last resort: a diverged update never overwrites a good file
            raise CheckpointError(f"refusing to save {path}: {key} has non-finite values in {bad[0]} (the last "
                                  "update diverged); the file keeps its last good state. Lower --lr, then --resume")
    with atomic_path(path) as tmp:  # a temporary name of this process's own
        torch.save(ckpt, tmp)


def load_checkpoint(path, kind, map_location="cpu"):
    """Load a checkpoint of `kind`; a clear error for a missing file or another kind."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch's message advises weights_only=False, which is not the fix here
        raise CheckpointError(f"{path} is not a checkpoint of this project (unreadable: truncated, or another "
                              "kind of file); pass a .ckpt written by pretrain_policy.py, reward_finetuning.py "
                              "or train_reward.py") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise CheckpointError(
            f"{path} is a '{ckpt['kind']}' checkpoint, but a '{kind}' checkpoint is needed here "
            f"(kinds: 'policy' from pretrain_policy.py / reward_finetuning.py, 'reward' from train_reward.py)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {ckpt.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    return ckpt


def _normalizer_state(norm):
    return {"low": norm.low.detach().cpu().clone(), "high": norm.high.detach().cpu().clone()}


def policy_checkpoint(policy, ema_model=None, train_state=None, provenance=None, metrics=None):
    """The checkpoint dict of a policy; `ema_model` (a noise model) defaults to the policy's own."""
    weights = {k: v.detach().cpu().clone() for k, v in policy.model.state_dict().items()}
    ema_weights = ({k: v.detach().cpu().clone() for k, v in ema_model.state_dict().items()}
                   if ema_model is not None else weights)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": "policy",
        "config": {
            "policy": policy.config.to_dict(),
            "model": policy.unet_config.to_dict(),
            "sampler": policy.sampler_config.to_dict(),
        },
        "normalizer": {"obs": _normalizer_state(policy.obs_normalizer),
                       "action": _normalizer_state(policy.action_normalizer)},
        "model_state_dict": weights,
        "ema_model_state_dict": ema_weights,
        "train_state": train_state,
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    if isinstance(policy, ResidualDiffusionPolicy):
        ckpt["residual"] = {"config": policy.residual.config.to_dict(), "base_sha256": policy.base_sha256(),
                            "state_dict": {k: v.detach().cpu().clone() for k, v in policy.residual.state_dict().items()}}
        if policy.frame_value is not None:  # the learned gate's value travels with the policy
            ckpt["residual"]["frame_value"] = policy.frame_value.to_checkpoint()
    return ckpt


def policy_from_checkpoint(ckpt, use_ema=True, device="cpu", num_inference_steps=None, sampler=None,
                           noise_scale=None, act_within=None, act_value=None):
    """Rebuild the policy of a checkpoint dict (EMA weights unless use_ema=False); num_inference_steps,
    sampler ("ddpm" or "ddim"), noise_scale and a residual's gate, act_within or act_value (residual_policy.py:
    the one given replaces the checkpoint's gate), where given, replace the checkpoint's."""
    cfg = ckpt["config"]
    overrides = {"num_inference_steps": num_inference_steps, "sampler": sampler, "noise_scale": noise_scale}
    sampler = {**cfg["sampler"], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        sampler_config = SamplerConfig(**sampler)
    except ValueError as e:
        raise UserError(f"{e} for this checkpoint (trained with {cfg['sampler']['num_train_timesteps']} diffusion "
                        "steps)") from None
    parts = (PolicyConfig(**cfg["policy"]), UNetConfig(**cfg["model"]), sampler_config,
             MinMaxNormalizer(**ckpt["normalizer"]["obs"]), MinMaxNormalizer(**ckpt["normalizer"]["action"]))
    residual = ckpt.get("residual")
    for name, given in (("act_within", act_within), ("act_value", act_value)):
        if given is not None and not residual:
            raise UserError(f"{name} gates a residual's corrections, and this checkpoint has no residual (a policy "
                            "written by --method residual or residual_step has one)")
    if act_within is not None and act_value is not None:
        raise UserError("act_within and act_value are two gates: give one")
    if act_value is not None and residual and "frame_value" not in residual:
        raise UserError("act_value gates on the learned frame value a residual carries, and this one carries none "
                        "(written before the learned gate, or trained on the simulator's reward or a direct reward "
                        "model): gate it with act_within, or train it again on a dynamics reward model")
    if residual:
        residual_config = dict(residual["config"])
        if act_within is not None:  # the gate given replaces the checkpoint's
            residual_config.update(act_within=act_within, act_value=None)
        if act_value is not None:
            residual_config.update(act_within=0.0, act_value=act_value)
        try:
            policy = ResidualDiffusionPolicy(*parts, ResidualNetConfig(**residual_config))
        except ValueError as e:
            raise UserError(str(e)) from None
        if "frame_value" in residual:
            policy.frame_value = FrameValue.from_checkpoint(residual["frame_value"])
    else:
        policy = DiffusionPolicy(*parts)
    policy.model.load_state_dict(ckpt["ema_model_state_dict" if use_ema else "model_state_dict"])
    if residual:
        if policy.base_sha256() != residual["base_sha256"]:
            raise CheckpointError("this checkpoint's base weights are not the ones its residual was trained on "
                                  "(their digest differs): the file was changed; re-run reward_finetuning.py "
                                  "--method residual on the base you mean")
        policy.residual.load_state_dict(residual["state_dict"])
    return policy.to(device).eval()


def load_policy(path, device="cpu", use_ema=True, num_inference_steps=None):
    """A policy ready to act, from a policy checkpoint file."""
    return policy_from_checkpoint(load_checkpoint(path, "policy"), use_ema, device, num_inference_steps)


def load_resume_checkpoint(path, settings, may_change=(), map_location="cpu", saved_key="config"):
    """The resumable policy checkpoint at `path`; refused if any of `settings` ({name: value}, nested
    dicts allowed) differs from the saved run's train_state[saved_key], unless its last name part is
    in `may_change` (such as lr: the advice a diverged run prints)."""
    try:
        ckpt = load_checkpoint(path, "policy", map_location=map_location)
    except CheckpointError as e:
        raise UserError(f"cannot resume: {e}; run without --resume to start afresh") from None
    return check_resumable(path, ckpt, "policy", settings, may_change, saved_settings=ckpt["train_state"].get(saved_key)
                           or {}, format_version=FORMAT_VERSION)


def resumed_changes(ckpt, args, at, keys):
    """What config.json records of a resume: where, and which of the settings in `keys` (those a
    resumed run may change, such as --lr) differ from the saved run's, as [saved, now]."""
    saved = ckpt["train_state"]["args"]
    changed = {k: [saved.get(k), getattr(args, k)] for k in keys
               if plain_values(saved.get(k)) != plain_values(getattr(args, k))}
    return {"resumed": {"at": at, "changed": changed}}


def describe_last_good(path, counter):
    """'<path> (<counter> N)' for the resumable checkpoint a diverged run leaves, or 'no checkpoint yet'."""
    if not os.path.exists(path):
        return "no checkpoint yet"
    return f"{path} ({counter} {load_checkpoint(path, 'policy')['train_state'][counter]})"
