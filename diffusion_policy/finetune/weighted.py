"""Reward-weighted denoising (`--method weighted`): reach the tilt from the values of r alone.

At the states the current policy visits, draw K candidate chunks (from the current policy, or
with --candidates base from the pre-trained one), score them with the reward source and weight
them per state by w = softmax(lambda r) (self-normalised importance weights of the tilt
p(chunk | obs) exp(lambda r)), or put all weight on the best (`--weighting best`, lambda ->
infinity on K samples), or softmax(lambda z) of the state's standardised rewards z = (r - mean)
/ std (`--weighting standardized`): a fixed lambda tilts a state whose candidates differ by a
thousandth of coverage (the last pushes before success) as much as one where they differ by a
tenth, as picking the best of K does. No gradient of r is used. The tilt is fitted *as a correction to the
frozen base model*, by one of two losses with the same minimiser:

- `--target posterior` (default, `posterior_tilt_loss`): treat the K candidates as the base's
  distribution at the state; for a noised chunk x_t, the tilted noise predictor is the base's
  plus a correction that depends only on the posterior over which candidate x_t came from,
  under uniform and under w weights. The loss regresses e(x_t) on e_base(x_t) + correction:
  the candidates are integrated out (Rao-Blackwell), so the target carries no eps noise, and
  it costs one network call per state.
- `--target sample` (`weighted_denoising_loss`): per state, the K candidates noised with one
  shared (t, eps) (common random numbers),

      L = sum_i (w_i - 1/K) || e(x_t^i) - eps ||^2  +  beta / K * sum_i || e(x_t^i) - e_base(x_t^i) ||^2

  For beta = 1 and a base that denoises its own samples its minimiser at every x_t is the
  tilted noise predictor E_tilt[eps | x_t].

tests/test_weighted.py checks both on a Gaussian with a linear reward, where the tilt is
analytic. What they share, and a plain weighted denoising loss lacks:

- with weights that carry no information (the control: a state's weights handed to its
  candidates at random) the expected update is zero, so the policy does not drift towards its
  own samples' errors; the control run measures what remains (update noise);
- the anchor is the *pre-trained* model, not the current one (`--anchor base`, default).

`--anchor current` takes the fine-tuned model's own prediction (no gradient) as the reference
instead: the target is then always the current policy plus the correction, so each step moves
the policy along the tilt of what it proposes now, and the steps compound (an iterated tilt,
lambda growing with the steps) instead of settling on the base's one tilt. The update no
longer has the base's tilt as its fixed point, and its control, whose correction still has mean
zero, has nothing pulling it back to the base either (a random walk). Posterior target only:
the sample loss's weighted term has no minimum without a fixed reference.

`--anchor ema` is in between: the reference is the EMA of the fine-tuned weights, which follows
the policy with a lag of about 1 / (1 - decay) steps. The fit is pulled to the EMA's prediction
plus the correction (a trust region around a slowly moving reference, like a target network),
so the tilt compounds about once per EMA time constant, not once per step.

--anchor_weight beta > 1 stops short of the tilt (a trust region): the sample loss as above,
the posterior loss fits base + correction / beta. docs/finetuning.md has what each reached.
"""

import numpy as np
import torch

from diffusion_policy import ddpm
from diffusion_policy import rollout as rollout_module

WEIGHTINGS = ("softmax", "best", "standardized")
STD_FLOOR = 1e-4  # reward units: a state whose candidates all score the same gets uniform weights
ANCHORS = ("base", "current", "ema")
BEHAVIOURS = ("policy", "best")
TARGETS = ("posterior", "sample")


def candidate_weights(r, reward_scale, weighting="softmax", control=False, generator=None):
    """Per-state weights (S, K) of K candidates from their rewards r (S, K).

    control: the same weights, each state's handed to its candidates in a random order (the
    choice made at random: same data volume, same weight distribution, no information)."""
    r = torch.as_tensor(r, dtype=torch.float32)
    if control:
        r = shuffle_rows(r, generator)
    if weighting == "best":
        return torch.nn.functional.one_hot(r.argmax(dim=1), r.shape[1]).to(r.dtype)
    if weighting == "softmax":
        return torch.softmax(reward_scale * r, dim=1)
    if weighting == "standardized":
        return torch.softmax(reward_scale * standardize_rows(r), dim=1)
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def standardize_rows(r):
    """Each state's rewards in units of their own spread, (r - mean) / (std + STD_FLOOR): lambda then
    tilts every state as strongly, whether its candidates differ by 0.1 or by 0.001 of reward
    (--weighting standardized; the group-normalised advantage of GRPO-style updates)."""
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + STD_FLOOR)


