"""The weighted method's loss lands on the analytic tilt; its control stays at the base."""

import math

import numpy as np

import pytest
import torch

from diffusion_policy import ddpm
from diffusion_policy.finetune.extrapolate import extrapolate_weights, extrapolated_model, soup_checkpoint
from diffusion_policy.finetune.weighted import (
    ReplayBuffer,
    SelectingPolicy,
    candidate_weights,
    posterior_tilt_loss,
    weighted_denoising_loss,
)

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


def implied_mean(model, abar):
    """The mean of the N(m, 1) a LinearEps model denoises to, read from b at the checked timesteps."""
    a = abar[T_CHECK]
    return float((-model.b.detach()[T_CHECK] / ((1 - a).sqrt() * a.sqrt())).mean())


def fit(reward_scale, control, steps=600, states=128, k=64, seed=0, target="sample", weighting="softmax",
        proposer="base", anchor="base"):
    gen = torch.Generator().manual_seed(seed)
    abar = ddpm.alphas_cumprod(100)
    base, model = LinearEps(abar), LinearEps(abar)
    ref = model if anchor == "current" else base  # what the loss adds the correction to
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        x0 = torch.randn(states, k, 1, 1, generator=gen)  # the base's samples, N(0, 1)
        if proposer == "current":  # the current model's, N(m, 1)
            x0 = x0 + implied_mean(model, abar)
        w = candidate_weights(x0.view(states, k), reward_scale, weighting, control=control, generator=gen)
        t = T_CHECK[torch.randint(0, len(T_CHECK), (states,), generator=gen)]
        noise = torch.randn(states, 1, 1, generator=gen)
        if target == "sample":
            loss, _ = weighted_denoising_loss(model, ref, x0, w, noise, t, abar)
        else:
            first = target == "posterior_first"  # the version without the shuffled baseline
            loss, _ = posterior_tilt_loss(model, ref, x0, w, noise, t, abar, generator=gen,
                                          shuffles=0 if first else 4, mix=0.5 if first else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, abar


@pytest.mark.parametrize("lam,target", [(0.5, "sample"), (1.0, "sample"), (0.5, "posterior"), (1.0, "posterior"),
                                        (0.5, "posterior_first"), (1.0, "posterior_first")])
def test_weighted_fit_lands_on_the_analytic_tilt(lam, target):
    # base N(0, 1), r(x) = x: the tilt p exp(lam r) is N(lam, 1), whose noise predictor is analytic
    model, abar = fit(lam, control=False, target=target)
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


@pytest.mark.parametrize("target", ["sample", "posterior", "posterior_first"])
def test_control_weights_keep_the_base(target):
    model, abar = fit(1.0, control=True, target=target)
    a = abar[T_CHECK]
    torch.testing.assert_close(model.b.detach()[T_CHECK], torch.zeros(len(T_CHECK)), atol=0.04, rtol=0)
    torch.testing.assert_close(model.c.detach()[T_CHECK], (1 - a).sqrt(), atol=0.04, rtol=0)


def test_anchor_current_compounds_the_tilt_anchor_base_settles_on_it():
    """Candidates from the current model, N(m, 1), r(x) = x, lambda 0.5, posterior target: added
    to the frozen base, the correction's fixed point is the base's one tilt (m = 0.5) wherever the
    proposer is; added to the current model itself (--anchor current) every step tilts again, so
    m passes 0.5 many times over in a third of the steps. Its control has no pull back to the
    base (a random walk), but no drift either: it stays within a small fraction of that."""
    settled, abar = fit(0.5, control=False, target="posterior", proposer="current", anchor="base")
    assert abs(implied_mean(settled, abar) - 0.5) < 0.1
    compounded, _ = fit(0.5, control=False, target="posterior", proposer="current", anchor="current", steps=200)
    control, _ = fit(0.5, control=True, target="posterior", proposer="current", anchor="current", steps=200)
    assert implied_mean(compounded, abar) > 8.0
    assert abs(implied_mean(control, abar)) < 1.0


def test_candidate_weights():
    r = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    w = candidate_weights(r, 2.0)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([0.0, 2.0, 4.0]), 0))
    torch.testing.assert_close(candidate_weights(r, 0.0, "best"), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    # the control hands out the same weights in a random order
    gen = torch.Generator().manual_seed(0)
    shuffled = [candidate_weights(r, 2.0, control=True, generator=gen) for _ in range(50)]
    for s in shuffled:
        torch.testing.assert_close(s.sort(1).values, w.sort(1).values)
    assert any(not torch.equal(s, w) for s in shuffled)
    assert math.isclose(float(torch.stack(shuffled)[:, 0].mean(0).std()), 0.0, abs_tol=0.15)


def test_standardized_weights_tilt_every_state_alike():
    """--weighting standardized: a state whose candidates differ by a thousandth of reward gets the
    same weights as one whose candidates differ by a tenth in the same pattern (plain softmax
    leaves the first nearly uniform), and lambda = 0 or equal rewards give uniform weights."""
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randn(5, 8, generator=gen)
    small, large = 0.9 + 1e-3 * pattern, 0.3 + 0.1 * pattern
    w_small, w_large = candidate_weights(small, 1.0, "standardized"), candidate_weights(large, 1.0, "standardized")
    torch.testing.assert_close(w_small, w_large, atol=0.05, rtol=0)  # only the floor under the std (a tenth of it here) differs
    torch.testing.assert_close(w_large, torch.softmax(pattern / pattern.std(1, keepdim=True), 1), atol=1e-3, rtol=0)
    assert float(candidate_weights(small, 100.0).max()) < 0.2 < float(w_small.max())  # softmax(100 r): about uniform
    torch.testing.assert_close(candidate_weights(torch.full((2, 8), 0.5), 3.0, "standardized"), torch.full((2, 8), 1 / 8))
    torch.testing.assert_close(candidate_weights(large, 0.0, "standardized"), torch.full((5, 8), 1 / 8))


def test_shuffled_baseline_removes_the_control_drift_of_peaked_weights():
    # one-hot weights on 8 candidates, handed out at random: subtracting the unweighted posterior
    # (the first version) drives c_t up at every step (the model flattens the posterior towards
    # the candidates' mean); with the shuffled baseline what is left is noise around the base
    abar = ddpm.alphas_cumprod(100)
    base_c = (1 - abar[T_CHECK]).sqrt()
    shift = {}
    for target in ("posterior_first", "posterior"):
        model, _ = fit(0.0, control=True, k=8, target=target, weighting="best")
        shift[target] = float((model.c.detach()[T_CHECK] - base_c).mean())
    assert shift["posterior_first"] > 0.15 and abs(shift["posterior"]) < 0.05, shift


def test_replay_buffer_keeps_the_last_iterations_with_their_weights():
    buf = ReplayBuffer(2)
    parts = [{"cond": torch.full((3, 2), float(i)), "x0": torch.full((3, 4, 1, 1), float(i)),
              "w": torch.softmax(torch.randn(3, 4), 1)} for i in range(3)]
    for part in parts:
        buf.add(part)
    assert len(buf) == 6
    drawn = buf.sample(6, torch.Generator().manual_seed(0))
    assert sorted(drawn["cond"][:, 0].tolist()) == [1.0] * 3 + [2.0] * 3  # iteration 0 has left
    for row in range(6):  # each state keeps the weights it was collected with
        i = int(drawn["cond"][row, 0])
        assert any(torch.equal(drawn["w"][row], w) for w in parts[i]["w"])
        assert torch.all(drawn["x0"][row] == i)
    again = ReplayBuffer(2)
    again.load_state_dict(buf.state_dict(), "cpu")
    assert len(again) == 6 and torch.equal(again._cat["w"], buf._cat["w"])


def test_a_half_tilt_extrapolated_twice_lands_on_the_whole_tilt():
    """Base N(0, 1), r(x) = x: the fit at lambda 0.5, extrapolated by s = 2 from the base, samples
    with the mean of the lambda = 1 tilt (N(1, 1)), and s = 1 changes nothing."""
    model, abar = fit(0.5, control=False, target="posterior")
    base = LinearEps(abar)
    assert torch.equal(extrapolated_model(base, model, 1.0).b, model.b)
    doubled = extrapolated_model(base, model, 2.0)
    a = abar[T_CHECK]
    torch.testing.assert_close(doubled.b.detach()[T_CHECK], -(1 - a).sqrt() * a.sqrt() * 1.0, atol=0.08, rtol=0.1)
    gen = torch.Generator().manual_seed(1)
    timesteps, prev = ddpm.inference_timesteps(100, 10)
    with torch.no_grad():
        x = ddpm.sample(doubled, (4000, 1, 1), abar, timesteps, prev, clip_sample=False, generator=gen)
    assert abs(float(x.mean()) - 1.0) < 0.15
    with pytest.raises(ValueError, match="different tensors"):
        extrapolate_weights({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 2.0)


def test_soup_is_the_mean_update_moved_by_s():
    def ckpt(value):
        return {"ema_model_state_dict": {"w": torch.tensor([value, 2 * value]), "n": torch.tensor(3)},
                "provenance": {"method": "weighted"}}

    base, a, b = ckpt(1.0), ckpt(2.0), ckpt(4.0)
    torch.testing.assert_close(soup_checkpoint([a, a], base)["ema_model_state_dict"]["w"], a["ema_model_state_dict"]["w"])
    torch.testing.assert_close(soup_checkpoint([a, b], base)["ema_model_state_dict"]["w"], torch.tensor([3.0, 6.0]))
    two = soup_checkpoint([a, b], base, 2.0)
    torch.testing.assert_close(two["ema_model_state_dict"]["w"], torch.tensor([5.0, 10.0]))  # 1 + 2 * (3 - 1)
    assert two["ema_model_state_dict"]["n"] == 3 and two["provenance"] == {"method": "weighted", "extrapolate": 2.0,
                                                                             "soup_of": 2}


class _ValuePolicy:
    """Chunks (B, 2, 1) filled with a fresh standard normal value each; acts with them raw."""

    config = None

    def predict_action(self, obs, generator=None):
        x = torch.randn(obs.shape[0], 1, 1, generator=generator).expand(-1, 2, 1).clone()
        return {"action": x[:, :1], "action_pred": x, "action_pred_norm": x}


class _SumReward:
    def reward(self, obs, x0, envs=None, n_exec=None):
        return x0.flatten(1).sum(1)


def test_selecting_policy_acts_with_the_best_candidate_and_keeps_them_all():
    gen = torch.Generator().manual_seed(0)
    actor = SelectingPolicy(_ValuePolicy(), _SumReward(), k=5, generator=gen)
    for _ in range(3):  # three calls of 4 episodes
        out = actor.predict_action(torch.zeros(4, 2, 3), generator=gen)
        x0, r = actor.x0[-1], actor.r[-1]
        assert x0.shape == (4, 5, 2, 1) and r.shape == (4, 5)
        torch.testing.assert_close(out["action_pred_norm"], x0[torch.arange(4), r.argmax(1)])
    ep, call = np.array([0, 3, 2]), np.array([2, 0, 1])
    x0, r = actor.candidates(ep, call)
    torch.testing.assert_close(x0[1], actor.x0[0][3])
    torch.testing.assert_close(r[2], actor.r[1][2])
    # the control acts with a random candidate: not always the best
    control = SelectingPolicy(_ValuePolicy(), _SumReward(), k=5, control=True, generator=gen)
    picked_best = []
    for _ in range(10):
        out = control.predict_action(torch.zeros(4, 2, 3), generator=gen)
        best = control.x0[-1][torch.arange(4), control.r[-1].argmax(1)]
        picked_best += (out["action_pred_norm"] == best).flatten(1).all(1).tolist()
    assert 0 < sum(picked_best) < 20  # about 1 in 5 of 40
