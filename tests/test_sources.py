"""Reward sources: the simulator's antithetic gradient against finite differences on a smooth stand-in."""

import numpy as np
import torch

from diffusion_policy.sources import SimulatorReward, antithetic_gradient
from tests.helpers import tiny_policy


class SmoothEnv:
    """A stand-in for PushTEnv with the same clone/step interface: a point that moves a fifth of
    the way to each action; the reward is a smooth bump around a goal."""

    def __init__(self, pos, goal):
        self.pos, self.goal = np.asarray(pos, float), np.asarray(goal, float)

    def clone(self):
        return SmoothEnv(self.pos.copy(), self.goal)

    def step(self, action):
        self.pos = self.pos + 0.2 * (np.asarray(action, float) - self.pos)
        r = float(np.exp(-np.sum((self.pos - self.goal) ** 2) / 200.0 ** 2))
        return None, r, False, False, {}




def test_simulator_gradient_matches_finite_differences():
    policy = tiny_policy()
    source = SimulatorReward(policy, sigma=0.01, pairs=20000, generator=torch.Generator().manual_seed(0))
    envs = [SmoothEnv((100, 100), (300, 250)), SmoothEnv((400, 300), (250, 250))]
    n_exec = np.array([8, 5])
    x0 = torch.rand(2, 16, 2, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    r, grad = source.reward_and_grad(None, x0, envs, n_exec)

    fd, h = torch.zeros_like(x0), 1e-3
    for idx in np.ndindex(*x0.shape[1:]):
        plus, minus = x0.clone(), x0.clone()
        plus[(slice(None), *idx)] += h
        minus[(slice(None), *idx)] -= h
        fd[(slice(None), *idx)] = (source.reward(None, plus, envs, n_exec) - source.reward(None, minus, envs, n_exec)) / (2 * h)
    torch.testing.assert_close(r, source.reward(None, x0, envs, n_exec))
    assert fd.abs().max() > 0.01  # the stand-in's reward does depend on the chunk
    # only executed steps (1..8 of the first chunk, 1..5 of the second) carry a gradient
    assert fd[0, 9:].abs().max() == 0 and fd[1, 6:].abs().max() == 0 and fd[:, 0].abs().max() == 0
    assert grad[0, 9:].abs().max() == 0 and grad[:, 0].abs().max() == 0
    rel = (grad - fd).norm() / fd.norm()
    assert rel < 0.1, f"relative error {rel:.3f}"


def test_antithetic_gradient_of_a_quadratic():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    b = torch.tensor([1.0, -2.0])
    x = torch.tensor([[0.3, -0.1], [1.0, 2.0]])

    def f(z):  # (P, B, 2) -> (P, B)
        return 0.5 * torch.einsum("pbi,ij,pbj->pb", z, A, z) + z @ b

    g = antithetic_gradient(f, x, sigma=0.5, pairs=40000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g, x @ A + b, atol=0.05, rtol=0.02)
    mask = torch.tensor([1.0, 0.0])
    g = antithetic_gradient(f, x, sigma=0.5, pairs=10, generator=torch.Generator().manual_seed(0), mask=mask)
    assert g[:, 1].abs().max() == 0


class ObservedSmoothEnv(SmoothEnv):
    """SmoothEnv that also returns an observation (its position, repeated to the policy's 20)."""

    def clone(self):
        return ObservedSmoothEnv(self.pos.copy(), self.goal)

    def step(self, action):
        _, r, *rest = super().step(action)
        return np.tile(self.pos, 10).astype(np.float32), r, *rest
