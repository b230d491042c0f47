"""Shared fixtures. The real dataset is required: $PUSHT_DATASET, data/pusht/, or fetched on first
use like every script does; when the tests collected need it and it cannot be had, the run stops once,
before any test, in one line that says how to point $PUSHT_DATASET at a copy (never a skip, never an
error per test)."""

import contextlib
import io
import os
from dataclasses import dataclass

import pytest

import torch

from diffusion_policy import ddpm
from diffusion_policy.checkpoint import policy_checkpoint, save_checkpoint
from diffusion_policy.finetune.weighted import WeightedConfig
from diffusion_policy.data.dataset import DatasetError, load_pusht_arrays, resolve_dataset_path
from diffusion_policy.model import UNetConfig
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig
from diffusion_policy.reward_data import save_reward_data
from diffusion_policy.reward_model import RewardModel, RewardModelConfig, reward_checkpoint
from tests.helpers import META, synthetic_columns

# SDL must not look for a display when pygame renders.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def pytest_collection_finish(session):
    """Find the dataset once for every test that needs it; without it, stop the run in one line."""
    needing = [item for item in session.items if "dataset_path" in getattr(item, "fixturenames", ())]
    if not needing:
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the fetch's own progress line
            session.config.dataset_path = os.path.abspath(resolve_dataset_path())
    except DatasetError as e:
        pytest.exit(f"{len(needing)} of the {len(session.items)} tests read the real Push-T demonstrations, which are "
                    f"not here ({e}); point PUSHT_DATASET at a copy: PUSHT_DATASET=/path/to/pusht_cchi_v7_replay.zarr "
                    "python -m pytest -q", returncode=4)


@pytest.fixture(scope="session")
def dataset_path(request):
    return request.config.dataset_path


@pytest.fixture(scope="session")
def pusht_arrays(dataset_path):
    return load_pusht_arrays(dataset_path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, pusht_arrays):
    """A tiny policy, a tiny reward model that fits it and reward data, in a fresh folder per module."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    obs_norm, act_norm = MinMaxNormalizer.fit(pusht_arrays["obs"]), MinMaxNormalizer.fit(pusht_arrays["action"])
    policy = DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16),
                             ddpm.SamplerConfig(num_inference_steps=4), obs_norm, act_norm)
    save_checkpoint(policy_checkpoint(policy, provenance={"script": "test"}), root / "policy.ckpt")
    reward = RewardModel(RewardModelConfig(hidden_dims=(32,)), obs_norm, act_norm, 0.5, 0.2)
    save_checkpoint(reward_checkpoint(reward, provenance={"action_reward_path": str(root / "r.npy")}),
                    root / "reward.ckpt")
    save_reward_data(str(root / "r.npy"), synthetic_columns(n_episodes=3, calls=4), META)
    return root


def pytest_sessionfinish(session, exitstatus):
    """Under CI, a skipped test fails the run: every check here must actually run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; every test must run in CI", red=True)
        session.exitstatus = 1


@dataclass
class SmallWeightedConfig(WeightedConfig):
    """The weighted method at test size: fewer optimiser steps and states per iteration."""

    grad_steps_per_iter: int = 2
    states_per_iter: int = 4
    batch_states: int = 3


@pytest.fixture
def small_finetune(monkeypatch):
    """reward_finetuning at test size: the weighted method's per-iteration sizes and the tilt meter's
    states shrunk (the settings users run are checked at full size by test_finetune_golden.py)."""
    import reward_finetuning

    from diffusion_policy.finetune.weighted import RewardWeighted

    small = type("SmallRewardWeighted", (RewardWeighted,), {"config_class": SmallWeightedConfig})
    monkeypatch.setitem(reward_finetuning.METHODS, "weighted", small)
    monkeypatch.setattr(reward_finetuning, "TILT_STATES", 4)
    monkeypatch.setattr(reward_finetuning, "TILT_SAMPLES", 3)
