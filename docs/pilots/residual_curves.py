"""Rollout success during residual fine-tuning, each pilot beside its control (docs/residual_pilots.png).

Usage:
    python docs/pilots/residual_curves.py docs/residual_pilots.png NAME [NAME ...]

NAME is a protocol run under data/protocol/ (its seed-0 metrics.jsonl and NAME_control's are read);
the curves are 4-iteration means of the rollouts the fine-tuning collected (exploration noise on).
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curve(name, key="env_success", window=4):
    rows = [json.loads(line) for line in open(os.path.join("data", "protocol", name, "seed0", "metrics.jsonl"))]
    y = np.array([r[key] for r in rows])
    smooth = np.convolve(y, np.ones(window) / window, mode="valid")
    return np.arange(window, len(y) + 1), smooth


def main(out, names):
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, style in ((name, "-"), (f"{name}_control", "--")):
            if os.path.exists(os.path.join("data", "protocol", run, "seed0", "metrics.jsonl")):
                x, y = curve(run)
                ax.plot(x, y, style, label="control" if run.endswith("_control") else "setting")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("rollout success (4-iteration mean)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
