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


def soup_checkpoint(ft_ckpts, base_ckpt, scale=1.0):
    """The uniform soup of fine-tuned policies of the same base, moved along its mean update:
    base + scale * mean_i (ft_i - base) of the acting weights. Each run's update is the tilt
    they share plus noise of its own; the mean keeps the first and shrinks the second."""
    base = base_ckpt["ema_model_state_dict"]
    deltas = [extrapolate_weights(base, c["ema_model_state_dict"], 1.0) for c in ft_ckpts]
    mean = {k: sum(d[k] for d in deltas) / len(deltas) if base[k].is_floating_point() else deltas[0][k]
            for k in base}
    out = dict(ft_ckpts[0])
    out["ema_model_state_dict"] = extrapolate_weights(base, mean, scale)
    out["provenance"] = {**ft_ckpts[0].get("provenance", {}), "extrapolate": scale, "soup_of": len(ft_ckpts)}
    return out
