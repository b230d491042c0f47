"""Extrapolate a fine-tuned policy along its own update (`--extrapolate s`):

    theta = theta_base + s * (theta_ft - theta_base)

The weighted method realises only part of its tilt: the fit stops early and the EMA lags
(docs/finetuning.md). Its update is small, so the noise predictor is close to linear in it
along that line, and s > 1 scales the realised tilt by s (the tilt meter reads 1x, 2x, 3x
for s = 1, 2, 3). What the update carries besides the tilt (its noise) is scaled by s as
well, so whether a larger s helps is a question for the protocol and its control, not for
the meter. Weight-space extrapolation of a fine-tuning delta is the ExPO idea (Zheng et al.,
2024, "Weak-to-strong extrapolation expedites alignment"), here from the pre-trained policy.
"""

import copy

import torch


def extrapolate_weights(base, ft, scale):
    """{name: base + scale * (ft - base)} for floating-point tensors; other entries from ft."""
    if set(base) != set(ft):
        raise ValueError("the two state dicts hold different tensors: not the same architecture")
    return {k: base[k] + scale * (ft[k] - base[k]) if ft[k].is_floating_point() else ft[k].clone() for k in ft}


def extrapolated_model(base_model, ft_model, scale):
    """A copy of ft_model (a noise model) with extrapolated weights."""
    out = copy.deepcopy(ft_model)
    with torch.no_grad():
        out.load_state_dict(extrapolate_weights(base_model.state_dict(), ft_model.state_dict(), scale))
    return out


def extrapolated_checkpoint(ft_ckpt, base_ckpt, scale):
    """A policy checkpoint acting (its EMA slot) with base + scale * (ft - base) of the two acting
    weights; the fine-tuned live weights stay in model_state_dict. Provenance records scale."""
    out = dict(ft_ckpt)
    out["ema_model_state_dict"] = extrapolate_weights(base_ckpt["ema_model_state_dict"],
                                                      ft_ckpt["ema_model_state_dict"], scale)
    out["provenance"] = {**ft_ckpt.get("provenance", {}), "extrapolate": scale}
    return out
