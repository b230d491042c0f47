"""The weighted method's loss lands on the analytic tilt; its control stays at the base."""

import math

import pytest
import torch

from diffusion_policy import ddpm
from diffusion_policy.finetune.weighted import candidate_weights, posterior_tilt_loss

T_CHECK = ddpm.inference_timesteps(100, 10)[0]  # the 10-step sampler's timesteps


class LinearEps(torch.nn.Module):
    """e(x, t) = c_t x + b_t: exact for 1-D Gaussian data N(m, 1), where c_t = sqrt(1 - abar_t)
    and b_t = -sqrt(1 - abar_t) sqrt(abar_t) m."""

    def __init__(self, abar, mean=0.0):
        super().__init__()
        self.c = torch.nn.Parameter((1 - abar).sqrt().clone())
        self.b = torch.nn.Parameter(-(1 - abar).sqrt() * abar.sqrt() * mean)

    def forward(self, x, t):
        return self.c[t].view(-1, 1, 1) * x + self.b[t].view(-1, 1, 1)


def fit(reward_scale, control, steps=600, states=128, k=64, seed=0, shuffles=4, one_hot=False):
    """Fit a LinearEps to the tilt of base N(0, 1) samples under r(x) = x with the method's loss."""
    gen = torch.Generator().manual_seed(seed)
    abar = ddpm.alphas_cumprod(100)
    base, model = LinearEps(abar), LinearEps(abar)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        x0 = torch.randn(states, k, 1, 1, generator=gen)  # the base's samples, N(0, 1)
        r = x0.view(states, k)
        if one_hot:  # all weight on one candidate, handed out like the control's
            w = torch.nn.functional.one_hot(r.argmax(1), k).float()
            w = w[:, torch.randperm(k, generator=gen)] if control else w
        else:
            w = candidate_weights(r, reward_scale, control=control, generator=gen)
        t = T_CHECK[torch.randint(0, len(T_CHECK), (states,), generator=gen)]
        noise = torch.randn(states, 1, 1, generator=gen)
        loss, _ = posterior_tilt_loss(model, base, x0, w, noise, t, abar, generator=gen, shuffles=shuffles)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, abar


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_weighted_fit_lands_on_the_analytic_tilt(lam):
    # base N(0, 1), r(x) = x: the tilt p exp(lam r) is N(lam, 1), whose noise predictor is analytic
    model, abar = fit(lam, control=False)
    a = abar[T_CHECK]
    want_b = -(1 - a).sqrt() * a.sqrt() * lam
    torch.testing.assert_close(model.b.detach()[T_CHECK], want_b, atol=0.04, rtol=0.1)
    torch.testing.assert_close(model.c.detach()[T_CHECK], (1 - a).sqrt(), atol=0.04, rtol=0)
    # what the fitted model samples: its mean is the tilt's
    gen = torch.Generator().manual_seed(1)
    timesteps, prev = ddpm.inference_timesteps(100, 10)
    with torch.no_grad():
        x = ddpm.sample(model, (4000, 1, 1), abar, timesteps, prev, clip_sample=False, generator=gen)
        x_base = ddpm.sample(LinearEps(abar), (4000, 1, 1), abar, timesteps, prev, clip_sample=False, generator=gen)
    assert abs(float(x.mean() - x_base.mean()) - lam) < 0.1


def test_control_weights_keep_the_base():
    model, abar = fit(1.0, control=True)
    a = abar[T_CHECK]
    torch.testing.assert_close(model.b.detach()[T_CHECK], torch.zeros(len(T_CHECK)), atol=0.04, rtol=0)
    torch.testing.assert_close(model.c.detach()[T_CHECK], (1 - a).sqrt(), atol=0.04, rtol=0)


def test_candidate_weights():
    r = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    w = candidate_weights(r, 2.0)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([0.0, 2.0, 4.0]), 0))
    # the control hands out the same weights in a random order
    gen = torch.Generator().manual_seed(0)
    shuffled = [candidate_weights(r, 2.0, control=True, generator=gen) for _ in range(50)]
    for s in shuffled:
        torch.testing.assert_close(s.sort(1).values, w.sort(1).values)
    assert any(not torch.equal(s, w) for s in shuffled)
    assert math.isclose(float(torch.stack(shuffled)[:, 0].mean(0).std()), 0.0, abs_tol=0.15)
