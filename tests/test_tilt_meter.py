"""The tilt meter's prediction matches the exact tilt on a Gaussian case; it reads a tilted policy."""

import numpy as np
import pytest
import torch

from diffusion_policy.finetune.tilt import TiltMeter, TiltStates


class GaussianPolicy:
    """Chunks (B, 1, 1) ~ N(mean, 1) whatever the observation."""

    def __init__(self, mean):
        self.mean = mean

    def predict_action(self, obs, generator=None):
        return {"action_pred_norm": self.mean + torch.randn(obs.shape[0], 1, 1, generator=generator)}


class ScaledReward:
    needs_env = False

    def __init__(self, scale):
        self.scale = scale

    def reward(self, obs, x0, envs=None, n_exec=None):
        return self.scale * x0.flatten()


@pytest.mark.parametrize("lam,s", [(1.0, 0.5), (20.0, 0.03)])
def test_prediction_is_the_exact_tilt_and_a_tilted_policy_realises_it(lam, s):
    # r = s x with x ~ N(0, 1): the tilt p exp(lam r) is N(lam s, 1), gaining lam s^2 in r
    states = TiltStates(np.zeros((20, 2, 20), np.float32), None, np.full(20, 8))
    meter = TiltMeter(GaussianPolicy(0.0), ScaledReward(s), states, lam, num_samples=4000, seed=3)
    out = meter.measure(GaussianPolicy(0.0))
    assert out["tilt_realised"] == 0.0  # same policy, same noise
    exact = lam * s * s
    assert out["tilt_predicted_ci95"][0] < exact < out["tilt_predicted_ci95"][1] or \
        abs(out["tilt_predicted"] - exact) < 0.03 * exact
    tilted = meter.measure(GaussianPolicy(lam * s))
    assert tilted["tilt_realised"] == pytest.approx(exact, rel=1e-3)  # common noise: the shift exactly
    assert tilted["tilt_fraction"] == pytest.approx(1.0, abs=0.05)
