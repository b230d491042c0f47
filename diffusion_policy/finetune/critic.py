"""The chunk critic's learning, shared by the residual methods and Adjoint Matching toward a critic.

`--method residual` / `residual_step` (residual.py, residual_step.py) climb its action gradient with a
bounded residual; `--method qam` (qam.py) takes its terminal adjoint from it. All three learn it the
same way, here:

- rewards of one episode's transitions, from the source's value v_c of each (a chunk's value, or a
  step's), shaped by the potential Phi = that value (`shaped_rewards`):
      r_c = gamma * v_c - v_(c-1)        and at the transition that succeeds: v_c - v_(c-1)
  so an episode's return is gamma^T v_T - v_(-1): the value reached, discounted by the time it took;
- n-step TD targets over them (`nstep_targets`), no bootstrap past the success (terminal) and none
  past the time limit (the last transition of a truncated episode starts none);
- a replay buffer of transitions (`ReplayBuffer`, fields `FIELDS`: the window's condition, the base's
  and the executed action, the n-step return, its bootstrap factor, the next window and the next
  base action);
- `TDCritic`: an ensemble of Q(obs window, executed action) MLPs with LayerNorm
  (diffusion_policy/residual_policy.py's `ChunkCritic`, what a policy checkpoint carries), Polyak target
  copies, and the TD loss against ret + disc * backup(target(next window, next action)), the backup
  the minimum over the ensemble or its mean - `backup_pessimism` x std (QAM's). The next action is
  the method's: the residual's acting policy at the next window, or what was executed there (QAM).
  The control (`--control`) permutes the (return, bootstrap factor) pairs across each batch: the
  same data and steps, no information about which action earned what or which one succeeded.
"""

import copy

import numpy as np
import torch

from diffusion_policy.common.cli import count, fraction, positive
from diffusion_policy.residual_policy import ChunkCritic

FIELDS = ("cond", "base", "act", "ret", "disc", "next_cond", "next_base")  # a transition, as stored


# the critic's settings, as flags of every method that learns one ({field: (type, help)})
CRITIC_FLAGS = {
    "hidden_dims": (count(1), "hidden layer sizes of each critic (and of the residual's MLP), e.g. 256 256"),
    "critic_lr": (positive, "the chunk critics' learning rate"),
    "num_critics": (count(1), "critics in the ensemble (the TD backup: their minimum, or with --backup_pessimism "
                              "their mean - that x std)"),
    "gamma": (fraction, "discount per policy call"),
    "n_step": (count(1), "calls summed in a TD target before bootstrapping"),
    "tau": (positive, "Polyak rate of the target critics, per optimiser step"),
    "batch_size": (count(1), "transitions per optimiser step"),
    "buffer_size": (count(1), "replay buffer capacity, transitions"),
    "warmup_iters": (count(0), "first iterations: only the critic learns (the policy acts as it starts)"),
}


def check_critic_settings(cfg):
    """Raise ValueError, in one line, for a config whose critic settings (CRITIC_FLAGS' fields) cannot run."""
    if not cfg.hidden_dims or min(cfg.hidden_dims) < 1:
        raise ValueError(f"hidden_dims must be positive sizes, got {cfg.hidden_dims}")
    for name in ("num_critics", "n_step", "batch_size", "buffer_size"):
        if int(getattr(cfg, name)) != getattr(cfg, name) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {getattr(cfg, name)!r}")
    if cfg.buffer_size < cfg.batch_size:
        raise ValueError(f"buffer_size ({cfg.buffer_size}) must hold at least one batch ({cfg.batch_size})")
    if cfg.warmup_iters < 0 or cfg.warmup_iters >= cfg.num_ft_iters:
        raise ValueError(f"warmup_iters must be in [0, num_ft_iters), got {cfg.warmup_iters}")
    if not cfg.critic_lr > 0:
        raise ValueError(f"critic_lr must be > 0, got {cfg.critic_lr!r}")
    if not 0.0 <= cfg.gamma < 1.0 or not 0.0 < cfg.tau <= 1.0:
        raise ValueError(f"gamma must be in [0, 1) and tau in (0, 1], got {cfg.gamma}, {cfg.tau}")


