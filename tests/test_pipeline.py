"""run_pipeline.py --smoke end to end (the stages' hand-offs), its resume, and its refusals."""

import json
import os
import threading
import time

import numpy as np

import pytest
import torch

import run_pipeline
from diffusion_policy.common.runtime import UserError
from diffusion_policy.checkpoint import load_checkpoint

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def pipeline(*argv):
    return run_pipeline.main(run_pipeline.parse_args([*argv]))


def test_smoke_pipeline_two_rounds_report_resume_lock_and_staleness(dataset_path, tmp_path, monkeypatch):
    """One --smoke --rounds 2 pipeline (in a thread): while it runs, a second pipeline into its
    directory refuses at once; then its report, a rerun that skips everything, an interrupted run
    that redoes only what is missing, and a changed input that redoes everything after it."""
    run_dir = tmp_path / "smoke"
    common = ["--smoke", "--run_dir", str(run_dir), "--dataset_path", dataset_path]
    real_collect, release, held, result = run_pipeline.collect_rewards.main, threading.Event(), [], {}

    def collect_after_release(args):  # the first collection waits until the second writer was turned away
        if not held:
            held.append(True)
            release.wait(120)
        return real_collect(args)

    def first_pipeline():
        torch.set_num_threads(1)  # this thread's own OpenMP team: two would spin against the waiting main thread's
        try:
            result["out"] = pipeline(*common, "--rounds", "2")
        except BaseException as e:  # re-raised in the test's thread below
            result["error"] = e

    monkeypatch.setattr(run_pipeline.collect_rewards, "main", collect_after_release)
    first = threading.Thread(target=first_pipeline)
    first.start()
    deadline = time.time() + 120
    while not held and first.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert held, result.get("error")
        with pytest.raises(UserError, match="another process is writing"):
            pipeline(*common, "--rounds", "2")
    finally:
        release.set()
        first.join(300)
    if "error" in result:
        raise result["error"]
    monkeypatch.setattr(run_pipeline.collect_rewards, "main", real_collect)
    out = result["out"]
    files = {os.path.relpath(os.path.join(d, f), run_dir) for d, _, fs in os.walk(run_dir) for f in fs}
    for expected in ("checkpoints/policy_pretrained.ckpt", "reward/action_reward_data_6eps_rd0.npy",
                     "reward/action_reward_data_6eps_rd1.npy", "checkpoints/reward_model_rd0.ckpt",
                     "checkpoints/reward_model_rd1.ckpt", "checkpoints/policy_finetuned_rd0.ckpt",
                     "checkpoints/policy_finetuned_rd1.ckpt", "eval/pretrained/eval.json",
                     "eval/finetuned_rd1/eval.json", "plots/pretrain_loss.png", "plots/finetune_curves.png",
                     "plots/coverage_per_seed.png", "report.md", "pipeline.json"):
        assert expected in files, expected
    assert all(s["status"] == "ran" for s in out["stages"])
    # round 1 starts from round 0's fine-tuned policy, and collects from it
    rd1 = json.load(open(run_dir / "reward" / "action_reward_data_6eps_rd1.json"))
    assert rd1["policy_checkpoint"].endswith("policy_finetuned_rd0.ckpt") and rd1["seeds"] == [200006, 200011]
    ft1 = json.load(open(run_dir / "finetune_rd1" / "config.json"))["args"]
    assert ft1["noise_pred_model_path"].endswith("policy_finetuned_rd0.ckpt")
    report = (run_dir / "report.md").read_text()
    for policy in ("pretrained", "finetuned_rd0", "finetuned_rd1"):
        s = json.load(open(run_dir / "eval" / policy / "eval.json"))["summary"]
        assert f"| {policy} | {s['score']:.3f}" in report
    assert "python pretrain_policy.py --preset tiny" in report and ".mp4" in report
    assert "Fine-tuned with `--method residual_step`: the frozen policy plus a bounded residual on each" in report
    assert "The residual acts only where the reward model's value of the frame is at least 0.45" in report  # which gate
    assert "The pipeline gates so because by the protocol this gate" in report  # and why
    rd1_residual = load_checkpoint(str(run_dir / "checkpoints" / "policy_finetuned_rd1.ckpt"), "policy")["residual"]
    assert rd1_residual["config"]["per_step"] and rd1_residual["config"]["act_value"] == 0.45  # continued, gated
    assert not rd1_residual["config"].get("act_within")
    pre = {e["seed"]: e["success"] for e in json.load(open(run_dir / "eval" / "pretrained" / "eval.json"))["episodes"]}
    last = json.load(open(run_dir / "eval" / "finetuned_rd1" / "eval.json"))["episodes"]
    diff = np.mean([float(e["success"]) - float(pre[e["seed"]]) for e in last])  # paired start by start
    assert f"| finetuned_rd1 | {diff:+.3f} [" in report
    videos = [f for f in files if f.startswith("media/") and f.endswith(".mp4")]
    assert len(videos) == 3  # one per policy

    # the same command again: every stage is skipped, nothing is recomputed
    stamp = os.path.getmtime(run_dir / "checkpoints" / "policy_finetuned_rd1.ckpt")
    again = pipeline(*common, "--rounds", "2")
    assert all(s["status"] == "skipped" for s in again["stages"])
    assert os.path.getmtime(run_dir / "checkpoints" / "policy_finetuned_rd1.ckpt") == stamp
    assert again["summaries"] == out["summaries"]

    # an interrupted pipeline: remove the last outputs, and only those stages run again
    os.remove(run_dir / "checkpoints" / "policy_finetuned_rd1.ckpt")
    os.remove(run_dir / "eval" / "finetuned_rd1" / "eval.json")
    resumed = pipeline(*common, "--rounds", "2")
    ran = [s["stage"] for s in resumed["stages"] if s["status"] == "ran"]
    # the new checkpoint is another file (its provenance holds wall times): its videos are redone too
    assert ran == ["fine-tune rd1", "evaluate finetuned_rd1", "videos finetuned_rd1"]

    # a changed input: --force --seed 1 interrupted right after pre-training, then --seed 1 again:
    # every later stage is stale (its input policy changed) and runs on the seed-1 policy, instead of
    # the seed-0 artifacts being reported under a seed-1 heading
    seed0 = json.load(open(run_dir / "eval" / "finetuned_rd0" / "eval.json"))

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_pipeline.collect_rewards, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline(*common, "--force", "--seed", "1")
    monkeypatch.setattr(run_pipeline.collect_rewards, "main", real_collect)
    again = pipeline(*common, "--seed", "1")
    status = {s["stage"]: s["status"] for s in again["stages"]}
    assert status.pop("pre-train") == "skipped"  # made with --seed 1 by the interrupted run: up to date
    assert set(status.values()) == {"ran"}, status  # everything after it was made from the seed-0 policy
    for name in ("collect_rd0", "finetune_rd0"):
        assert json.load(open(run_dir / name / "config.json"))["args"]["seed"] == 1
    assert json.load(open(run_dir / "eval" / "finetuned_rd0" / "eval.json"))["episodes"] != seed0["episodes"]
    assert all(s["status"] == "skipped" for s in pipeline(*common, "--seed", "1")["stages"])


