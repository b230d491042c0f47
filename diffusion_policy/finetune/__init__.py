"""Fine-tuning methods that reward_finetuning.py's loop runs, each with its typed config.

- config.py: `LoopConfig` / `MethodConfig`, what every method's config holds and checks, and
  `FinetuneMethod`, the loop's calls a method inherits (what it trains, clipping, resume state).
- adjoint.py: Adjoint Matching (`--method adjoint`, `AdjointConfig`): follows grad r through the lean adjoint.
- weighted.py: reward-weighted denoising (`--method weighted`, `WeightedConfig`): fits the tilt from
  the values of r on the policy's own samples, no gradient of r.
- residual.py: a bounded residual on the frozen policy (`--method residual`, `ResidualConfig`),
  trained off-policy against an ensemble of chunk critics.
- tilt.py: the tilt meter: how far a policy moved its one-chunk expected reward, against what
  the exact tilt p_base exp(lambda r) predicts from the base's own samples.

Where a chunk's reward comes from (the reward model or the simulator) is diffusion_policy/sources.py,
which run-time selection shares. Each method is a class with collect(seeds, max_steps) -> (batch,
env metrics), prepare(batch), loss(batch, i) -> (loss, metrics) for optimiser step i, and summary(batch).
"""
