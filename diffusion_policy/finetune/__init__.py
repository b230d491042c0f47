"""Fine-tuning pieces that reward_finetuning.py's loop calls.

- sources.py: where a chunk's reward (and its gradient) comes from: the reward MLP
  (`--reward_source model`) or the simulator itself (`--reward_source simulator`).
- adjoint.py: Adjoint Matching (`--method adjoint`): follows grad r through the lean adjoint.
- weighted.py: reward-weighted denoising (`--method weighted`): fits the tilt from the values
  of r on the policy's own samples, no gradient of r.
- tilt.py: the tilt meter: how far a policy moved its one-chunk expected reward, against what
  the exact tilt p_base exp(lambda r) predicts from the base's own samples.
"""
