"""pretrain_policy.main and evaluate_policy.main on a few real episodes, with tiny models."""

import json

import imageio.v2 as imageio
import os

import pytest
import torch

import evaluate_policy
import pretrain_policy
from diffusion_policy.checkpoint import CheckpointError, load_checkpoint, policy_from_checkpoint, save_checkpoint
from diffusion_policy.data.dataset import DatasetError, load_pusht_arrays
from diffusion_policy.policy import DiffusionPolicy
from diffusion_policy.common.runtime import UserError


def pretrain_args(dataset_path, tmp_path, *extra):
    return pretrain_policy.parse_args([
        "--dataset_path", dataset_path, "--preset", "tiny", "--run_dir", str(tmp_path / "run"),
        "--output", str(tmp_path / "policy.ckpt"), "--log_every", "10", *extra])


def test_tiny_pretraining_lowers_the_loss_and_the_policy_evaluates(dataset_path, tmp_path):
    out = pretrain_policy.main(pretrain_args(dataset_path, tmp_path, "--num_steps", "120", "--save_every", "60"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], losses
    assert rows[-1]["val_loss_ema"] < rows[0]["val_loss_ema"]
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["args"]["preset"] == "tiny" and "torch" in config["versions"]

    ckpt = load_checkpoint(out["output"], "policy")
    assert ckpt["config"]["model"]["down_dims"] == [16, 32]
    assert ckpt["provenance"]["script"] == "pretrain_policy.py" and len(ckpt["provenance"]["train_episodes"]) == 4
    assert ckpt["train_state"]["step"] == 120 and "optimizer" not in ckpt["train_state"]

    result = evaluate_policy.main(evaluate_policy.parse_args([
        "--model_path", out["output"], "--num_eps", "2", "--max_steps", "16", "--output",
        str(tmp_path / "eval" / "eval.json"), "--save_vids", "--media_dir", str(tmp_path / "media"),
        "--render_size", "64", "--batch_size", "1"]))
    saved = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [e["seed"] for e in saved["episodes"]] == [100000, 100001]
    assert saved["summary"]["num_eps"] == 2 and 0.0 <= saved["summary"]["score"] <= 1.0
    for episode in saved["episodes"]:
        # the max of clip(coverage / 0.95, 0, 1) is clip(max coverage / 0.95, 0, 1)
        assert episode["score"] == pytest.approx(min(episode["max_coverage"] / 0.95, 1.0))
    assert len(result["videos"]) == 2 and sorted(os.listdir(tmp_path / "media")) == sorted(
        os.path.basename(v) for v in result["videos"])  # streamed, renamed when complete: no temporary left
    for video in result["videos"]:  # the reset's frame and one per control step, at the asked size
        frames = imageio.mimread(video)
        assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    # a second evaluation into the same directory keeps its own config.json and metrics.jsonl
    evaluate_policy.main(evaluate_policy.parse_args([
        "--model_path", out["output"], "--num_eps", "1", "--max_steps", "8", "--output",
        str(tmp_path / "eval" / "other.json")]))
    for name, episodes in (("eval", 2), ("other", 1)):
        config = json.load(open(tmp_path / "eval" / f"{name}_run" / "config.json"))
        assert config["args"]["output"].endswith(f"{name}.json") and config["args"]["num_eps"] == episodes
        assert (tmp_path / "eval" / f"{name}_run" / "metrics.jsonl").exists()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(dataset_path, tmp_path, monkeypatch):
    straight = pretrain_policy.main(pretrain_args(dataset_path, tmp_path / "a", "--num_steps", "30",
                                                  "--save_every", "10"))

    class Interrupt(Exception):
        pass

    original = pretrain_policy.EMA.update

    def update_then_maybe_crash(self, model, step):
        original(self, model, step)
        if step == 24:  # after the checkpoint at step 20
            raise Interrupt

    monkeypatch.setattr(pretrain_policy.EMA, "update", update_then_maybe_crash)
    with pytest.raises(Interrupt):
        pretrain_policy.main(pretrain_args(dataset_path, tmp_path / "b", "--num_steps", "30", "--save_every", "10"))
    assert load_checkpoint(str(tmp_path / "b" / "run" / "latest.ckpt"), "policy")["train_state"]["step"] == 20
    monkeypatch.setattr(pretrain_policy.EMA, "update", original)
    resumed = pretrain_policy.main(pretrain_args(dataset_path, tmp_path / "b", "--num_steps", "30",
                                                 "--save_every", "10", "--resume"))
    a, b = load_checkpoint(straight["output"], "policy"), load_checkpoint(resumed["output"], "policy")
    for key in a["ema_model_state_dict"]:
        torch.testing.assert_close(a["ema_model_state_dict"][key], b["ema_model_state_dict"][key], rtol=0, atol=0)
        torch.testing.assert_close(a["model_state_dict"][key], b["model_state_dict"][key], rtol=0, atol=0)
    with pytest.raises(UserError, match="other settings"):  # --lr may change on resume; the batch size not
        pretrain_policy.main(pretrain_args(dataset_path, tmp_path / "b", "--num_steps", "30", "--batch_size", "8",
                                           "--resume"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(dataset_path, tmp_path, monkeypatch):
    original = DiffusionPolicy.compute_loss
    calls = {"n": 0}

    def loss_then_nan(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if kwargs.get("noise") is not None:  # training calls (their own draws), not validation
            calls["n"] += 1
            if calls["n"] == 15:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DiffusionPolicy, "compute_loss", loss_then_nan)
    with pytest.raises(UserError) as err:
        pretrain_policy.main(pretrain_args(dataset_path, tmp_path, "--num_steps", "30", "--save_every", "10"))
    assert "loss became nan at step 14" in str(err.value) and "latest.ckpt (step 10)" in str(err.value)
    assert load_checkpoint(str(tmp_path / "run" / "latest.ckpt"), "policy")["train_state"]["step"] == 10
    assert not (tmp_path / "policy.ckpt").exists()


def test_missing_dataset_and_wrong_checkpoint_kind_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="check --dataset_path"):
        pretrain_policy.main(pretrain_args(str(tmp_path / "nowhere.zarr"), tmp_path))
    reward = tmp_path / "reward_model_rd0.ckpt"
    save_checkpoint({"format_version": 1, "kind": "reward", "config": {}}, reward)
    with pytest.raises(CheckpointError, match="'reward' checkpoint, but a 'policy' checkpoint"):
        evaluate_policy.main(evaluate_policy.parse_args(["--model_path", str(reward), "--num_eps", "1"]))


@pytest.mark.parametrize("down_dims, parameters", [((32, 64, 128), 1_393_314), ((64, 128, 256), 4_559_554)])
def test_a_checkpoint_of_each_studied_width_loads_and_samples(dataset_path, tmp_path, down_dims, parameters):
    """The widths of benchmarks/pretrain_study (the CPU preset's other settings): the sizes its JSON
    reports, and a checkpoint that loads and samples chunks of real observation windows."""
    out = pretrain_policy.main(pretrain_policy.parse_args([
        "--dataset_path", dataset_path, "--preset", "cpu", "--down_dims", *map(str, down_dims), "--num_steps", "2",
        "--batch_size", "8", "--max_train_episodes", "4", "--warmup_steps", "1", "--log_every", "1",
        "--run_dir", str(tmp_path / "run"), "--output", str(tmp_path / "policy.ckpt")]))
    policy = policy_from_checkpoint(load_checkpoint(out["output"], "policy"))
    assert list(policy.unet_config.down_dims) == list(down_dims)
    assert sum(p.numel() for p in policy.model.parameters()) == parameters
    windows = torch.as_tensor(load_pusht_arrays(dataset_path)["obs"][:8]).view(4, 2, -1)  # real observation windows
    chunk = policy.predict_action(windows, generator=torch.Generator().manual_seed(0))["action_pred"]
    assert chunk.shape == (4, policy.config.pred_horizon, 2) and torch.isfinite(chunk).all()


def test_a_study_row_killed_part_way_resumes_and_carries_its_wall_time(dataset_path, tmp_path):
    """benchmarks/pretrain_study: a row whose pre-training is killed (the session ends) after a
    checkpoint resumes from it when run again, ends at its full length, and its wall time adds the
    killed run's time up to its last checkpoint; a second kill before any new checkpoint adds nothing."""
    import signal
    import subprocess
    import sys
    import time

    from benchmarks import pretrain_study

    ckpt = str(tmp_path / "row.ckpt")
    latest = tmp_path / "row.ckpt_run" / "latest.ckpt"
    cmd = [sys.executable, "pretrain_policy.py", "--preset", "tiny", "--dataset_path", dataset_path,
           "--num_steps", "300", "--save_every", "20", "--log_every", "10", "--seed", "0",
           "--output", ckpt, "--run_dir", ckpt + "_run"]
    killed = subprocess.Popen(cmd, cwd=pretrain_study.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    step, elapsed = saved["train_state"]["step"], saved["metrics"]["elapsed_s"]
    assert 0 < step < 300 and not os.path.exists(ckpt)

    assert pretrain_study.carry_wall(ckpt) == {"step": step, "wall_s": elapsed}
    assert pretrain_study.carry_wall(ckpt) == {"step": step, "wall_s": elapsed}  # no new checkpoint: nothing added

    started = time.time()
    assert pretrain_study.train_row(cmd, ckpt) == ckpt
    rest = time.time() - started
    assert load_checkpoint(ckpt, "policy")["train_state"]["step"] == 300
    assert f"resuming {latest} at step {step}/300" in open(ckpt + ".log").read()
    wall = float(open(ckpt + ".wall_s").read())
    assert elapsed + 0.5 * rest < wall <= elapsed + rest + 0.1
