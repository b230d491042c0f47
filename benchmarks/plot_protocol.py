"""Figure of protocol results: held-out success of the pre-trained and each fine-tuned policy per seed.

Usage:
    python -m benchmarks.plot_protocol docs/finetune_protocol.png benchmarks/results/finetune_*.json

Top: success on the protocol's held-out starts, per setting and training seed, with 95 %
Wilson intervals; the pre-trained policy's success and interval are the grey band. Bottom:
the paired difference from the pre-trained policy on the same starts, with its 95 % interval.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion_policy.common.stats import wilson_ci  # noqa: E402


def plot(out, paths):
    results = [json.load(open(p)) for p in paths]
    columns = sum(len(res["runs"]) for res in results)
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(max(7.0, 0.38 * columns + 2.0), 7.5), sharex=True)
    pre = results[0]["pretrained"]
    n = results[0]["num_eval"]
    _, lo, hi = wilson_ci(round(pre["success"] * n), n)
    ax.axhspan(lo, hi, color="0.85", label=f"pre-trained {pre['success']:.3f}")
    ax.axhline(pre["success"], color="0.5")
    ax_diff.axhline(0.0, color="0.5")
    seeds, x = [], 0
    for res in results:
        first = x
        for seed, run in sorted(res["runs"].items()):
            s, lo, hi = wilson_ci(round(run["success"] * n), n)
            color = "tab:gray" if res["name"].endswith("_control") else "tab:blue"
            ax.errorbar(x, s, yerr=[[s - lo], [hi - s]], fmt="o", color=color, capsize=3)
            d, (dlo, dhi) = run["success_diff"], run["success_diff_ci95"]
            ax_diff.errorbar(x, d, yerr=[[d - dlo], [dhi - d]], fmt="o", color=color, capsize=3)
            seeds.append(str(seed))
            x += 1
        # the setting's name once, under its seeds (the seeds are the tick labels)
        ax_diff.text((first + x - 1) / 2, -0.08, res["name"], transform=ax_diff.get_xaxis_transform(),
                     rotation=35, ha="right", va="top", fontsize=7)
        for a in (ax, ax_diff):
            a.axvline(x - 0.5, color="0.9", lw=0.8)
    ax_diff.set_xticks(range(len(seeds)))
    ax_diff.set_xticklabels(seeds, fontsize=7)
    ax.set_title("each setting's training seeds (tick labels) beside its control (grey)", fontsize=9)
    ax.set_ylabel(f"held-out success ({n} starts)")
    ax_diff.set_ylabel("paired difference from pre-trained")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    print(plot(sys.argv[1], sys.argv[2:]))