def weighted_denoising_loss(eps_fn, base_eps_fn, x0, weights, noise, t, abar, anchor=1.0):
    """The tilt-correction loss above, averaged over states.

    eps_fn / base_eps_fn(x (S*K, T, D), t (S*K,)) -> eps; x0 (S, K, T, D) normalised candidates;
    weights (S, K), each row summing to 1; noise (S, T, D) and t (S,) shared by a state's
    candidates. Returns (loss, per-state denoising error of the weighted fit (S,) detached)."""
    S, K = weights.shape
    noise_k = noise.unsqueeze(1).expand_as(x0).flatten(0, 1)
    t_k = t.repeat_interleave(K)
    x_t = ddpm.add_noise(x0.flatten(0, 1), noise_k, abar[t_k])
    e = eps_fn(x_t, t_k)
    with torch.no_grad():
        e_base = base_eps_fn(x_t, t_k)
    err = ((e - noise_k) ** 2).flatten(1).mean(1).view(S, K)
    drift = ((e - e_base) ** 2).flatten(1).mean(1).view(S, K)
    per_state = ((weights - 1.0 / K) * err).sum(1) + anchor * drift.mean(1)
    return per_state.mean(), (weights * err).sum(1).detach()


def shuffle_rows(x, generator=None):
    """Each row of x (S, K) in its own random order."""
    perm = torch.argsort(torch.rand(x.shape, generator=generator), dim=1).to(x.device)
    return torch.gather(x, 1, perm)


def posterior_tilt_loss(eps_fn, base_eps_fn, x0, weights, noise, t, abar, generator=None, mix=0.0, anchor=1.0,
                        shuffles=4):
    """The same tilt, fitted to its conditional expectation instead of a noisy sample (`--target posterior`).

    Treat a state's K candidates as the base's distribution there. For a noised chunk x_t the
    posterior over which candidate it came from is p_u(i | x_t) ~ N(x_t; sqrt(abar) x0_i, 1 - abar)
    under the base, and p_w(i | x_t) ~ w_i N(...) under the tilt, so the tilted noise predictor is

        E_tilt[eps | x_t] = E_base[eps | x_t] - sqrt(abar / (1 - abar)) * sum_i (p_w - p_u)(i | x_t) x0_i

    and the loss regresses e(x_t) on e_base(x_t) plus that correction: the target is a function of
    x_t with no eps noise in it (the K candidates are integrated out, Rao-Blackwell), and one
    network call per state replaces K. x_t comes from a candidate drawn from mix * w + (1 - mix) / K.
    anchor > 1 fits only a fraction 1 / anchor of the correction.

    The correction is not linear in w: with shuffled (control) weights p_w - p_u does not
    average to zero where a few candidates share the posterior; it flattens the posterior towards
    the candidates' mean, a drift of its own. With shuffles = P > 0 the baseline is not p_u but
    the mean of p_w over P random shufflings of each state's weights, and x_t should come from
    uniformly chosen candidates (mix = 0): a control run's correction then has mean exactly
    zero, while informative weights keep the tilt (tests/test_weighted.py). shuffles = 0 with
    mix = 0.5 is the first version (commit 93d7587).
    Returns (loss, mean squared correction (S,) detached)."""
    S, K = weights.shape
    probs = mix * weights + (1.0 - mix) / K
    pick = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x0.device)
    a = abar[t].view(S, 1, 1)
    x_t = a.sqrt() * x0[torch.arange(S, device=x0.device), pick] + (1 - a).sqrt() * noise
    d2 = ((x_t.unsqueeze(1) - a.unsqueeze(1).sqrt() * x0) ** 2).flatten(2).sum(2)  # (S, K)
    log_phi = -d2 / (2 * (1 - a.view(S, 1)))
    def p_given(w):
        return torch.softmax(log_phi + w.clamp_min(1e-30).log(), dim=1)

    if shuffles:  # the same correction with the weights shuffled, averaged: its mean under a control run
        baseline = torch.stack([p_given(shuffle_rows(weights, generator)) for _ in range(shuffles)]).mean(0)
    else:
        baseline = torch.softmax(log_phi, dim=1)
    shift = torch.einsum("sk,sktd->std", p_given(weights) - baseline, x0)
    correction = -(a / (1 - a)).sqrt() * shift / anchor
    with torch.no_grad():
        target = base_eps_fn(x_t, t) + correction
    loss = ((eps_fn(x_t, t) - target) ** 2).mean()
    return loss, (correction ** 2).flatten(1).mean(1).detach()