def shaped_rewards(values, start_value, terminal, gamma):
    """Per-transition rewards of one episode: r_c = gamma v_c - v_(c-1), and v_c - v_(c-1) at a terminal one.

    values (L,) the source's value after each transition, start_value v_(-1), terminal (L,) bool."""
    values = np.asarray(values, dtype=np.float64)
    prev = np.concatenate([[start_value], values[:-1]])
    return np.where(terminal, values, gamma * values) - prev


def nstep_targets(rewards, terminal_at, gamma, n):
    """n-step returns of one episode's transitions 0..L-1 with rewards (L,).

    terminal_at: the index of the transition that ended the episode (success), or None if the time limit
    cut it (then the last one starts no transition: its next state was never sampled).
    Returns (index (M,), ret (M,), disc (M,), next_index (M,)): transition c sums
    rewards c .. c + m - 1 (m = n or fewer at the end), bootstraps from next_index = c + m with
    factor disc = gamma^m, and disc = 0 where the sum reaches the terminal transition."""
    rewards = np.asarray(rewards, dtype=np.float64)
    L = len(rewards)
    last = terminal_at if terminal_at is not None else L - 1  # transitions that may start one: 0 .. last(-1)
    starts = np.arange(last + 1 if terminal_at is not None else L - 1)
    ret, disc, nxt = np.zeros(len(starts)), np.zeros(len(starts)), np.zeros(len(starts), dtype=np.int64)
    for j, c in enumerate(starts):
        end = min(c + n, last + 1) if terminal_at is not None else min(c + n, L - 1)
        m = end - c
        ret[j] = sum(gamma ** k * rewards[c + k] for k in range(m))
        done = terminal_at is not None and end == terminal_at + 1
        disc[j] = 0.0 if done else gamma ** m
        nxt[j] = min(end, L - 1)
    return starts, ret, disc, nxt


def chunk_values(source, calls, obs, chunks, device):
    """v (N, C): each executed chunk's value, the simulator's reward after it (recorded by the rollout),
    or the reward model's prediction for obs (N, C, To, Do) and the normalised chunks (N, C, Tp, D)."""
    if source.name == "simulator":
        return np.asarray(calls["reward_after"], dtype=np.float64)
    r = source.reward(obs.flatten(0, 1), chunks.flatten(0, 1).to(device))
    return r.view(obs.shape[:2]).double().cpu().numpy()


def step_values(source_values, call_steps, n_steps, start_value, success_step):
    """u (n_steps,): the value after each control step of one episode, from chunk values.

    source_values (C,): the value of each call's executed chunk; call_steps (C,): the control step
    at which each call began; success_step: the step that succeeded (-1: none). A step carries the
    value of the last chunk finished by it, the start value before the first, and the succeeding
    step its chunk's own."""
    ends = np.append(call_steps[1:], n_steps) - 1  # the last step of each call
    u = np.full(n_steps, float(start_value))
    for c, end in enumerate(ends):
        u[end:] = source_values[c]
    if success_step >= 0:
        u[success_step] = source_values[np.searchsorted(ends, success_step)]
    return u


def _add_episode(out, i, cond, base, act, r, terminal_at, gamma, n):
    """Episode i's n-step transitions from its rewards r (L,) into out ({field: [tensor per episode]})."""
    idx, ret, disc, nxt = nstep_targets(r, terminal_at, gamma, n)
    for k, v in (("cond", cond[i, idx]), ("base", base[i, idx]), ("act", act[i, idx]), ("ret", ret),
                 ("disc", disc), ("next_cond", cond[i, nxt]), ("next_base", base[i, nxt])):
        out[k].append(torch.as_tensor(np.asarray(v), dtype=torch.float32))


def step_transitions(potentials, starts, steps_to_success, cond, base, act, gamma, n):
    """The n-step transitions of per-step rollouts ({field: [tensor per episode]}), as residual_step and qam's
    per-step critic (`--critic_unit step`) learn them.

    potentials: per episode u (L,), the source's value after each of its control steps up to and with the one
    that succeeded (all T if none did); starts (N,): u before the first step; steps_to_success (N,) (-1: none);
    cond (N, T, cond_dim), base and act (N, T, 1, D): the window, the base's and the executed action of each step."""
    out = {k: [] for k in FIELDS}
    for i, u in enumerate(potentials):
        sts = int(steps_to_success[i])
        terminal_at = sts - 1 if sts >= 0 else None
        term = np.zeros(len(u), bool)
        if terminal_at is not None:
            term[terminal_at] = True
        _add_episode(out, i, cond, base, act, shaped_rewards(u, starts[i], term, gamma), terminal_at, gamma, n)
    return out


