"""report.md for a pipeline run: the held-out table, plots, videos, commands and versions."""

import json
import os
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion_policy.checkpoint import load_checkpoint  # noqa: E402
from diffusion_policy.common.atomic import atomic_open, atomic_path  # noqa: E402
from diffusion_policy.common.runlog import git_commit, _versions  # noqa: E402
from diffusion_policy.common.stats import Z95  # noqa: E402


def read_metrics(path):
    """Rows of a metrics.jsonl (empty if the file is missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows, key):
    pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_pretrain(run_dir, path):
    rows = read_metrics(os.path.join(run_dir, "pretrain", "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label in (("train_loss", "train (running mean)"), ("val_loss_ema", "validation, EMA weights")):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title("pre-training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# the reward each method logs of its own chunks: Adjoint Matching's, the weighted method's candidates',
# the residual method's executed chunks (the source's value of each: learned, or the simulator's), the per-step
# residual's potential over the steps taken
REWARD_KEYS = {"predicted_reward": "predicted reward", "candidate_reward": "candidate reward",
               "chunk_value": "reward of the executed chunks", "step_value": "reward per step (the critic's potential)"}


def plot_finetune(metrics_paths, path):
    """Fine-tuning curves, one set per run (label -> metrics.jsonl): the reward of the chunks the
    method saw, and the true score and success of the rollouts of the policy that acted (10-iteration
    means; for the residual method the residual policy itself, with the share of calls it acted on),
    with the periodic validation success as points. Returns the curves' labels, as drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, metrics_path in metrics_paths.items():
        rows = read_metrics(metrics_path)
        for key, name in REWARD_KEYS.items():
            x, y = _series(rows, key)
            if x:
                axes[0].plot(x, _smooth(y), label=f"{label} {name}")
                break
        x, y = _series(rows, "env_score")
        if x:
            axes[1].plot(x, _smooth(y), label=f"{label} rollout score")
        x, y = _series(rows, "env_success")
        if x:
            axes[1].plot(x, _smooth(y), "--", label=f"{label} rollout success of the acting policy")
        x, y = _series(rows, "residual_on_prob")
        if x:
            axes[1].plot(x, y, ":", label=f"{label} share of calls the residual acts on")
        x, y = _series(rows, "val_success")
        if x:
            axes[1].plot(x, y, "o-", label=f"{label} validation success")
    labels = [line.get_label() for ax in axes for line in ax.get_lines()]
    axes[0].set_title("reward of the chunks the method saw", fontsize=10)
    axes[1].set_title("true reward of the same rollouts", fontsize=10)
    for ax in axes:
        ax.set_xlabel("fine-tuning iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return labels


def _smooth(y, window=10):
    out, acc = [], []
    for v in y:
        acc = (acc + [v])[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot_coverage(before, after, label_after, path):
    """Per-seed max coverage of the pre-trained policy against a fine-tuned one."""
    b = {e["seed"]: e["max_coverage"] for e in before["episodes"]}
    a = {e["seed"]: e["max_coverage"] for e in after["episodes"]}
    seeds = sorted(set(a) & set(b))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter([b[s] for s in seeds], [a[s] for s in seeds], s=12, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.axhline(0.95, color="g", lw=0.8, ls="--")
    ax.axvline(0.95, color="g", lw=0.8, ls="--")
    ax.set_xlabel("pre-trained: max coverage")
    ax.set_ylabel(f"{label_after}: max coverage")
    ax.set_title(f"per held-out seed ({len(seeds)}); dashed = success", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _fmt(m, ci):
    return f"{m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def paired_difference(after, before, key="success"):
    """Mean of after - before over the episodes both evaluated (by start seed), its 95 % interval
    (normal approximation over the per-start differences), and the starts won and lost."""
    b = {e["seed"]: float(e[key]) for e in before["episodes"]}
    d = np.array([float(e[key]) - b[e["seed"]] for e in after["episodes"] if e["seed"] in b])
    half = Z95 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)], int((d > 0).sum()), int((d < 0).sum())


# why the pipeline ran the method it ran (report.md says it under the paired table)
WHY = {
    "weighted": (": reward-weighted denoising, which beats its control by the protocol (+5.5 over three seeds; "
                 "README, Results); `--method residual` gains more."),
    "residual": (": the frozen policy plus a bounded residual on each executed chunk, trained against a chunk critic "
                 "(+17.8 by the protocol, every seed above its control; the per-step residual gains more: README, "
                 "Results). Its curve shows the acting "
                 "policy's own rollouts: the residual switched on at a rising share of calls, then at every call."),
    "residual_step": (": the frozen policy plus a bounded residual on each control step, trained against a per-step "
                      "critic with a pessimistic actor, TD3's target smoothing and an EMA of the residual, acting only "
                      "behind a gate (below): the setting that meets issue #49's bar by the protocol with the learned "
                      "reward, every seed above its control (README, Results). Its curve shows the acting policy's own "
                      "rollouts "
                      "(collection corrects everywhere): the residual switched on at a rising share of calls, then "
                      "at every call."),
    "adjoint": ": Adjoint Matching, the method README's command (`reward_finetuning.py` with no `--method`).",
    "qam": (": Adjoint Matching toward a chunk critic learnt beside the denoiser (QAM): +10.7 on the pilot's validation "
            "starts, short of the residual's gain and not yet judged by the protocol (README, docs/findings.md)."),
}


# where the residual acts, and why the pipeline gates it so (report.md says it after WHY)
GATE_WHY = {
    "within": ("The residual acts only within {level:g} px of the goal pose (`--act_within`), a rule that knows "
               "Push-T's goal; the pipeline gates by the learned reward instead (`--act_value 0.45`), which gained as "
               "much by the protocol on the same runs (+24.8 against +24.7) without reading the goal (README, Results)."),
    "value": ("The residual acts only where the reward model's value of the frame is at least {level:g} "
              "(`--act_value`, the learned gate: no goal pose read; the level chosen on the demonstrations). The "
              "pipeline gates so because by the protocol this gate, with the residual's EMA, gained +36.9 points of "
              "held-out success over three seeds (+37.0 / +37.4 / +36.4), each above its control, score +0.010, one start "
              "ruined of 1,500 (README, Results); the 30 px goal-pose rule (`--act_within 30`) needs Push-T's goal written "
              "into the code."),
    "none": "The residual acts at every step (no gate).",
}


def gate_sentence(ckpt_path):
    """Where the fine-tuned policy at ckpt_path lets its residual act, and why ("" for a policy without one)."""
    residual = load_checkpoint(ckpt_path, "policy").get("residual")
    if not residual:
        return ""
    cfg = residual["config"]
    if cfg.get("act_value") is not None:
        return GATE_WHY["value"].format(level=cfg["act_value"])
    if cfg.get("act_within"):
        return GATE_WHY["within"].format(level=cfg["act_within"])
    return GATE_WHY["none"]


def write_report(run_dir, preset, rounds, seed, method, policies, evals, commands, stages, wall_s):
    """Write <run_dir>/report.md and its plots; returns the report's path. `method`: the fine-tuning
    --method the pipeline ran; `commands`: (label, command) of every stage, shown as run."""
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    plot_pretrain(run_dir, os.path.join(plots, "pretrain_loss.png"))
    plot_finetune({f"rd{k}": os.path.join(run_dir, f"finetune_rd{k}", "metrics.jsonl") for k in range(rounds)},
                  os.path.join(plots, "finetune_curves.png"))
    last_name = policies[-1][0]
    plot_coverage(evals["pretrained"], evals[last_name], last_name, os.path.join(plots, "coverage_per_seed.png"))

    first = evals["pretrained"]["summary"]
    lines = [f"# Pipeline report: {os.path.basename(os.path.normpath(run_dir))}", "",
             f"Preset `{preset}`, {rounds} round(s), seed {seed}; written "
             f"{time.strftime('%Y-%m-%d %H:%M')}; this invocation took {wall_s / 60:.1f} min "
             f"(skipped stages not counted).", "",
             f"## Held-out evaluation ({first['num_eps']} episodes, seeds {first['start_seed']}-"
             f"{first['start_seed'] + first['num_eps'] - 1}, {first['max_steps']} steps)", "",
             "Mean with 95 % interval (normal approximation; Wilson for the success rate).", "",
             "| policy | score | success rate | mean max coverage | steps to success |",
             "|---|---|---|---|---|"]
    for name, _ in policies:
        s = evals[name]["summary"]
        steps = s["mean_steps_to_success"]
        lines.append(f"| {name} | {_fmt(s['score'], s['score_ci95'])} | "
                     f"{_fmt(s['success_rate'], s['success_rate_ci95'])} | "
                     f"{_fmt(s['mean_max_coverage'], s['mean_max_coverage_ci95'])} | "
                     f"{'n/a' if steps is None else f'{steps:.1f}'} |")
    lines += ["", "Each fine-tuned policy against the pre-trained one, start by start (the same starts and "
              "sampling noise): the difference in success, with its paired 95 % interval.", "",
              "| policy | success difference [95 %] | starts won / lost |", "|---|---|---|"]
    for name, _ in policies[1:]:
        diff, ci, won, lost = paired_difference(evals[name], evals["pretrained"])
        lines.append(f"| {name} | {diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | {won} / {lost} |")
    gate = gate_sentence(policies[-1][1]) if len(policies) > 1 else ""
    lines += ["", f"Fine-tuned with `--method {method}`" + WHY.get(method, ".") + (f" {gate}" if gate else ""), "",
              "## Plots", "",
              "![pre-training loss](plots/pretrain_loss.png)", "",
              "![fine-tuning curves](plots/finetune_curves.png)", "",
              f"![per-seed coverage, pre-trained vs. {last_name}](plots/coverage_per_seed.png)", ""]
    for k in range(rounds):
        fit = os.path.join(run_dir, f"reward_rd{k}", "reward_fit_val.png")
        if os.path.exists(fit):
            lines += [f"Reward model rd{k}, validation fit:", "", f"![reward fit rd{k}](reward_rd{k}/reward_fit_val.png)",
                      ""]
    lines += ["## Videos", ""]
    for name, _ in policies:
        links = [f"[{os.path.basename(v)}]({os.path.relpath(v, run_dir)})" for v in evals[name]["videos"]]
        lines.append(f"- {name}: " + (", ".join(links) if links else "none"))
    lines += ["", "## Stages and exact commands", "", "| stage | status | wall time |", "|---|---|---|"]
    for st in stages:
        lines.append(f"| {st['stage']} | {st['status']} | "
                     f"{str(st.get('wall_s', '')) + ' s' if 'wall_s' in st else ''} |")
    lines += ["", "```console"] + [f"# {label}\n{cmd}" for label, cmd in commands] + ["```", "",
                                                                                     "## Versions", ""]
    lines.append(f"- git commit: {git_commit()}")
    lines += [f"- {k}: {v}" for k, v in _versions().items()]
    path = os.path.join(run_dir, "report.md")
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
