"""Is a reward model's gradient worth fine-tuning towards? Reward-guided sampling as a probe.

Usage:
    python -m benchmarks.guidance_probe --reward_model_path ./data/checkpoints/reward_model_rd0.ckpt
    python -m benchmarks.guidance_probe --reward_model_path R1.ckpt R2.ckpt --lambdas 0 30 100 \
        --num_eps 100 --json benchmarks/results/guidance_probe.json

Adjoint Matching fine-tunes the policy towards p_base(chunk | obs) exp(lambda r(obs, chunk)).
Before spending an hour of CPU on that, this script samples an approximation of the same
target without training anything: every stochastic step of the pre-trained sampler gets the
mean shift sig_k^2 * lambda * grad r(x0_hat), with x0_hat the step's own clean-chunk
estimate (first-order guidance; the exact shift is what Adjoint Matching learns). With
--guidance chain the gradient is taken with respect to the noisy x_t through the base model
(d x0_hat / d x_t included, as in the lean adjoint), which is far smaller at noisy steps. The
guided policy is rolled out on validation seeds (400000+, never the evaluation seeds), so the
table says which reward target, and roughly which lambda, move the true success rate.
"""

import argparse
import os
import platform
import time

import numpy as np
import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy import ddpm
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.cli import count, nonnegative
from diffusion_policy.env import PushTVectorEnv
from diffusion_policy.reward_model import load_reward_model
from diffusion_policy.rollout import rollout, try_branches
from diffusion_policy.runtime import resolve_device
from diffusion_policy.seeds import VALIDATION_SEED_START
from diffusion_policy.stats import mean_ci, wilson_ci


class GuidedPolicy:
    """A pre-trained policy whose sampler is tilted by lambda * grad r at every noisy step."""

    def __init__(self, policy, reward_model, lam, best_of=1, guidance="x0"):
        self.policy, self.reward_model, self.lam, self.best_of = policy, reward_model, lam, best_of
        if guidance not in ("x0", "chain"):
            raise ValueError(f"guidance must be 'x0' or 'chain', got {guidance!r}")
        self.guidance = guidance
        self.config = policy.config

    @torch.no_grad()
    def predict_action(self, obs_history, generator=None, return_trajectory=False):
        if self.best_of > 1:
            return self.pick_best(obs_history, generator)
        p = self.policy
        obs_history = torch.as_tensor(obs_history, dtype=torch.float32, device=p.device)
        cond = p.obs_cond(obs_history)
        K = p.sampler_config.num_inference_steps
        timesteps, prev = ddpm.inference_timesteps(p.sampler_config.num_train_timesteps, K)
        abar = p.alphas_cumprod
        shape = (cond.shape[0], p.config.pred_horizon, p.config.action_dim)
        x = torch.randn(shape, generator=generator).to(p.device)
        for t, t_prev in zip(timesteps.tolist(), prev.tolist()):
            abar_t, abar_prev = ddpm.abar_at(abar, t), ddpm.abar_at(abar, t_prev)
            tt = torch.full((shape[0],), t, device=p.device)
            if self.lam and t > 0 and self.guidance == "chain":
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():  # d r(x0_hat(x_t)) / d x_t through the base model
                    eps = p.model(x, tt, cond)
                    x0 = ddpm.predict_x0(eps, x, abar_t, clip_sample=True)
                    r = self.reward_model.reward(obs_history, p.action_normalizer.unnormalize(x0))
                    (grad,) = torch.autograd.grad(r.sum(), x)
                eps, x = eps.detach(), x.detach()
            else:
                eps = p.model(x, tt, cond)
            mean = ddpm.step_mean(eps, x, abar_t, abar_prev, p.sampler_config.clip_sample)
            if t > 0:
                sig = ddpm.step_std(abar_t, abar_prev)
                if self.lam:
                    if self.guidance == "x0":
                        x0 = ddpm.predict_x0(eps, x, abar_t, clip_sample=True).requires_grad_(True)
                        with torch.enable_grad():
                            r = self.reward_model.reward(obs_history, p.action_normalizer.unnormalize(x0))
                            (grad,) = torch.autograd.grad(r.sum(), x0)
                    mean = mean + sig ** 2 * self.lam * grad
                mean = mean + sig * torch.randn(shape, generator=generator).to(p.device)
            x = mean
        action_pred = p.action_normalizer.unnormalize(x)
        return {"action": p.executed(action_pred), "action_pred": action_pred, "action_pred_norm": x}


    @torch.no_grad()
    def pick_best(self, obs_history, generator):
        """lambda -> infinity on the base model's own samples: the best of N chunks by r."""
        p, n = self.policy, self.best_of
        obs_history = torch.as_tensor(obs_history, dtype=torch.float32, device=p.device)
        B = obs_history.shape[0]
        many = obs_history.repeat_interleave(n, dim=0)
        chunk = p.sample(p.obs_cond(many), generator=generator)
        action_pred = p.action_normalizer.unnormalize(chunk)
        r = self.reward_model.reward(many, action_pred).view(B, n)
        best = r.argmax(dim=1) + torch.arange(B, device=p.device) * n
        action_pred, chunk = action_pred[best], chunk[best]
        return {"action": p.executed(action_pred), "action_pred": action_pred, "action_pred_norm": chunk}


