"""Start-state seed ranges, disjoint by purpose, so no number is measured on what it tuned.

Every range is SEED_RANGE wide; a script takes `--start_seed` within its range and uses
consecutive seeds from there. Seed s draws the benchmark's start state for s
(`diffusion_policy.env.sample_start_state`).
"""

from diffusion_policy.common.runtime import UserError

SEED_RANGE = 100_000
MAX_SEED = 2**32  # the environment draws a start state with numpy's RandomState(seed)

EVAL_SEED_START = 100_000  # held-out evaluation: evaluate_policy.py and the pipeline report
REWARD_SEED_START = 200_000  # rollouts that collect reward-model data: collect_rewards.py
FINETUNE_SEED_START = 300_000  # rollouts inside fine-tuning iterations: reward_finetuning.py
VALIDATION_SEED_START = 400_000  # periodic in-training evaluation (pre-training, fine-tuning)
TILT_SEED_START = 500_000  # states of the tilt meter (reward_finetuning.py, benchmarks/tilt_meter.py)


# the ranges each stage may draw its start states from (README, "Seeds")
ALLOWED = {
    "evaluation": (EVAL_SEED_START, VALIDATION_SEED_START),  # held-out, or validation for pilots
    "reward collection": (REWARD_SEED_START,),
    "fine-tuning": (FINETUNE_SEED_START,),
}


def check_seeds(start_seed, count, purpose=None, any_range=False, flag="--start_seed"):
    """Refuse a run whose seeds start_seed .. start_seed + count - 1 reach past MAX_SEED, or (unless
    any_range) leave the ranges of its `purpose`: seeds of one purpose never serve another, so no
    number is measured on the starts that trained or tuned it."""
    last = start_seed + count - 1
    if last >= MAX_SEED:
        raise UserError(f"{flag} {start_seed}: the run's seeds (up to {last}) must be below 2**32 "
                        f"= {MAX_SEED} (the environment's RandomState); give a smaller {flag}")
    if purpose is None or any_range:
        return
    ranges = [(lo, lo + SEED_RANGE - 1) for lo in ALLOWED[purpose]]
    if not any(lo <= start_seed and last <= hi for lo, hi in ranges):
        allowed = " or ".join(f"{lo}-{hi}" for lo, hi in ranges)
        raise UserError(f"{flag} {start_seed}: {purpose} draws its starts from {allowed} (README, Seeds), but this run's "
                        f"seeds {start_seed}-{last} leave them (another purpose's starts); give a {flag} in range, or "
                        "--any_seed_range if you mean it")


def add_seed_range_flag(parser):
    parser.add_argument("--any_seed_range", action="store_true",
                        help="allow --start_seed outside this stage's seed range (README, Seeds): the run then "
                             "draws starts another purpose uses")