class ReplayBuffer:
    """The scored candidates of the last `iters` iterations (`--replay_iters`), each state with
    the weights it was given when it was collected (a control's random order is drawn once, so
    a state replayed later keeps it). Sampling draws states uniformly from all that it holds.

    Every entry estimates the same thing, the tilt of the proposer's chunks at that state, so
    older entries are more data for the same target: each optimiser step sees more distinct
    states, and a state's chance (which K candidates were drawn) is met fewer times in a row."""

    KEYS = ("cond", "x0", "w")

    def __init__(self, iters):
        self.iters, self.parts = iters, []

    def add(self, part):
        self.parts = (self.parts + [{k: part[k] for k in self.KEYS}])[-self.iters:]
        self._cat = {k: torch.cat([p[k] for p in self.parts]) for k in self.KEYS}

    def __len__(self):
        return len(self._cat["w"]) if self.parts else 0

    def sample(self, n, generator):
        idx = torch.randperm(len(self), generator=generator)[:n].to(self._cat["w"].device)
        return {k: v[idx] for k, v in self._cat.items()}

    def state_dict(self):
        return {"parts": [{k: v.cpu() for k, v in p.items()} for p in self.parts]}

    def load_state_dict(self, state, device):
        self.parts = []
        for part in state.get("parts", []):
            self.add({k: v.to(device) for k, v in part.items()})


class SelectingPolicy:
    """The behaviour of `--behaviour best`: at every call draw K chunks from `policy`, score them
    with `source` (the reward model: it needs no copy of the env), and act with the best, so the
    fine-tuning rollouts visit the states of the best-of-K policy, the tilted policy's own states,
    at no extra sampling (the same candidates are the update's batch). A control acts with a
    random candidate: the policy itself. Keeps every call's candidates and rewards."""

    def __init__(self, policy, source, k, control=False, generator=None):
        self.policy, self.source, self.k, self.control, self.generator = policy, source, k, control, generator
        self.config = policy.config
        self.x0, self.r = [], []

    @torch.no_grad()
    def predict_action(self, obs_history, generator=None, return_trajectory=False):
        obs = torch.as_tensor(obs_history, dtype=torch.float32)
        b, k = obs.shape[0], self.k
        obs_k = obs.repeat_interleave(k, dim=0)
        out = self.policy.predict_action(obs_k, generator=generator)
        r = self.source.reward(obs_k, out["action_pred_norm"]).view(b, k)
        if self.control:
            pick = torch.randint(0, k, (b,), generator=self.generator).to(r.device)
        else:
            pick = r.argmax(dim=1)
        self.x0.append(out["action_pred_norm"].view(b, k, *out["action_pred_norm"].shape[1:]).cpu())
        self.r.append(r.float().cpu())
        rows = pick.to(out["action"].device) + torch.arange(b, device=out["action"].device) * k
        return {key: out[key][rows] for key in ("action", "action_pred", "action_pred_norm")}

    def candidates(self, ep, call):
        """The candidates (S, K, T, D) and their rewards (S, K) of the calls (ep[i], call[i])."""
        ep, call = torch.as_tensor(ep), torch.as_tensor(call)
        return torch.stack(self.x0, dim=1)[ep, call], torch.stack(self.r, dim=1)[ep, call]


