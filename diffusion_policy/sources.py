"""Reward sources: what a candidate chunk is worth, and for Adjoint Matching its gradient.

Both score a chunk by the reward *after* its executed steps from the state of the call, in
the normalised action space the sampler works in:

- `ModelReward` (`--reward_source model`): the reward model of train_reward.py; its gradient
  is exact (autograd).
- `SimulatorReward` (`--reward_source simulator`): executes the chunk's executed steps on a
  copy of the call's environment (`PushTEnv.clone`) and reads the reward at the end, the
  quantity `reward_after` the reward model learns. It is the upper bound a learned reward is
  read against. Its gradient is estimated from values alone by antithetic perturbations of
  the executed steps (`antithetic_gradient`): the simulator has no usable derivative, and
  the chunk reward jumps where contact starts or ends.

A source is called with the raw observation windows `obs` (B, To, Do), the normalised chunks
`x0` (B, Tp, D), and for the simulator the environments of the calls `envs` (B,) and the
number of steps each call executes `n_exec` (B,).
"""

import numpy as np
import torch

from diffusion_policy.residual_policy import critic_dims

SOURCES = ("model", "simulator")  # what fine-tuning climbs; run-time selection may also choose by "critic"


class ModelReward:
    """r = the reward model's prediction; grad r by autograd."""

    name = "model"
    needs_env = False

    def __init__(self, reward_model, policy):
        self.reward_model, self.policy = reward_model, policy

    @torch.no_grad()
    def reward(self, obs, x0, envs=None, n_exec=None):
        return self._forward(obs, x0)

    @torch.no_grad()
    def frame_reward(self, frames):
        """The reward model's value of raw observation frames (B, Do) -> (B,) (a dynamics model's value part)."""
        return self.reward_model.frame_reward(torch.as_tensor(frames, dtype=torch.float32, device=self.policy.device))

    def reward_and_grad(self, obs, x0, envs=None, n_exec=None):
        x0 = x0.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self._forward(obs, x0)
            (grad,) = torch.autograd.grad(r.sum(), x0)
        return r.detach(), grad

    def _forward(self, obs, x0):
        obs = torch.as_tensor(obs, dtype=torch.float32, device=x0.device)
        return self.reward_model.reward(obs, self.policy.action_normalizer.unnormalize(x0))


class SimulatorReward:
    """r = the true reward after executing the chunk on a copy of the call's environment."""

    name = "simulator"
    needs_env = True

    def __init__(self, policy, sigma=0.05, pairs=8, generator=None):
        self.policy, self.sigma, self.pairs, self.generator = policy, sigma, pairs, generator

    @torch.no_grad()
    def reward(self, obs, x0, envs, n_exec):
        actions = self.policy.executed(self.policy.action_normalizer.unnormalize(x0)).cpu().numpy()
        if len(envs) != len(actions) or len(n_exec) != len(actions):
            raise ValueError(f"{len(actions)} chunks need as many envs and n_exec, got {len(envs)}, {len(n_exec)}")
        out = np.empty(len(actions))
        for i, (env, acts, n) in enumerate(zip(envs, actions, n_exec)):
            trial = env.clone()
            for a in acts[:int(n)]:
                r = trial.step(a)[1]
            out[i] = r
        return torch.as_tensor(out, dtype=torch.float32, device=x0.device)

    def reward_and_grad(self, obs, x0, envs, n_exec):
        x0 = x0.detach()
        mask = torch.zeros_like(x0[0])
        start = self.policy.config.obs_horizon - 1
        mask[start:start + self.policy.config.action_horizon] = 1.0  # only the executed steps matter

        def f(x):  # x (P, B, Tp, D) -> (P, B)
            flat = self.reward(None, x.flatten(0, 1), list(envs) * x.shape[0], np.tile(n_exec, x.shape[0]))
            return flat.view(x.shape[0], x.shape[1])

        grad = antithetic_gradient(f, x0, self.sigma, self.pairs, generator=self.generator, mask=mask)
        return self.reward(obs, x0, envs, n_exec), grad


