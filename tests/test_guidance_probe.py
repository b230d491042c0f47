"""benchmarks/guidance_probe.py: the guided sampler moves chunks up a reward's gradient."""

import pytest
import torch

from benchmarks.guidance_probe import GuidedPolicy
from diffusion_policy import ddpm
from diffusion_policy.model import UNetConfig
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.policy import DiffusionPolicy, PolicyConfig


class LinearReward:
    """r = w . normalised chunk, through the policy's own normaliser."""

    def __init__(self, normalizer, w):
        self.normalizer, self.w = normalizer, w

    def reward(self, obs, chunk):
        return (self.normalizer.normalize(chunk) * self.w).flatten(1).sum(-1)


@pytest.mark.parametrize("guidance", ["x0", "chain"])
def test_guidance_moves_chunks_up_a_linear_reward(pusht_arrays, guidance):
    torch.manual_seed(0)
    obs_norm, act_norm = MinMaxNormalizer.fit(pusht_arrays["obs"]), MinMaxNormalizer.fit(pusht_arrays["action"])
    policy = DiffusionPolicy(PolicyConfig(), UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16),
                             ddpm.SamplerConfig(num_inference_steps=4), obs_norm, act_norm)
    obs = torch.as_tensor(pusht_arrays["obs"][:64], dtype=torch.float32).view(32, 2, -1)
    w = torch.randn(16, 2)
    reward = LinearReward(act_norm, w)
    chunks = {}
    for lam in (0.0, 3.0):
        out = GuidedPolicy(policy, reward, lam, guidance=guidance).predict_action(
            obs, generator=torch.Generator().manual_seed(1))
        chunks[lam] = out["action_pred_norm"]
    gain = float(((chunks[3.0] - chunks[0.0]) * w).flatten(1).sum(-1).mean())
    assert torch.all(torch.isfinite(chunks[3.0])) and gain > 0.0, gain
    with pytest.raises(ValueError, match="guidance"):
        GuidedPolicy(policy, reward, 1.0, guidance="nope")