class RewardWeighted:
    """The method's two halves, called by reward_finetuning.finetune: collect() then update()."""

    def __init__(self, ctx):
        self.ctx, self.args = ctx, ctx.args
        self.buffer = ReplayBuffer(getattr(ctx.args, "replay_iters", 1))

    def state_dict(self):  # the replay buffer is what carries over between iterations
        return {"buffer": self.buffer.state_dict()} if self.buffer.iters > 1 else {}

    def load_state_dict(self, state):
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"], self.ctx.device)

    def collect(self, seeds):
        """Roll the current policy out; at (up to --states_per_iter of) its calls made before
        success, draw --num_candidates chunks from the pre-trained policy (--candidates base, so
        every iteration estimates the same tilt of p_base) or from the current one, and score
        them. With --behaviour best the rollout itself draws and scores the candidates at every
        call and acts with the best (SelectingPolicy); its calls' candidates are the batch.
        None if no call qualifies."""
        ctx, args = self.ctx, self.args
        ft, source = ctx.ft, ctx.source
        ft.eval()
        K = args.num_candidates
        proposer = ctx.base if args.candidates == "base" else ft
        actor = ft
        if getattr(args, "behaviour", "policy") == "best":
            actor = SelectingPolicy(proposer, source, K, ctx.control, ctx.generator)
        res = rollout_module.rollout(actor, seeds, max_steps=args.max_steps, generator=ctx.generator,
                                     record_calls=True, record_envs=source.needs_env)
        calls = res["calls"]
        ep, call = np.nonzero(calls["active"])
        if len(ep) > args.states_per_iter:
            keep = torch.randperm(len(ep), generator=ctx.generator)[:args.states_per_iter].sort().values.numpy()
            ep, call = ep[keep], call[keep]
        out = {"env_score": float(res["score"].mean()), "env_success": float(res["success"].mean())}
        if len(ep) == 0:
            return None, out
        obs = torch.as_tensor(calls["obs"][ep, call], dtype=torch.float32)
        if actor is not ft:  # the candidates the rollout drew and scored
            x0, r = actor.candidates(ep, call)
            return {"cond": ft.obs_cond(obs), "x0": x0.to(ctx.device), "r": r.to(ctx.device)}, out
        obs_k = obs.repeat_interleave(K, dim=0)
        with torch.no_grad():
            x0 = proposer.predict_action(obs_k, generator=ctx.generator)["action_pred_norm"]
        envs = np.repeat(calls["env"][ep, call], K) if source.needs_env else None
        r = source.reward(obs_k, x0, envs, np.repeat(calls["n_exec"][call], K))
        batch = {"cond": ft.obs_cond(obs), "x0": x0.view(len(ep), K, *x0.shape[1:]),
                 "r": r.view(len(ep), K).to(ctx.device)}
        return batch, out

    def update(self, batch, it):
        ctx, args = self.ctx, self.args
        r = batch["r"]
        weights = candidate_weights(r, args.reward_scale, args.weighting, ctx.control, ctx.generator).to(ctx.device)
        S, K = weights.shape
        self.buffer.add({"cond": batch["cond"], "x0": batch["x0"], "w": weights})
        ft, base = ctx.ft, ctx.base
        ref = {"base": base.model, "current": ft.model,  # the reference; no gradient through it
               "ema": ctx.ema.model if ctx.ema is not None else None}[getattr(args, "anchor", "base")]
        ft.train()
        losses, errs = [], []
        for _ in range(args.grad_steps_per_iter):
            drawn = self.buffer.sample(args.batch_states, ctx.generator)
            x0, w, cond = drawn["x0"], drawn["w"], drawn["cond"]
            noise, t = (v.to(ctx.device) for v in ft.draw_noise((len(w), *x0.shape[2:]), ctx.generator, ctx.device))
            if args.target == "posterior":
                loss, err = posterior_tilt_loss(
                    lambda x, tt: ctx.ddp_model(x, tt, cond), lambda x, tt: ref(x, tt, cond),
                    x0, w, noise, t, ft.alphas_cumprod, generator=ctx.generator, anchor=args.anchor_weight,
                    mix=0.0 if args.shuffles else 0.5, shuffles=args.shuffles)
            else:
                cond_k = cond.repeat_interleave(K, dim=0)
                loss, err = weighted_denoising_loss(
                    lambda x, tt: ctx.ddp_model(x, tt, cond_k), lambda x, tt: ref(x, tt, cond_k),
                    x0, w, noise, t, ft.alphas_cumprod, anchor=args.anchor_weight)
            ctx.step(loss, it)
            losses.append(loss.item())
            errs.append(float(err.mean()))
        ess = (1.0 / (weights ** 2).sum(1)).mean() / K
        aux = "weighted_denoise_err" if args.target == "sample" else "correction_sq"
        return {"loss": float(np.mean(losses)), aux: float(np.mean(errs)),
                "candidate_reward": float(r.mean()), "selected_reward_gain": float(((weights * r).sum(1) - r.mean(1)).mean()),
                "weight_ess_fraction": float(ess), "num_states": int(S), "replay_states": len(self.buffer)}
