"""Adjoint Matching against analytic answers and brute-force autograd.

A Gaussian base N(m, s^2 I) has an exact noise predictor, every (unclamped) sampler step is
then linear-Gaussian, and the reward-tilted target is known in closed form. Fine-tuning must
land on it; each of the classic mistakes (wrong sign, missing sigma, the adjoint of the
step's input instead of its output, the Jacobian of the fine-tuned model) must miss it by
more than the tolerance, which these tests also check.
"""

import pytest
import torch

from diffusion_policy import ddpm
from diffusion_policy.adjoint_matching import (
    adjoint_matching_loss,
    lean_adjoint,
    sample_loss_steps,
    step_params,
)
from diffusion_policy.model import ConditionalUnet1D, UNetConfig

T_TRAIN, K = 100, 10
SHAPE = (4, 2)  # a chunk of 4 steps x 2 dims: 8 independent coordinates
M, S = 0.2, 0.5  # data ~ N(M, S^2 I)
ABAR = ddpm.alphas_cumprod(T_TRAIN).double()
TIMESTEPS, PREV = ddpm.inference_timesteps(T_TRAIN, K)


def eps_star(x, t):
    """The exact noise predictor of N(M, S^2 I)."""
    a = ABAR[t].reshape(-1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)


class AffineCorrection(torch.nn.Module):
    """eps_ft = eps* + A_k x + b_k per sampling step k, zero-initialised: the optimal control of a
    linear or quadratic reward on a Gaussian base is of this form, so the test measures the
    algorithm, not the network's capacity."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(T_TRAIN, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(T_TRAIN, *SHAPE, dtype=torch.float64))

    def forward(self, x, t):
        return eps_star(x, t) + self.scale[t].reshape(-1, 1, 1) * x + self.bias[t]


def sample(eps_fn, n, generator, return_trajectory=False):
    return ddpm.sample(eps_fn, (n, *SHAPE), ABAR, TIMESTEPS, PREV, clip_sample=False, generator=generator,
                       return_trajectory=return_trajectory, device=torch.device("cpu"))


def base_moments():
    with torch.no_grad():
        x = sample(eps_star, 200_000, torch.Generator().manual_seed(0)).double()
    return x.mean(0), x.var(0)  # (4, 2) each; the sampler's own N(m', S')


def fine_tune(grad_reward, lam, bug=None, iterations=120, batch=1280, lr=0.05, seed=0):
    """Adjoint Matching on the Gaussian base with the library's functions; `bug` injects one mistake.
    120 iterations of 1,280 chains: the same 153,600 chains as 300 x 512, the same errors (0.006 linear,
    0.002 quadratic), in half the time (per-iteration overhead dominates at this size)."""
    torch.manual_seed(seed)
    ft = AffineCorrection()
    opt = torch.optim.Adam(ft.parameters(), lr=lr)
    # decay to zero so the last iterates average out the sampling noise of the loss
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / iterations)
    g = torch.Generator().manual_seed(seed)
    controlled = list(range(K - 1))
    _, _, sig = step_params(ABAR, TIMESTEPS, PREV)
    for _ in range(iterations):
        with torch.no_grad():
            _, traj = sample(ft, batch, g, return_trajectory=True)
        traj = traj.double()
        terminal = -lam * grad_reward(traj[-1])
        if bug == "sign":
            terminal = -terminal
        jac_model = ft if bug == "jacobian_of_ft" else eps_star
        adj = lean_adjoint(jac_model, traj, TIMESTEPS, PREV, ABAR, terminal, clip_sample=False)
        if bug == "input_pairing":  # pair step j with a[j] (its input) instead of a[j + 1]
            adj = torch.cat([adj[:1], adj[:-1]])
        if bug == "missing_sigma":  # target -a instead of -sig * a
            adj = adj / torch.cat([sig, torch.ones(1, dtype=sig.dtype)]).clamp_min(1e-12).roll(1).reshape(-1, 1, 1, 1)
        loss, _ = adjoint_matching_loss(ft, eps_star, traj, adj, TIMESTEPS, PREV, ABAR, controlled,
                                        clip_sample=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        x = sample(ft, 200_000, torch.Generator().manual_seed(99)).double()
    return x.mean(0), x.var(0)


W = torch.tensor([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.25], [0.0, -0.75]], dtype=torch.float64)
LAM_LINEAR = 2.0


@pytest.fixture(scope="module")
def moments():
    return base_moments()


def test_base_sampler_is_a_gaussian_near_the_data(moments):
    """With K = 10 ancestral steps (fixed_small variance) the sampler keeps the mean but shrinks
    the variance (0.151 against s^2 = 0.25; 0.233 with K = 100): the targets below use the
    measured N(m', S'), as the recipe prescribes."""
    mean, var = moments
    assert torch.allclose(mean, torch.full_like(mean, M), atol=0.01)
    assert 0.5 * S**2 < var.min() and var.max() < S**2
    assert var.max() / var.min() < 1.03  # isotropic


def test_linear_reward_reaches_the_tilted_mean(moments):
    base_mean, base_var = moments
    target = base_mean + LAM_LINEAR * base_var * W  # N(m' + lam S' w, S')
    mean, var = fine_tune(lambda x: W.expand_as(x), LAM_LINEAR)
    shift = (target - base_mean).abs().max()
    assert shift > 0.3  # the test moves the mean far enough to tell right from wrong
    assert (mean - target).abs().max() < 0.03, (mean, target)
    assert torch.allclose(var, base_var, rtol=0.1)  # a linear tilt leaves the covariance


@pytest.mark.parametrize("bug", ["sign", "missing_sigma", "input_pairing"])
def test_each_mistake_misses_the_tilted_mean(moments, bug):
    base_mean, base_var = moments
    target = base_mean + LAM_LINEAR * base_var * W
    mean, _ = fine_tune(lambda x: W.expand_as(x), LAM_LINEAR, bug=bug)
    assert (mean - target).abs().max() > 0.06, (bug, mean, target)


GOAL = torch.tensor([[0.8, -0.4]] * 4, dtype=torch.float64)
RHO, LAM_QUAD = 0.5, 1.0


def quadratic_target(base_mean, base_var):
    precision = 1 / base_var + LAM_QUAD / RHO**2
    return (base_mean / base_var + LAM_QUAD * GOAL / RHO**2) / precision, 1 / precision


def test_quadratic_reward_moves_mean_and_variance_as_predicted(moments):
    target_mean, target_var = quadratic_target(*moments)
    mean, var = fine_tune(lambda x: -(x - GOAL) / RHO**2, LAM_QUAD)  # grad of -|x - g|^2 / (2 rho^2)
    assert (mean - target_mean).abs().max() < 0.03, (mean, target_mean)
    assert torch.allclose(var, target_var, rtol=0.1), (var, target_var)
    assert (target_var / moments[1]).max() < 0.7  # the variance really shrinks (by 38 %), well past rtol


def test_jacobian_of_the_fine_tuned_model_misses_the_quadratic_target(moments):
    target_mean, target_var = quadratic_target(*moments)
    mean, var = fine_tune(lambda x: -(x - GOAL) / RHO**2, LAM_QUAD, bug="jacobian_of_ft")
    assert (mean - target_mean).abs().max() > 0.03 or not torch.allclose(var, target_var, rtol=0.1)


# ----------------------------------------------------------------------------------------
# the lean adjoint against autograd through the whole unrolled sampler
# ----------------------------------------------------------------------------------------
def test_lean_adjoint_equals_autograd_through_the_unrolled_base_sampler():
    torch.manual_seed(0)
    model = ConditionalUnet1D(UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16)).double().eval()
    cond = torch.randn(3, 40, dtype=torch.float64)
    abar = ddpm.alphas_cumprod(100).double()
    timesteps, prev = ddpm.inference_timesteps(100, 8)
    noise = torch.randn(9, 3, 16, 2, dtype=torch.float64) * 0.5
    w = torch.randn(16, 2, dtype=torch.float64)

    def eps_fn(x, t):
        return model(x, t, cond)

    def reward(x0):
        return (torch.tanh(x0) * w).sum(dim=(1, 2))  # non-linear, per sample

    lam = 1.7
    # brute force: the sampler unrolled with fixed noise, differentiated end to end
    x_start = noise[0].clone().requires_grad_(True)
    xs = [x_start]
    x = x_start
    for k in range(8):
        x = ddpm.step_mean(eps_fn(x, timesteps[k].expand(3)), x, ddpm.abar_at(abar, timesteps[k]),
                           ddpm.abar_at(abar, prev[k]), clip_sample=True)
        if timesteps[k] > 0:
            x = x + ddpm.step_std(ddpm.abar_at(abar, timesteps[k]), ddpm.abar_at(abar, prev[k])) * noise[k + 1]
        x.retain_grad()
        xs.append(x)
    (-lam * reward(x).sum()).backward()

    with torch.no_grad():
        _, traj = ddpm.sample(eps_fn, (3, 16, 2), abar, timesteps, prev, clip_sample=True, noise=noise,
                              return_trajectory=True)
    x0 = traj[-1].clone().requires_grad_(True)
    (grad_r,) = torch.autograd.grad(reward(x0).sum(), x0)
    adj = lean_adjoint(eps_fn, traj, timesteps, prev, abar, -lam * grad_r, clip_sample=True)
    assert torch.allclose(traj, torch.stack([v.detach() for v in xs]), atol=1e-12)
    for j in range(9):
        torch.testing.assert_close(adj[j], xs[j].grad, rtol=1e-9, atol=1e-10)
    assert adj[0].abs().max() > 1e-3  # the gradient reaches the noise


def tiny_unets_and_chain(batch, seed, same_weights):
    """A frozen base and a fine-tuned tiny UNet (equal weights or not), a condition, the K = 10
    schedule, and a sampled chain of the fine-tuned model."""
    torch.manual_seed(seed)
    base = ConditionalUnet1D(UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16)).eval()
    ft = ConditionalUnet1D(UNetConfig(down_dims=(16, 32), diffusion_step_embed_dim=16))
    if same_weights:
        ft.load_state_dict(base.state_dict())
    cond = torch.randn(batch, 40)
    abar = ddpm.alphas_cumprod(100)
    timesteps, prev = ddpm.inference_timesteps(100, 10)
    with torch.no_grad():
        _, traj = ddpm.sample(lambda x, t: ft(x, t, cond), (batch, 16, 2), abar, timesteps, prev,
                              generator=torch.Generator().manual_seed(0), return_trajectory=True)
    return base, ft, cond, abar, timesteps, prev, traj


def test_loss_and_its_gradient_vanish_when_fine_tuned_equals_base_and_reward_is_flat():
    base, ft, cond, abar, timesteps, prev, traj = tiny_unets_and_chain(4, seed=0, same_weights=True)
    adj = lean_adjoint(lambda x, t: base(x, t, cond), traj, timesteps, prev, abar, torch.zeros(4, 16, 2))
    assert adj.abs().max() == 0
    loss, norms = adjoint_matching_loss(lambda x, t: ft(x, t, cond), lambda x, t: base(x, t, cond), traj, adj,
                                        timesteps, prev, abar, list(range(9)))
    loss.backward()
    assert loss.item() == 0.0 and norms.max() == 0
    assert max(p.grad.abs().max().item() for p in ft.parameters() if p.grad is not None) == 0.0
    with pytest.raises(ValueError, match="sig = 0"):
        adjoint_matching_loss(lambda x, t: ft(x, t, cond), lambda x, t: base(x, t, cond), traj, adj,
                              timesteps, prev, abar, [9])


def test_batched_loss_equals_the_step_by_step_loss():
    """One forward pass over all chosen steps (fine-tuning's path, DDP-friendly) = one per step."""
    base, ft, cond, abar, timesteps, prev, traj = tiny_unets_and_chain(5, seed=1, same_weights=False)
    adj = torch.randn(traj.shape, generator=torch.Generator().manual_seed(2))
    steps = [0, 3, 4, 8]

    def fn(model):
        return lambda x, t: model(x, t, cond.repeat(x.shape[0] // cond.shape[0], 1))

    grads = []
    for batched in (False, True):
        ft.zero_grad()
        per, norms = adjoint_matching_loss(fn(ft), fn(base), traj, adj, timesteps, prev, abar, steps,
                                           per_sample=True, batched=batched)
        per.mean().backward()
        grads.append((per.detach(), norms, [p.grad.clone() for p in ft.parameters()]))
    (p0, n0, g0), (p1, n1, g1) = grads
    assert p0.shape == (5, 4) and p0.min() > 0
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        # float32 sums in another order: an element's error scales with the tensor's terms, not with
        # the element (an entry near zero may differ by 2 % of itself); 1e-4 of the largest entry
        assert (b - a).abs().max() <= 1e-4 * a.abs().max() + 1e-8


def test_loss_steps_skip_the_last_step_and_mix_noisy_and_clean():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        steps = sample_loss_steps(10, 4, generator=g)
        assert len(steps) == 4 and steps.max() < 9 and len(set(steps.tolist())) == 4
        assert (steps < 5).sum() >= 2 and (steps >= 5).sum() >= 1
    assert sample_loss_steps(10, 20).tolist() == list(range(9))
