"""Fine-tuning methods that reward_finetuning.py's loop runs, each with its typed config.

- config.py: `LoopConfig` / `MethodConfig`, what every method's config holds and checks, and
  `FinetuneMethod`, the interface the loop runs a method through (start checks, the policy it
  trains, EMA, DDP wrapping, clipping, saving, resume state); `DenoiserMethod` its defaults for
  the methods that train the noise model itself.
- adjoint.py: Adjoint Matching (`--method adjoint`, `AdjointConfig`): follows grad r through the lean adjoint.
- qam.py: Adjoint Matching toward a critic (`--method qam`, `QAMConfig`): the terminal adjoint from the
  action gradient of a chunk critic learnt by n-step TD (critic.py) beside the fine-tuned denoiser.
- critic.py: the chunk critic's learning (shaped rewards, n-step targets, the replay buffer, the TD
  loss), which the residual methods and qam share.
- weighted.py: reward-weighted denoising (`--method weighted`, `WeightedConfig`): fits the tilt from
  the values of r on the policy's own samples, no gradient of r.
- residual.py: a bounded residual on the frozen policy (`--method residual`, `ResidualConfig`),
  trained off-policy against an ensemble of chunk critics.
- residual_step.py: the same residual per control step, from that step's window (`--method residual_step`,
  `ResidualStepConfig`, ResFiT's closed loop), against a per-step critic.
- tilt.py: the tilt meter: how far a policy moved its one-chunk expected reward, against what
  the exact tilt p_base exp(lambda r) predicts from the base's own samples.

Where a chunk's reward comes from (the reward model or the simulator) is diffusion_policy/sources.py,
which run-time selection shares. Each method is a class with collect(seeds, max_steps) -> (batch,
env metrics), prepare(batch), loss(batch, i) -> (loss, metrics) for optimiser step i, and summary(batch),
registered in METHODS below by its `name`.
"""

from diffusion_policy.finetune.adjoint import AdjointMatching
from diffusion_policy.finetune.qam import QAM
from diffusion_policy.finetune.residual import ResidualRL
from diffusion_policy.finetune.residual_step import ResidualStepRL
from diffusion_policy.finetune.weighted import RewardWeighted

# the methods reward_finetuning.py runs, by their --method name (the loop names none of them)
METHODS = {m.name: m for m in (AdjointMatching, QAM, RewardWeighted, ResidualRL, ResidualStepRL)}
