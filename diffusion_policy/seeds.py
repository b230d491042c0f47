"""Start-state seed ranges, disjoint by purpose, so no number is measured on what it tuned.

Every range is SEED_RANGE wide; a script takes `--start_seed` within its range and uses
consecutive seeds from there. Seed s draws the benchmark's start state for s
(`diffusion_policy.env.sample_start_state`).
"""

from diffusion_policy.runtime import UserError

SEED_RANGE = 100_000
MAX_SEED = 2**32  # the environment draws a start state with numpy's RandomState(seed)

EVAL_SEED_START = 100_000  # held-out evaluation: evaluate_policy.py and the pipeline report
REWARD_SEED_START = 200_000  # rollouts that collect reward-model data: collect_rewards.py
FINETUNE_SEED_START = 300_000  # rollouts inside fine-tuning iterations: reward_finetuning.py
VALIDATION_SEED_START = 400_000  # periodic in-training evaluation (pre-training, fine-tuning)
TILT_SEED_START = 500_000  # states of the tilt meter (reward_finetuning.py, benchmarks/tilt_meter.py)


def check_seeds(start_seed, count, flag="--start_seed"):
    """Refuse a run whose seeds start_seed .. start_seed + count - 1 reach past MAX_SEED."""
    if start_seed + count > MAX_SEED:
        raise UserError(f"{flag} {start_seed}: the run's seeds (up to {start_seed + count - 1}) must be below 2**32 "
                        f"= {MAX_SEED} (the environment's RandomState); give a smaller {flag}")
