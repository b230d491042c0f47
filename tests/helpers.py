"""Data and probes that several test modules share."""

import argparse
import contextlib

import numpy as np
import pytest
import torch

from diffusion_policy import ddpm
from diffusion_policy.model import UNetConfig
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig

META = {"obs_horizon": 2, "obs_dim": 20, "pred_horizon": 16, "action_horizon": 8}


def tiny_policy(down_dims=(8, 16), embed_dim=8, num_inference_steps=2, high=512.0, seed=None):
    """A tiny DDPM policy (random weights, seeded if `seed` is given) on normalisers [0, high]."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=down_dims, diffusion_step_embed_dim=embed_dim),
                           ddpm.SamplerConfig(num_inference_steps=num_inference_steps),
                           MinMaxNormalizer(torch.zeros(20), torch.full((20,), high)),
                           MinMaxNormalizer(torch.zeros(2), torch.full((2,), high))).eval()


def synthetic_columns(n_episodes=40, calls=10, seed=0):
    """Random windows and chunks with a known reward: a smooth function of obs and chunk."""
    rng = np.random.default_rng(seed)
    n = n_episodes * calls
    # like real data, low-dimensional: an agent at p, a block at b (its keypoints around it), and
    # a chunk that moves in a straight line from p by velocity v; the reward is how close the
    # chunk ends to the block, squashed into [0, 1]
    p = rng.uniform(50, 450, size=(n, 2))
    b = rng.uniform(100, 400, size=(n, 2))
    pattern = rng.normal(scale=30, size=(9, 2))
    frame = np.concatenate([(b[:, None] + pattern).reshape(n, 18), p], axis=1)
    obs = np.stack([frame - np.concatenate([np.zeros((n, 18)), rng.normal(scale=2, size=(n, 2))], 1), frame], 1)
    v = rng.uniform(-25, 25, size=(n, 2))
    action = p[:, None] + v[:, None] * np.arange(16)[None, :, None] + rng.normal(scale=1.0, size=(n, 16, 2))
    reward_after = np.exp(-np.linalg.norm(action[:, -1] - b, axis=-1) / 150)
    reward_before = rng.uniform(0, 1, size=n)
    return {
        "episode": np.repeat(np.arange(n_episodes), calls), "seed": np.repeat(200000 + np.arange(n_episodes), calls),
        "call": np.tile(np.arange(calls), n_episodes), "branch": np.zeros(n), "step": np.tile(np.arange(calls) * 8, n_episodes),
        "obs": obs, "action_pred": action, "action_exec": action[:, 1:9], "reward_before": reward_before,
        "reward_after": reward_after, "reward_diff": reward_after - reward_before,
        "return_to_go": reward_after * 2.0,
        # the block stays put and the agent ends where the executed steps lead it
        "obs_after": np.concatenate([frame[:, :18], action[:, 8]], axis=1),
    }


def script_parser(module, monkeypatch, required_ok=False):
    """(the ArgumentParser a script's parse_args builds, the args it parses from []). With
    required_ok a script whose flags include required ones still yields its parser (args None)."""
    parsers, args = [], None
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        args = module.parse_args([])
    except SystemExit:
        if not required_ok:
            raise
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    return parsers[0], args


@contextlib.contextmanager
def interrupted_at_call(monkeypatch, owner, name, n, exc=KeyboardInterrupt):
    """The block must stop with `exc`, raised by owner.name on its n-th call (Ctrl-C in the middle
    of a long run); owner.name is itself again afterwards."""
    original, calls = getattr(owner, name), {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)
    try:
        with pytest.raises(exc):
            yield
    finally:
        monkeypatch.setattr(owner, name, original)
