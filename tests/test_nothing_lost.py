"""A run never destroys earlier work: a run directory holds one run (continued with --resume or
discarded with --force, never silently), default run directories and outputs follow the whole
output path, and a second writer of a directory refuses at once."""

import hashlib
import os

import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import rollout as rollout_module
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.outputs import hold_lock
from diffusion_policy.common.runtime import UserError
from tests.helpers import interrupted_at_call


def finetune(root, *extra):
    return reward_finetuning.main(reward_finetuning.parse_args([
        "--num_ft_iters", "3", "--num_eps", "1", "--max_steps", "16", "--lr", "1e-3",
        "--noise_pred_model_path", str(root / "policy.ckpt"), "--reward_model_path", str(root / "reward.ckpt"),
        *extra]))


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_an_interrupted_run_is_refused_not_overwritten_and_force_starts_over(tiny_models, monkeypatch, tmp_path):
    root = tiny_models
    straight = finetune(root, "--output", str(tmp_path / "a.ckpt"))
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 3):
        finetune(root, "--output", str(tmp_path / "b.ckpt"))
    run_dir = tmp_path / "b_run"  # the default: beside the output
    kept = {name: digest(run_dir / name) for name in ("metrics.jsonl", "latest.ckpt")}
    with pytest.raises(UserError, match="holds an earlier run .*--resume.*--force"):
        finetune(root, "--output", str(tmp_path / "b.ckpt"))  # the flag forgotten: nothing is lost
    assert {name: digest(run_dir / name) for name in kept} == kept
    over = finetune(root, "--output", str(tmp_path / "b.ckpt"), "--force")  # asked for: a fresh run
    a, b = load_checkpoint(straight["output"], "policy"), load_checkpoint(over["output"], "policy")
    for key in a["model_state_dict"]:
        torch.testing.assert_close(a["model_state_dict"][key], b["model_state_dict"][key], rtol=0, atol=0)
    rows = open(run_dir / "metrics.jsonl").read().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == 3  # the discarded run's rows are gone, not mixed in


def test_outputs_of_one_file_name_in_two_folders_keep_their_own_runs_and_evaluations(tiny_models, tmp_path,
                                                                                      monkeypatch):
    root = tiny_models
    monkeypatch.chdir(tmp_path)  # the default evaluation outputs land under ./data/eval
    first = finetune(root, "--output", str(tmp_path / "a" / "policy_finetuned_rd0.ckpt"), "--num_ft_iters", "1")
    second = finetune(root, "--output", str(tmp_path / "b" / "policy_finetuned_rd0.ckpt"), "--num_ft_iters", "1")
    assert first["run_dir"] != second["run_dir"]
    for out in (first, second):
        assert os.path.exists(os.path.join(out["run_dir"], "metrics.jsonl"))
    evals = [evaluate_policy.main(evaluate_policy.parse_args(["--model_path", out["output"], "--num_eps", "1",
                                                              "--max_steps", "8"]))["output"]
             for out in (first, second)]
    assert evals[0] != evals[1] and all(os.path.exists(e) for e in evals)


def test_a_second_writer_of_a_held_directory_refuses_at_once(tiny_models, tmp_path):
    root = tiny_models
    with hold_lock(str(tmp_path / "busy_run"), "test"):
        with pytest.raises(UserError, match="another process is writing .*busy_run"):
            finetune(root, "--output", str(tmp_path / "busy.ckpt"), "--run_dir", str(tmp_path / "busy_run"))
        with pytest.raises(UserError, match="another process is writing"):
            evaluate_policy.main(evaluate_policy.parse_args([
                "--model_path", str(root / "policy.ckpt"), "--num_eps", "1", "--max_steps", "8",
                "--output", str(tmp_path / "busy.json"), "--run_dir", str(tmp_path / "busy_run")]))
    assert os.listdir(tmp_path / "busy_run") == []


def test_a_start_seed_of_another_purpose_runs_only_when_asked_for(tiny_models, tmp_path):
    argv = ["--model_path", str(tiny_models / "policy.ckpt"), "--num_eps", "1", "--max_steps", "8",
            "--start_seed", "300000", "--output", str(tmp_path / "e.json")]
    with pytest.raises(UserError, match="evaluation draws its starts from"):
        evaluate_policy.main(evaluate_policy.parse_args(argv))
    out = evaluate_policy.main(evaluate_policy.parse_args(argv + ["--any_seed_range"]))
    assert [e["seed"] for e in out["episodes"]] == [300000]
    validation = evaluate_policy.main(evaluate_policy.parse_args(  # pilots evaluate on validation starts: allowed
        argv[:argv.index("--start_seed")] + ["--start_seed", "400000", "--output", str(tmp_path / "v.json")]))
    assert [e["seed"] for e in validation["episodes"]] == [400000]
