"""The published base (../shared/artifacts/pusht_cpu/): the files every fine-tuning run and the protocol
start from keep loading as the code changes, with the kinds and shapes they were made with, and
still fit each other."""

import hashlib
import os
import re

import numpy as np
import pytest
import torch

from diffusion_policy.checkpoint import load_checkpoint, policy_from_checkpoint
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_metrics import regression_metrics
from diffusion_policy.reward_model import check_fits_policy, reward_model_from_checkpoint

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                         "artifacts", "pusht_cpu")
POLICY, REWARD = os.path.join(ARTIFACTS, "policy_pretrained.ckpt"), os.path.join(ARTIFACTS, "reward_model_rd0.ckpt")
DATA = os.path.join(ARTIFACTS, "action_reward_data_300eps_rd0.npy")


@pytest.fixture(scope="module")
def published():
    if not os.path.isdir(ARTIFACTS):  # CI and every session have ../shared: its absence is a failure, not a skip
        pytest.fail(f"the published base is missing: {ARTIFACTS}")
    return {"policy": load_checkpoint(POLICY, "policy"), "reward": load_checkpoint(REWARD, "reward"),
            "data": load_reward_data(DATA)}


def test_the_files_are_the_published_bytes():
    """Each file's sha256 is the one its README publishes (the protocol pairs results by it)."""
    table = open(os.path.join(ARTIFACTS, "README.md")).read()
    published = dict(re.findall(r"\| `([\w.]+)`[^|]*\|[^|]*\| `([0-9a-f]{64})` \|", table))
    assert set(published) == {"policy_pretrained.ckpt", "reward_model_rd0.ckpt", "action_reward_data_300eps_rd0.npy",
                              "action_reward_data_300eps_rd0.json"}
    for name, digest in published.items():
        with open(os.path.join(ARTIFACTS, name), "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == digest, name


def test_the_policy_loads_and_samples_chunks_in_the_action_range(published):
    ckpt = published["policy"]
    cfg = ckpt["config"]
    assert ckpt["kind"] == "policy" and ckpt["format_version"] == 1 and "residual" not in ckpt
    assert (cfg["policy"]["obs_horizon"], cfg["policy"]["obs_dim"], cfg["policy"]["pred_horizon"],
            cfg["policy"]["action_dim"]) == (2, 20, 16, 2)
    assert cfg["model"]["down_dims"] == [64, 128, 256] and cfg["sampler"]["num_inference_steps"] == 10
    policy = policy_from_checkpoint(ckpt)
    assert sum(p.numel() for p in policy.model.parameters()) == pytest.approx(4.56e6, rel=0.01)
    obs = torch.as_tensor(published["data"][0]["obs"][:4], dtype=torch.float32)  # (4, 2, 20): real windows
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (4, 16, 2) and out["action"].shape == (4, 8, 2)
    assert torch.isfinite(out["action_pred"]).all()
    assert out["action_pred"].min() > -50 and out["action_pred"].max() < 562  # the 512-pixel table, a margin


def test_the_reward_model_loads_fits_the_policy_and_predicts_its_data(published):
    ckpt = published["reward"]
    assert ckpt["kind"] == "reward" and ckpt["config"]["reward_model"]["structure"] == "dynamics"
    check_fits_policy(ckpt, published["policy"], REWARD, POLICY)  # raises if the shapes differ
    model = reward_model_from_checkpoint(ckpt)
    columns, meta = published["data"]
    assert meta["num_eps"] == 300 and len(columns["obs"]) == 38048
    assert columns["obs"].shape[1:] == (2, 20) and columns["action_pred"].shape[1:] == (16, 2)
    rows = np.random.default_rng(0).choice(len(columns["obs"]), 2000, replace=False)
    with torch.no_grad():
        pred = model.reward(torch.as_tensor(columns["obs"][rows], dtype=torch.float32),
                            torch.as_tensor(columns["action_pred"][rows], dtype=torch.float32)).numpy()
    assert regression_metrics(pred, columns["reward_after"][rows])["r2"] > 0.98  # published: 0.9957 on validation