def test_bad_inputs_stop_before_any_work(dataset_path, tmp_path):
    with pytest.raises(SystemExit):  # argparse: unknown preset
        run_pipeline.parse_args(["--preset", "huge"])
    with pytest.raises(UserError, match="dataset not found"):
        pipeline("--smoke", "--run_dir", str(tmp_path / "a"), "--dataset_path", str(tmp_path / "nowhere.zarr"))
    assert not (tmp_path / "a").exists()
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    with pytest.raises(UserError, match="not a pipeline run directory"):
        pipeline("--smoke", "--run_dir", str(foreign), "--dataset_path", dataset_path)
    other = tmp_path / "c"
    other.mkdir()
    (other / "pipeline.json").write_text(json.dumps({"identity": {"preset": "cpu", "seed": 0,
                                                                  "dataset_path": dataset_path}}))
    with pytest.raises(UserError, match="another pipeline run"):
        pipeline("--smoke", "--run_dir", str(other), "--dataset_path", dataset_path)
    assert os.listdir(other) == ["pipeline.json"]
    with pytest.raises(SystemExit):  # parse time: --rounds must be at least 1
        pipeline("--smoke", "--rounds", "0", "--run_dir", str(tmp_path / "d"), "--dataset_path", dataset_path)
    assert not (tmp_path / "d").exists()


