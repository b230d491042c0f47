"""What the pieces of a `--method qam` iteration cost on the published policy, at one thread (#48 item 2).

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.qam_cost --model_path ../shared/artifacts/pusht_cpu/policy_pretrained.ckpt \
        --json benchmarks/results/qam_cost.json

Per batch of chains (the preset's Adjoint Matching batch, 128, and 256): a fresh chain of the sampler (what a
rollout's call already pays), the lean adjoint through the frozen base at every step (prepare's one solve),
one Adjoint Matching step (the loss at `--num_loss_steps` steps with its backward through the UNet and AdamW),
the same step training only a correction of `--correction_dims` added to the frozen UNet (`--correction_dims`
of qam: the backward through the correction alone), and one critic step of the preset's ensemble (batch 256). Beside them, the reference the cost is read
against: the same Adjoint Matching step's forward alone (no backward), and a critic step of the residual's
ensemble of 2. The best of `--rounds` rounds, in seconds; the iteration's added cost from the preset's
counts (10 Adjoint Matching steps of 128 chains, a lean adjoint over 1,280 chains, 1,000 critic steps).
"""

import argparse
import copy
import math
import time

import torch

from benchmarks import add_output_flags, save_result
from diffusion_policy import ddpm
from diffusion_policy.adjoint_matching import adjoint_matching_loss, lean_adjoint, sample_loss_steps
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.common.cli import count, run_cli
from diffusion_policy.finetune.critic import TDCritic
from diffusion_policy.finetune.qam import QAM, QAMConfig
from diffusion_policy.residual_policy import critic_dims


def best_of(fn, rounds):
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./data/checkpoints/policy_pretrained.ckpt", help="the policy (default: %(default)s)")
    p.add_argument("--batches", type=count(1), nargs="+", default=[128, 256], help="chains per batch (default 128 256)")
    p.add_argument("--num_loss_steps", type=count(1), default=QAMConfig.num_loss_steps, help="sampler steps in the loss")
    p.add_argument("--correction_dims", type=count(1), nargs="+", default=[256, 256],
                   help="hidden sizes of the correction timed beside the whole UNet (default 256 256)")
    p.add_argument("--rounds", type=count(1), default=3, help="rounds; the best is kept (default 3)")
    add_output_flags(p, device=False)
    return p.parse_args(argv)


def main(args):
    torch.manual_seed(0)
    base = load_policy(args.model_path).requires_grad_(False)
    ft = copy.deepcopy(base)
    ft.model.requires_grad_(True)
    opt = torch.optim.AdamW(ft.model.parameters(), lr=1e-5)
    corrected = QAM.make_policy(base, QAMConfig(correction_dims=tuple(args.correction_dims)))
    c_opt = torch.optim.AdamW(corrected.model.correction.parameters(), lr=1e-5)
    K = base.sampler_config.num_inference_steps
    timesteps, prev = ddpm.inference_timesteps(base.sampler_config.num_train_timesteps, K)
    cfg = base.config
    rows = {}
    for b in args.batches:
        cond = torch.randn(b, cfg.obs_horizon * cfg.obs_dim)
        traj = None

        def chain():
            nonlocal traj
            with torch.no_grad():
                traj = base.sample(cond, generator=torch.Generator().manual_seed(0), return_trajectory=True)[1]

        t_chain = best_of(chain, args.rounds)
        terminal = 0.1 * torch.randn_like(traj[-1])

        def solve():
            return lean_adjoint(lambda x, t: base.model(x, t, cond), traj, timesteps, prev, base.alphas_cumprod,
                                terminal, base.sampler_config.clip_sample)

        t_adjoint = best_of(solve, args.rounds)
        adj = solve()
        steps = sample_loss_steps(K, args.num_loss_steps, generator=torch.Generator().manual_seed(0)).tolist()

        def stacked(model):
            return lambda x, t: model(x, t, cond.repeat(x.shape[0] // b, 1))

        def loss(backward=True, model=ft.model, optimizer=opt):
            out, _ = adjoint_matching_loss(stacked(model), stacked(base.model), traj, adj, timesteps, prev,
                                           base.alphas_cumprod, steps, base.sampler_config.clip_sample, batched=True)
            if backward:
                optimizer.zero_grad()
                out.backward()
                optimizer.step()

        t_am = best_of(loss, args.rounds)
        t_corr = best_of(lambda: loss(model=corrected.model, optimizer=c_opt), args.rounds)
        with torch.no_grad():
            t_forward = best_of(lambda: loss(backward=False), args.rounds)
        rows[str(b)] = {"fresh_chain_s": t_chain, "lean_adjoint_s": t_adjoint, "am_step_s": t_am,
                        "am_forward_only_s": t_forward,
                        "am_step_correction_s": t_corr, "am_step_ratio_unet_to_correction": t_am / t_corr}
        print(f"batch {b}: fresh chain {t_chain:.2f} s, lean adjoint {t_adjoint:.2f} s, Adjoint Matching step "
              f"{t_am:.2f} s (its forward alone {t_forward:.2f} s; training a correction alone {t_corr:.2f} s, "
              f"{t_am / t_corr:.1f}x less)")

    def critic_step_s(num_critics):
        cond_dim, _ = critic_dims(cfg)
        td = TDCritic(cond_dim, (cfg.action_horizon, cfg.action_dim), QAMConfig.hidden_dims, num_critics, 256,
                      0.01, torch.device("cpu"), 0.5)
        b = {"cond": torch.randn(256, cond_dim), "act": torch.randn(256, cfg.action_horizon, cfg.action_dim),
             "ret": torch.randn(256), "disc": torch.full((256,), 0.7), "next_cond": torch.randn(256, cond_dim),
             "next_base": torch.randn(256, cfg.action_horizon, cfg.action_dim)}
        c_opt = torch.optim.AdamW(td.critic.parameters(), lr=3e-4)

        def step():
            for _ in range(20):
                out, _ = td.loss(b, td.td_target(b, b["next_base"]))
                c_opt.zero_grad()
                out.backward()
                c_opt.step()
                td.update_target()

        return best_of(step, args.rounds) / 20

    t_critic, t_critic2 = critic_step_s(QAMConfig.num_critics), critic_step_s(2)
    preset = QAMConfig()
    updates = math.ceil(preset.grad_steps_per_iter / preset.am_every)
    am_b = str(preset.am_batch) if str(preset.am_batch) in rows else next(iter(rows))
    scale = preset.am_batch / int(am_b)
    added = {"lean_adjoint_s": rows[am_b]["lean_adjoint_s"] * updates * scale,
             "am_steps_s": rows[am_b]["am_step_s"] * updates * scale,
             "critic_steps_s": t_critic * preset.grad_steps_per_iter}
    added["total_s"] = sum(added.values())
    print(f"critic step ({preset.num_critics} critics, batch 256) {1e3 * t_critic:.1f} ms ({1e3 * t_critic2:.1f} ms with 2); "
          f"an iteration of the preset adds about {added['total_s']:.0f} s to its rollouts "
          f"(lean adjoint {added['lean_adjoint_s']:.0f}, Adjoint Matching {added['am_steps_s']:.0f}, critic "
          f"{added['critic_steps_s']:.0f})")
    result = {"batches": rows, "critic_step_s": t_critic, "critic_step_2_critics_s": t_critic2,
              "preset_iteration_added_s": added, "threads": torch.get_num_threads()}
    save_result(args.json, result, {k: v for k, v in vars(args).items() if k != "json"})
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
