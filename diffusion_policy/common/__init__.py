"""What every stage uses and no algorithm needs to be read for: the plumbing.

- atomic.py: writes that land whole or not at all, and storage faults in one line.
- cli.py: argparse helpers, input checks before work, `run_cli` (one-line errors, exit codes).
- distributed.py: torchrun set-up, DDP wrapping, collectives.
- outputs.py: output records, run-directory claims, freshness of cached files.
- runlog.py: config.json, metrics.jsonl, wandb, git commit and machine fields.
- runtime.py: `UserError`, seeding, the optimiser step, resumed learning rates.
- seeds.py: the seed ranges of each purpose (evaluation, collection, fine-tuning, ...).
- stats.py: intervals.

Nothing here imports the algorithm's modules (diffusion_policy/*.py above it).
"""
