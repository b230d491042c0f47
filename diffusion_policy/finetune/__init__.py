"""Fine-tuning pieces that reward_finetuning.py's loop calls.

- config.py: `MethodConfig`, what every method's typed config holds and checks.
- sources.py: where a chunk's reward (and its gradient) comes from: the learned reward model
  (`--reward_source model`) or the simulator itself (`--reward_source simulator`).
- adjoint.py: Adjoint Matching (`--method adjoint`, `AdjointConfig`): follows grad r through the lean adjoint.
- weighted.py: reward-weighted denoising (`--method weighted`, `WeightedConfig`): fits the tilt from
  the values of r on the policy's own samples, no gradient of r.
- tilt.py: the tilt meter: how far a policy moved its one-chunk expected reward, against what
  the exact tilt p_base exp(lambda r) predicts from the base's own samples.

Each method is a class with collect(seeds, max_steps) -> (batch, env metrics), prepare(batch),
loss(batch, i) -> (loss, metrics) for optimiser step i, and summary(batch).
"""