class CriticValue:
    """r = Q(obs window, executed chunk): the mean over the ensemble of a chunk critic (the one --method
    residual trained beside its residual, or --method qam beside its denoiser): the value of acting with
    the chunk and then with the policy. Run-time selection reads its values (Q-chunking's actor,
    DICE-RL's best-of-N); Adjoint Matching toward a critic (--method qam) its gradient, exact by
    autograd (zero on the chunk's steps that are not executed)."""

    name = "critic"
    needs_env = False

    def __init__(self, critic, policy, pessimism=0.0):
        self.pessimism = pessimism  # the value is the ensemble's mean - this x its std (0: the mean)
        expected = critic_dims(policy.config)
        got = critic.shape["cond_dim"], critic.shape["exec_dim"]
        if got != expected:
            per_step = got == critic_dims(policy.config, per_step=True)
            raise ValueError(f"the critic reads observation windows and executed chunks of sizes {got}, the policy's "
                             f"are {expected}" + ("; it is a per-step critic (--method residual_step, or qam --critic_unit step), which values one action, "
                                                  "not a chunk: select by the critic of a --method residual run"
                                                  if per_step else ""))
        self.critic, self.policy = critic.to(policy.device), policy

    @torch.no_grad()
    def reward(self, obs, x0, envs=None, n_exec=None):
        return self._forward(obs, x0)

    def reward_and_grad(self, obs, x0, envs=None, n_exec=None):
        x0 = x0.detach().to(self.policy.device).requires_grad_(True)
        with torch.enable_grad():
            q = self._forward(obs, x0)
            (grad,) = torch.autograd.grad(q.sum(), x0)
        return q.detach(), grad

    def _forward(self, obs, x0):
        cond = self.policy.obs_cond(torch.as_tensor(obs, dtype=torch.float32))
        return pessimistic_mean(self.critic(cond, self.policy.executed(x0.to(self.policy.device))), self.pessimism)


def pessimistic_mean(q, pessimism):
    """(E, B) an ensemble's values -> (B,) their mean - pessimism x their std (0: the mean)."""
    return q.mean(0) - pessimism * q.std(0, unbiased=False) if pessimism else q.mean(0)


class StepCriticValue:
    """A per-step critic Q(window, one action) carried to a chunk (`--method qam --critic_unit step`): the chunk's
    value is the sum over its executed steps j of Qbar(window_j, a_j), each step's action valued at the window the
    rollout saw when it was executed, and its gradient is each step's own action gradient (zero on the steps that are
    not executed, or masked out). Qbar is the ensemble's mean - `pessimism` x its std. The residual per control
    step climbs the same gradients, one step at a time. The tilt meter has no later windows for a fresh chunk: it
    reads the first executed step, whose window is the call's (`reward`)."""

    name = "critic"
    needs_env = False

    def __init__(self, critic, policy, pessimism=0.0):
        self.pessimism = pessimism
        expected, got = critic_dims(policy.config, per_step=True), (critic.shape["cond_dim"], critic.shape["exec_dim"])
        if got != expected:
            raise ValueError(f"a per-step critic reads windows and one action of sizes {expected}, this one {got}")
        self.critic, self.policy = critic.to(policy.device), policy

    def _q(self, cond, actions):
        return pessimistic_mean(self.critic(cond, actions[:, None]), self.pessimism)

    @torch.no_grad()
    def reward(self, obs, x0, envs=None, n_exec=None):
        cond = self.policy.obs_cond(torch.as_tensor(obs, dtype=torch.float32))
        return self._q(cond, self.policy.executed(x0.to(self.policy.device))[:, 0])

    def steps_and_grad(self, step_cond, x0, mask):
        """step_cond (B, H, cond_dim): the window of each executed step; x0 (B, Tp, D) the clean chunks; mask (B, H)
        the steps that count. Returns (sum over counted steps of Qbar (B,), its gradient with respect to x0)."""
        x0 = x0.detach().to(self.policy.device).requires_grad_(True)
        with torch.enable_grad():
            a = self.policy.executed(x0)  # (B, H, D)
            q = self._q(step_cond.flatten(0, 1), a.flatten(0, 1)).view(mask.shape) * mask
            (grad,) = torch.autograd.grad(q.sum(), x0)
        return q.sum(1).detach(), grad


def antithetic_gradient(f, x, sigma, pairs, generator=None, mask=None):
    """Zeroth-order gradient of f at x from `pairs` antithetic Gaussian perturbations:

        g = mean_p (f(x + sigma u_p) - f(x - sigma u_p)) / (2 sigma) * u_p,   u_p ~ N(0, I) * mask

    f maps (P, B, ...) -> (P, B) (all perturbations of all B points in one call); x (B, ...).
    Unbiased for a quadratic f (exact in expectation), the gradient of the Gaussian-smoothed f
    in general; entries where mask is 0 are never perturbed and get gradient 0."""
    u = torch.randn((pairs, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    if mask is not None:
        u = u * mask
    values = f(torch.cat([x + sigma * u, x - sigma * u]))  # (2P, B)
    diff = (values[:pairs] - values[pairs:]) / (2 * sigma)
    return (diff.reshape(*diff.shape, *([1] * (x.ndim - 1))) * u).mean(0)


def make_source(name, policy, reward_model=None, generator=None):
    """The reward source `name` ('model' needs `reward_model`; the simulator's gradient draws from `generator`)."""
    if name == "model":
        if reward_model is None:
            raise ValueError("the model reward source needs a reward model")
        return ModelReward(reward_model, policy)
    if name == "simulator":
        return SimulatorReward(policy, generator=generator)
    raise ValueError(f"unknown reward source {name!r}; choose from {SOURCES}")
