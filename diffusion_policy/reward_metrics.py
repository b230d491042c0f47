"""How well a reward model ranks chunks: the metrics train_reward.py logs every epoch and the
reward pilots (benchmarks/reward_dynamics.py, benchmarks/reward_features.py) share.

- regression_metrics: MSE, R^2 and Spearman's rank correlation over all rows;
- branch_pick_gain: among the chunks tried from one state (collect_rewards.py --branches), how
  much of the best chunk's advantage the model's favourite gets (1 = the best, 0 = chance);
- within_state_metrics: the pick gain and the rank correlation among a state's chunks, by the
  state's coverage before the chunk;
- split_by_episode: the training / validation split (whole episodes on either side);
- scatter_plot: predicted against true, as a PNG.
"""

import numpy as np

from diffusion_policy.common.atomic import atomic_path
from diffusion_policy.reward_data import RewardDataError


def rank(x):
    """Ranks 0..n-1 with ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts - 1) / 2.0)[inverse]


def regression_metrics(pred, true):
    """MSE, R^2 and Spearman rank correlation of predictions against targets."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    mse = float(np.mean((pred - true) ** 2))
    var = float(np.var(true))
    r2 = 1.0 - mse / var if var > 0 else float("nan")
    return {"mse": mse, "r2": r2, "spearman": rank_correlation(pred, true)}


def rank_correlation(pred, true):
    """Spearman's rank correlation (ties given their average rank); NaN when either side is constant."""
    rp, rt = rank(pred), rank(true)
    denom = rp.std() * rt.std()
    return float(np.mean((rp - rp.mean()) * (rt - rt.mean())) / denom) if denom > 0 else float("nan")


def branch_pick_gain(pred, true, state_keys):
    """How much of the best chunk's advantage the model finds, among chunks tried from one state.

    For every state with two or more recorded chunks (collect_rewards.py --branches), the true
    reward of the model's favourite minus the chunks' mean, over the same for the truly best
    chunk, averaged over states: 1 = always picks the best, 0 = no better than chance. This is
    what fine-tuning needs from the model (a ranking of chunks *within* a state), which R^2 and
    Spearman over all rows mostly do not measure. None without branches.
    """
    order = np.argsort(state_keys, kind="stable")
    keys, pred, true = state_keys[order], np.asarray(pred)[order], np.asarray(true)[order]
    _, starts, counts = np.unique(keys, return_index=True, return_counts=True)
    picked, best = 0.0, 0.0
    for s, c in zip(starts, counts):
        if c < 2:
            continue
        t = true[s:s + c]
        picked += t[np.argmax(pred[s:s + c])] - t.mean()
        best += t.max() - t.mean()
    return float(picked / best) if best > 0 else None


COVERAGE_BANDS = (("cov_lt80", 0.0, 0.8), ("cov_80_90", 0.8, 0.9), ("cov_ge90", 0.9, float("inf")))


def within_state_metrics(pred, true, state_keys, coverage):
    """The within-state ranking by the state's coverage before the chunk (the bands of
    COVERAGE_BANDS; success is decided in the top one): per band the pick gain (as
    branch_pick_gain) and the mean rank correlation of prediction and truth among a state's
    chunks. {"pick_gain_<band>", "rank_corr_<band>", "states_<band>"}; None where a band has no
    state with two or more chunks."""
    pred, true, coverage = np.asarray(pred, np.float64), np.asarray(true, np.float64), np.asarray(coverage)
    out = {}
    for name, low, high in COVERAGE_BANDS:
        band = (coverage >= low) & (coverage < high)
        order = np.argsort(state_keys[band], kind="stable")  # a state's chunks side by side
        keys, p, t = state_keys[band][order], pred[band][order], true[band][order]
        _, starts, counts = np.unique(keys, return_index=True, return_counts=True)
        groups = [(s, c) for s, c in zip(starts, counts) if c >= 2]
        corrs = [rank_correlation(p[s:s + c], t[s:s + c]) for s, c in groups]
        corrs = [r for r in corrs if not np.isnan(r)]  # ties on either side: no rank correlation
        out.update({f"pick_gain_{name}": branch_pick_gain(p, t, keys) if groups else None,
                    f"rank_corr_{name}": float(np.mean(corrs)) if corrs else None, f"states_{name}": len(groups)})
    return out


def split_by_episode(episodes, val_ratio, seed):
    ids = np.unique(episodes)
    n_val = int(round(len(ids) * val_ratio))
    if len(ids) < 2 or n_val < 1 or n_val >= len(ids):
        raise RewardDataError(f"{len(ids)} episode(s) cannot be split into training and validation with "
                              f"--val_ratio {val_ratio}; collect more episodes (--num_eps) or change --val_ratio")
    val_ids = np.random.default_rng(seed).permutation(ids)[:n_val]
    is_val = np.isin(episodes, val_ids)
    return ~is_val, is_val


def scatter_plot(pred, true, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=4, alpha=0.4)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