@torch.no_grad()
def oracle_rollout(policy, seeds, best_of, generator, max_steps=300):
    """Best of N chunks by the *true* reward after the executed chunk (each tried on a copy of
    the env): what a perfect `reward_after` model would do at lambda -> infinity."""
    n, cfg = len(seeds), policy.config
    venv = PushTVectorEnv(n, max_episode_steps=max_steps)
    obs, info = venv.reset(seeds=seeds)
    history = np.repeat(obs[:, None], cfg.obs_horizon, axis=1)
    score, max_cov, success = np.zeros(n), info["coverage"].copy(), np.zeros(n, bool)
    t = 0
    while t < max_steps and not success.all():
        n_exec = min(cfg.action_horizon, max_steps - t)
        tried = try_branches(policy, venv, history, best_of, n_exec, ~success, generator)
        actions, choice = tried["branch_action_exec"], tried["branch_reward_after"].argmax(axis=1)
        for j in range(n_exec):
            obs, r, _, _, info = venv.step(actions[np.arange(n), choice, j])
            score, max_cov = np.maximum(score, r), np.maximum(max_cov, info["coverage"])
            success |= info["is_success"]
            history = np.concatenate([history[:, 1:], obs[:, None]], axis=1)
            t += 1
    return {"score": score, "success": success, "max_coverage": max_cov}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="pre-trained policy")
    p.add_argument("--reward_model_path", nargs="*", default=["./data/checkpoints/reward_model_rd0.ckpt"],
                   help="one or more reward models (train_reward.py --target ...)")
    p.add_argument("--lambdas", type=nonnegative, nargs="*", default=[0.0, 30.0, 100.0], help="guidance strengths")
    p.add_argument("--guidance", choices=["x0", "chain"], default="x0",
                   help="x0: grad r at the step's clean-chunk estimate, applied as is; chain: grad of "
                        "r(x0_hat(x_t)) with respect to x_t, through the base model (its Jacobian shrinks the "
                        "shift at noisy steps where the policy's chunks are concentrated)")
    p.add_argument("--best_of", type=count(1), nargs="+", default=[],
                   help="also try best-of-N selection by the reward (the lambda -> infinity limit) for each N")
    p.add_argument("--oracle_best_of", type=count(1), nargs="*", default=[],
                   help="also the best of N chunks by the true reward after each chunk (no reward model)")
    p.add_argument("--num_eps", type=count(1), default=100, help="episodes per setting, validation seeds 400000+")
    p.add_argument("--seed", type=count(0), default=0, help="sampling noise seed (the same for every setting)")
    add_output_flags(p)
    return p.parse_args(argv)


def main(args):
    device = resolve_device(args.device)
    policy = load_policy(args.model_path, device=device)
    seeds = list(range(VALIDATION_SEED_START, VALIDATION_SEED_START + args.num_eps))
    rows, baseline_done = [], False
    for path in args.reward_model_path:
        reward_model = load_reward_model(path, device=device).requires_grad_(False)
        settings = [(lam, 1) for lam in args.lambdas] + [(float("inf"), n) for n in args.best_of]
        for lam, best_of in settings:
            if lam == 0 and baseline_done:
                continue
            start = time.perf_counter()
            res = rollout(GuidedPolicy(policy, reward_model, lam, best_of, args.guidance), seeds,
                          generator=torch.Generator().manual_seed(args.seed))
            score, success = mean_ci(res["score"]), wilson_ci(int(res["success"].sum()), len(seeds))
            row = {"reward_model": path if lam else None, "target": reward_model.config.target if lam else None,
                   "lambda": lam if best_of == 1 else None, "best_of": best_of,
                   "guidance": args.guidance if best_of == 1 and lam else None, "score": score[0], "score_ci": list(score[1:]),
                   "success": float(np.mean(res["success"])), "success_ci": list(success[1:]),
                   "max_coverage": float(np.mean(res["max_coverage"])),
                   "wall_s": round(time.perf_counter() - start, 1)}
            rows.append(row)
            baseline_done |= lam == 0
            label = f"lambda {lam:6g}" if best_of == 1 else f"best of {best_of:3d}"
            print(f"{str(row['target']):>14} {label}: score {row['score']:.3f}, success "
                  f"{row['success']:.2f} [{success[1]:.2f}, {success[2]:.2f}], max coverage "
                  f"{row['max_coverage']:.3f} ({row['wall_s']} s)", flush=True)
    for best_of in args.oracle_best_of:
        start = time.perf_counter()
        res = oracle_rollout(policy, seeds, best_of, torch.Generator().manual_seed(args.seed))
        score, success = mean_ci(res["score"]), wilson_ci(int(res["success"].sum()), len(seeds))
        rows.append({"reward_model": "oracle: true reward_after", "target": "reward_after (true)", "lambda": None,
                     "best_of": best_of, "score": score[0], "score_ci": list(score[1:]),
                     "success": float(np.mean(res["success"])), "success_ci": list(success[1:]),
                     "max_coverage": float(np.mean(res["max_coverage"])),
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(f"oracle best of {best_of:3d}: score {score[0]:.3f}, success {success[0]:.2f} [{success[1]:.2f}, "
              f"{success[2]:.2f}], max coverage {rows[-1]['max_coverage']:.3f} ({rows[-1]['wall_s']} s)", flush=True)
    result = {"model_path": args.model_path, "num_eps": args.num_eps, "seeds": [seeds[0], seeds[-1]],
              "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    save_result(args.json, result)
    return result


if __name__ == "__main__":
    main(parse_args())