def test_the_cpu_preset_runs_the_readme_stage_commands():
    """run_pipeline.py runs the commands the README documents (flags and values; paths are the run's)."""
    readme = open(README).read()
    documented = {}
    for line in readme.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "python" and words[1].endswith(".py") and words[1] not in documented:
            documented[words[1]] = words[2:]

    def settings(argv):  # flag -> value, leaving out paths
        out, i = {}, 0
        while i < len(argv):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            if not (value and ("/" in value or value.endswith((".ckpt", ".npy", ".zarr")))):
                out[argv[i]] = value
            i += 2 if value is not None else 1
        return out

    preset = run_pipeline.PRESETS["cpu"]
    for script, stage in [("collect_rewards.py", "collect"), ("train_reward.py", "reward")]:
        assert settings(preset[stage]) == settings(documented[script]), script
    # fine-tuning: the setting that beats its control (the README says so); the documented command
    # is the method README's Adjoint Matching, which reward_finetuning.py runs with no --method
    assert preset["finetune"] == ["--method", "residual_step", "--actor_pessimism", "1", "--target_noise", "0.02",
                                  "--residual_ema", "0.9999", "--act_value", "0.45"]
    assert "--method" not in documented["reward_finetuning.py"]
    assert ("`run_pipeline.py` fine-tunes with `--method residual_step --actor_pessimism 1 --target_noise 0.02 "
            "--residual_ema 0.9999 --act_value 0.45`"
            in " ".join(readme.split()))


def test_the_cpu_preset_is_what_the_readme_and_the_help_say(capsys):
    """The README's stage table and pretrain_policy.py --help state the CPU preset's UNet, steps,
    batch and sampler steps (the preset benchmarks/pretrain_study kept): the preset's own values."""
    import re

    import pretrain_policy

    readme = open(README).read()
    with pytest.raises(SystemExit):
        pretrain_policy.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    row = next(line for line in readme.splitlines() if line.startswith("| 1. behaviour-clone"))
    pattern = r"UNet (\d+)/(\d+)/(\d+), ([\d,]+) steps of batch (\d+), (\d+) DDPM steps"
    cpu = pretrain_policy.PRESETS["cpu"]
    for text in (row, help_text):
        found = re.search(pattern, text)
        assert found, text
        numbers = [int(x.replace(",", "")) for x in found.groups()]
        assert numbers == [*cpu["down_dims"], cpu["num_steps"], cpu["batch_size"], cpu["num_inference_steps"]], text


def test_the_finetune_curves_show_what_each_method_logs(tmp_path):
    """report.md's curves: the reward each method logs of its own chunks (the residual method's executed
    chunks), the acting policy's rollout success, and for the residual the share of calls it acts on."""
    from diffusion_policy.report import plot_finetune

    def metrics(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))
        return str(path)

    residual = metrics("residual", [{"chunk_value": 0.5 + 0.01 * i, "env_score": 0.9, "env_success": 0.5,
                                     "residual_on_prob": min(1.0, i / 4)} for i in range(6)])
    weighted = metrics("weighted", [{"candidate_reward": 0.4, "env_score": 0.9, "env_success": 0.4}] * 3)
    step = metrics("step", [{"step_value": 0.3, "potential_rmse": 0.01}] * 2)
    labels = plot_finetune({"rd0": residual, "rd1": weighted, "rd2": step}, str(tmp_path / "curves.png"))
    assert labels == ["rd0 reward of the executed chunks", "rd1 candidate reward",
                      "rd2 reward per step (the critic's potential)",
                      "rd0 rollout score", "rd0 rollout success of the acting policy",
                      "rd0 share of calls the residual acts on", "rd1 rollout score",
                      "rd1 rollout success of the acting policy"]
    assert (tmp_path / "curves.png").stat().st_size > 0
