"""Adjoint Matching for a DDPM policy (Domingo-Enrich et al., 2024), as pure tensor functions.

The ancestral DDPM sampler (DDIM with eta = 1, the memoryless schedule) is the controlled
process. With the base model's step mean mu_b and the fine-tuned model's mu_f, a fine-tuned
step is x' = mu_b(x) + sig (u + z) with the control u = (mu_f(x) - mu_b(x)) / sig.

Trajectories are indexed in sampling order: traj[0] = x_K (noise) ... traj[K] = x_0 (the
clean chunk); step j maps traj[j] -> traj[j + 1] at timestep t_j (t_{K-1} = 0, the last,
noise-free step). The lean adjoint runs backwards through the frozen base model only:

    a[K] = -lam * grad_x r(x_0)                                  (normalised action space)
    a[j] = (d mu_b(traj[j]) / d traj[j])^T a[j + 1]              (one batched VJP per step)

and the loss at a chosen step j pairs the step's control with the adjoint of its *output*:

    L = mean || u_j + sig_j a[j + 1] ||^2

The last step (sig = 0) carries no control and is never in the loss. Reference and the
analytic Gaussian test: Domingo-Enrich et al. (2024), arXiv:2409.08861, and tests/test_adjoint_matching.py.
"""

import torch

from diffusion_policy import ddpm


def step_params(abar, timesteps, prev_timesteps):
    """Per-step (abar_t, abar_t', sig) for the K sampling steps: three (K,) tensors."""
    abar_t = ddpm.abar_at(abar, timesteps)
    abar_prev = ddpm.abar_at(abar, prev_timesteps)
    sig = torch.where(timesteps > 0, ddpm.step_std(abar_t, abar_prev), torch.zeros_like(abar_t))
    return abar_t, abar_prev, sig


def step_means(eps_fn, x, t, abar_t, abar_prev, clip_sample=True):
    """mu(x) of one sampler step for a batch: eps_fn(x (B, T, D), t (B,)) -> mu (B, T, D)."""
    return ddpm.step_mean(eps_fn(x, t.expand(x.shape[0])), x, abar_t, abar_prev, clip_sample)


def lean_adjoint(base_eps_fn, trajectory, timesteps, prev_timesteps, abar, terminal_adjoint, clip_sample=True,
                 steps=None, clip_value=None):
    """Solve the lean adjoint backwards through the frozen base model.

    base_eps_fn(x, t) -> eps of the base model (its condition bound in the closure).
    trajectory (K + 1, B, T, D); terminal_adjoint (B, T, D) = -lam * grad r(x_0).
    Returns adjoints (K + 1, B, T, D): a[j] is the adjoint of trajectory[j].
    `steps`: optionally, only VJPs down to min(steps) are computed (earlier entries zero),
    since a loss on steps S needs a[j + 1] for j in S only.
    `clip_value`: clamp every adjoint element-wise to [-clip_value, clip_value] as it is
    computed (a stabiliser against rare huge reward gradients; off when None).
    """
    K = trajectory.shape[0] - 1
    abar_t, abar_prev, _ = step_params(abar, timesteps, prev_timesteps)
    def clip(a):
        return a if clip_value is None else a.clamp(-clip_value, clip_value)

    adjoints = torch.zeros_like(trajectory)
    a = clip(terminal_adjoint)
    adjoints[K] = a
    lowest = 0 if steps is None else min(int(j) for j in steps) + 1
    for j in range(K - 1, lowest - 1, -1):
        x = trajectory[j].detach().requires_grad_(True)
        with torch.enable_grad():
            mu = step_means(base_eps_fn, x, timesteps[j], abar_t[j], abar_prev[j], clip_sample)
            (a,) = torch.autograd.grad(mu, x, grad_outputs=a)  # a_j = (dmu/dx)^T a_{j+1}
        a = clip(a)
        adjoints[j] = a
    return adjoints


def adjoint_matching_loss(ft_eps_fn, base_eps_fn, trajectory, adjoints, timesteps, prev_timesteps, abar, steps,
                          clip_sample=True, per_sample=False, batched=False):
    """Adjoint Matching loss at sampling steps `steps` (never the last, noise-free one).

    u_j = (mu_f(x_j) - mu_b(x_j)) / sig_j, with gradients through the fine-tuned model only;
    residual_j = u_j + sig_j * a[j + 1]; loss = mean over samples and steps of ||residual||^2
    (summed over the chunk's entries). Returns the scalar loss, or (B, len(steps)) per sample
    and step if per_sample, and the control norms ||u_j|| (B, len(steps)) for logging.
    batched: evaluate both models once on all chosen steps stacked along the batch
    (x (S * B, T, D), t (S * B,): the eps functions must take that; the same result, faster,
    and one forward pass per update as DistributedDataParallel wants).
    """
    abar_t, abar_prev, sig = step_params(abar, timesteps, prev_timesteps)
    steps = [int(j) for j in steps]
    for j in steps:
        if sig[j] <= 0:
            raise ValueError(f"step {j} (t = {int(timesteps[j])}) has sig = 0 and carries no control")
    B = trajectory.shape[1]
    if batched:
        x = trajectory[steps].detach().flatten(0, 1)  # (S * B, T, D), step-major
        t = timesteps[steps].repeat_interleave(B)
        with torch.no_grad():
            eps_b = base_eps_fn(x, t)
        eps_f = ft_eps_fn(x, t)
        eps_b, eps_f = eps_b.unflatten(0, (len(steps), B)), eps_f.unflatten(0, (len(steps), B))
    losses, control_norms = [], []
    for i, j in enumerate(steps):
        x = trajectory[j].detach()
        if batched:
            mu_b = ddpm.step_mean(eps_b[i], x, abar_t[j], abar_prev[j], clip_sample)
            mu_f = ddpm.step_mean(eps_f[i], x, abar_t[j], abar_prev[j], clip_sample)
        else:
            with torch.no_grad():
                mu_b = step_means(base_eps_fn, x, timesteps[j], abar_t[j], abar_prev[j], clip_sample)
            mu_f = step_means(ft_eps_fn, x, timesteps[j], abar_t[j], abar_prev[j], clip_sample)
        u = (mu_f - mu_b) / sig[j]
        residual = u + sig[j] * adjoints[j + 1].detach()  # target of u is -sig * a (the step's output)
        losses.append(residual.flatten(1).square().sum(-1))
        control_norms.append(u.detach().flatten(1).norm(dim=-1))
    per = torch.stack(losses, dim=1)
    norms = torch.stack(control_norms, dim=1)
    return (per if per_sample else per.mean()), norms


def sample_loss_steps(num_steps, k, generator=None, noisy_fraction=0.6):
    """Choose k of the K - 1 controlled steps: half from the noisiest 60 %, half from the rest.

    Step indices are in sampling order (0 = noisiest); the last step K - 1 is never chosen.
    """
    controlled = num_steps - 1
    if controlled < 1:
        raise ValueError("a sampler with one step has no controlled step")
    k = min(k, controlled)
    n_noisy = max(1, int(round(controlled * noisy_fraction)))
    noisy, rest = torch.arange(n_noisy), torch.arange(n_noisy, controlled)
    from_noisy = min(len(noisy), max(k - len(rest), (k + 1) // 2))
    from_rest = k - from_noisy
    pick = [noisy[torch.randperm(len(noisy), generator=generator)[:from_noisy]]]
    if from_rest:
        pick.append(rest[torch.randperm(len(rest), generator=generator)[:from_rest]])
    return torch.sort(torch.cat(pick)).values