def chunk_transitions(calls, steps_to_success, values, cond, base, act, gamma, n_step):
    """The n-step transitions of a rollout's policy calls ({field: [tensor per episode]}).

    calls: rollout's per-call record (active, reward_before, step, n_exec); steps_to_success (N,);
    values (N, C) the source's value of each executed chunk; cond (N, C, cond_dim), base and act
    (N, C, H, D): the base's and the executed chunk of each call (the same for a policy without a residual)."""
    out = {k: [] for k in FIELDS}
    end_calls = calls["step"] + calls["n_exec"]
    for i in range(len(values)):
        L = int(calls["active"][i].sum())
        sts = steps_to_success[i]
        terminal_at = int(np.searchsorted(end_calls, sts)) if sts >= 0 else None
        term = np.zeros(L, bool)
        if terminal_at is not None:
            term[terminal_at] = True
        r = shaped_rewards(values[i, :L], calls["reward_before"][i, 0], term, gamma)
        _add_episode(out, i, cond, base, act, r, terminal_at, gamma, n_step)
    return out


class ReplayBuffer:
    """A ring of transitions (FIELDS), as float32 tensors on the CPU."""

    def __init__(self, capacity, shapes):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.data = {k: torch.zeros((capacity, *shapes[k])) for k in FIELDS}

    def add(self, batch):
        n = len(batch["ret"])
        idx = (self.pos + torch.arange(n)) % self.capacity
        for k in FIELDS:
            self.data[k][idx] = torch.as_tensor(batch[k], dtype=torch.float32)
        self.pos, self.size = int((self.pos + n) % self.capacity), min(self.capacity, self.size + n)

    def sample(self, n, generator):
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self):
        return {"size": self.size, "pos": self.pos, "data": {k: v[:self.size].clone() for k, v in self.data.items()}}

    def load_state_dict(self, state):
        self.size, self.pos = state["size"], state["pos"]
        for k, v in state["data"].items():
            self.data[k][:self.size] = v


class TDCritic:
    """The critic ensemble, its Polyak targets and its replay buffer; the TD loss and the target update.

    cond_dim: the flattened window; exec_shape (H, D): the executed action it values; backup_pessimism
    None: the TD backup is the ensemble's minimum (the residual's), else mean - this x std (QAM's)."""

    def __init__(self, cond_dim, exec_shape, hidden_dims, num_critics, buffer_size, tau, device,
                 backup_pessimism=None):
        self.tau, self.backup_pessimism = tau, backup_pessimism
        self.critic = ChunkCritic(cond_dim, int(np.prod(exec_shape)), hidden_dims, num_critics).to(device)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.buffer = ReplayBuffer(buffer_size, {"cond": (cond_dim,), "base": exec_shape, "act": exec_shape,
                                                 "ret": (), "disc": (), "next_cond": (cond_dim,),
                                                 "next_base": exec_shape})

    def backup(self, q):
        """(E, B) ensemble values -> (B,) the pessimistic value a TD target bootstraps from."""
        if self.backup_pessimism is None:
            return q.min(0).values
        return q.mean(0) - self.backup_pessimism * q.std(0, unbiased=False)

    def td_target(self, b, next_act, control=False, generator=None):
        """ret + disc * backup(target(next window, next_act)); control: (ret, disc) pairs permuted across b."""
        with torch.no_grad():
            next_q = self.backup(self.target(b["next_cond"], next_act))
            ret, disc = b["ret"], b["disc"]
            if control:  # (return, bootstrap factor) pairs of other transitions: disc = 0 marks a success
                perm = torch.randperm(len(ret), generator=generator)
                ret, disc = ret[perm], disc[perm]
            return ret + disc * next_q

    def loss(self, b, target):
        """The ensemble's TD loss on batch b against `target` (B,), and its metrics."""
        q = self.critic(b["cond"], b["act"])
        critic_loss = ((q - target) ** 2).mean(1).sum()
        return critic_loss, {"critic_loss": critic_loss.item(), "q_mean": q.mean().item()}

    def update_target(self):
        with torch.no_grad():
            for p, tp in zip(self.critic.parameters(), self.target.parameters()):
                tp.lerp_(p, self.tau)

    def state_dict(self):
        return {"critic": self.critic.state_dict(), "target": self.target.state_dict(),
                "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        self.buffer.load_state_dict(state["buffer"])
