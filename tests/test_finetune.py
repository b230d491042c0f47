"""reward_finetuning.main on the real environment with tiny models."""

import ast
import contextlib
import glob
import io
import json
import os
import re

import numpy as np
import pytest
import torch

import evaluate_policy
import reward_finetuning
from diffusion_policy import rollout as rollout_module
from diffusion_policy.finetune import adjoint as adjoint_module
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.runtime import UserError
from tests.helpers import interrupted_at_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("small_finetune")


def ft_args(root, *extra):
    return reward_finetuning.parse_args(ft_argv(root, *extra))


def ft_argv(root, *extra):
    return [
        "--num_ft_iters", "2", "--num_eps", "2", "--warmup_steps", "1", "--lr", "1e-3",
        *([] if "weighted" in extra else ["--clip_adjoint"]),  # the method README's command clamps the adjoint
        "--max_steps", "16", "--noise_pred_model_path", str(root / "policy.ckpt"),
        "--reward_model_path", str(root / "reward.ckpt"), "--action_reward_path", str(root / "r.npy"),
        "--output", str(root / "out" / "policy_finetuned_rd0.ckpt"), "--run_dir", str(root / "run"), *extra]


def test_two_iterations_write_a_policy_that_evaluates(tiny_models):
    root = tiny_models
    out = reward_finetuning.main(ft_args(root))
    rows = [json.loads(line) for line in open(root / "run" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("loss", "control_norm", "adjoint_norm", "predicted_reward", "env_score", "env_success"):
            assert key in r and r[key] == r[key]  # logged and not NaN
        assert r["num_trajectories"] == 4  # 2 episodes x 2 calls of 8 steps
    assert steps[0]["control_norm"] == 0.0 and steps[1]["control_norm"] > 0.0  # starts at the base
    assert "ref_predicted_reward" in rows[0]

    ckpt = load_checkpoint(out["output"], "policy")
    params = ckpt["provenance"]["config"]["params"]
    assert params["reward_scale"] == 10.0 and params["num_ft_iters"] == 2 and params["clip_adjoint"] is True
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")
    moved = max((ckpt["model_state_dict"][k] - base["ema_model_state_dict"][k]).abs().max().item()
                for k in ckpt["model_state_dict"])
    assert moved > 0
    result = evaluate_policy.main(evaluate_policy.parse_args([
        "--model_path", out["output"], "--num_eps", "2", "--max_steps", "8", "--output",
        str(root / "eval" / "eval.json")]))
    assert result["num_eps"] == 2


def test_weighted_takes_its_optimiser_steps_on_one_rollout(tiny_models):
    root = tiny_models
    out = reward_finetuning.main(ft_args(root, "--method", "weighted", "--num_ft_iters", "1", "--num_candidates", "3",
                                         "--warmup_steps", "3", "--run_dir", str(root / "g16"),
                                         "--output", str(root / "g16.ckpt")))
    state = load_checkpoint(str(root / "g16" / "latest.ckpt"), "policy")["train_state"]
    steps = reward_finetuning.METHODS["weighted"].config_class().grad_steps_per_iter
    assert [v["step"] for v in state["optimizer"]["state"].values()][0] == steps  # all on one rollout
    assert state["scheduler"]["last_epoch"] == steps  # warm-up counts optimiser steps
    assert out["correction_sq"] > 0
    config = load_checkpoint(out["output"], "policy")["provenance"]["config"]
    assert config["method"] == "weighted" and config["params"]["grad_steps_per_iter"] == steps


def test_clamped_fraction_of_the_terminal_adjoint_is_logged(tiny_models, monkeypatch):
    # -lambda grad r at the clean chunk is where --clip_adjoint bites first; the metric counts
    # its clamped entries: all of them under a tiny clamp, none under a huge one.
    from diffusion_policy.finetune import adjoint

    root = tiny_models
    frac = {}
    for clip in (1e-9, 1e9):
        monkeypatch.setattr(adjoint, "CLIP_VALUE", clip)
        out = reward_finetuning.main(ft_args(root, "--num_ft_iters", "1", "--run_dir", str(root / f"c{clip}"),
                                             "--output", str(root / f"c{clip}.ckpt")))
        frac[clip] = out["terminal_clipped_frac"]
    assert frac[1e-9] > 0.99 and frac[1e9] == 0.0


WEIGHTED = ["--method", "weighted", "--num_ft_iters", "3", "--num_candidates", "3", "--lr", "1e-3"]


@pytest.mark.parametrize("flags,at", [([], 2), (WEIGHTED, 3)], ids=["adjoint", "weighted"])
def test_resume_matches_an_uninterrupted_run(tiny_models, monkeypatch, flags, at):
    """Interrupted in iteration `at` and resumed: the same weights (live and EMA) as a run left alone."""
    root, tag = tiny_models, "w" if flags else ""

    def run(name, *extra):
        return reward_finetuning.main(ft_args(root, *flags, "--run_dir", str(root / f"{name}{tag}"),
                                              "--output", str(root / f"{name}{tag}.ckpt"), *extra))

    straight = run("a")
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", at):
        run("b")
    resumed = run("b", "--resume")
    a, b = load_checkpoint(straight["output"], "policy"), load_checkpoint(resumed["output"], "policy")
    for slot in ("model_state_dict", "ema_model_state_dict"):
        for key in a[slot]:
            torch.testing.assert_close(a[slot][key], b[slot][key], rtol=0, atol=0)
    with pytest.raises(UserError, match="other settings"):
        run("b", "--reward_scale", "3", "--resume")


def test_resume_with_a_lower_lr_is_accepted_and_recorded(tiny_models, monkeypatch, capsys):
    """The advice a diverged run prints ("Lower --lr ... and --resume") works as printed."""
    root = tiny_models
    with interrupted_at_call(monkeypatch, rollout_module, "rollout", 2):
        reward_finetuning.main(ft_args(root, "--run_dir", str(root / "lr"), "--output", str(root / "lr.ckpt")))
    reward_finetuning.main(ft_args(root, "--run_dir", str(root / "lr"), "--output", str(root / "lr.ckpt"),
                                   "--resume", "--lr", "2e-4"))
    assert "resuming" in capsys.readouterr().out
    config = json.load(open(root / "lr" / "config.json"))
    assert config["args"]["lr"] == 2e-4 and config["resumed"] == {"at": 1, "changed": {"lr": [1e-3, 2e-4]}}
    rows = [json.loads(line) for line in open(root / "lr" / "metrics.jsonl")]
    assert [r["lr"] for r in rows if "lr" in r] == [1e-3, 2e-4]  # the optimiser took the new rate
    assert load_checkpoint(str(root / "lr.ckpt"), "policy")["train_state"]["config"]["params"]["lr"] == 2e-4


def test_nan_loss_stops_with_a_clear_message(tiny_models, monkeypatch):
    root = tiny_models
    original = adjoint_module.adjoint_matching_loss

    def nan_loss(*args, **kwargs):
        per, norms = original(*args, **kwargs)
        return per * float("nan"), norms

    monkeypatch.setattr(adjoint_module, "adjoint_matching_loss", nan_loss)
    with pytest.raises(UserError, match="loss became nan at iteration 0"):
        reward_finetuning.main(ft_args(root, "--run_dir", str(root / "run_nan")))


@pytest.mark.parametrize("source", ["model", "simulator"])
def test_weighted_method_runs_with_either_reward_source_and_logs_the_tilt(tiny_models, source):
    root = tiny_models
    common = ["--method", "weighted", "--reward_source", source, "--num_candidates", "3", "--reward_scale", "30",
              "--tilt_every", "1"]
    out = reward_finetuning.main(ft_args(root, *common, "--run_dir", str(root / f"w_{source}"),
                                         "--output", str(root / f"w_{source}.ckpt")))
    rows = [json.loads(line) for line in open(root / f"w_{source}" / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["num_states"] == 4 and 0 < r["weight_ess_fraction"] <= 1
        assert r["selected_reward_gain"] >= 0  # softmax weights never prefer the worse candidates
        for key in ("tilt_realised", "tilt_predicted", "tilt_realised_ci95", "candidate_reward"):
            assert key in r
    ckpt = load_checkpoint(out["output"], "policy")
    assert ckpt["provenance"]["method"] == "weighted" and ckpt["provenance"]["reward_source"] == source
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")
    assert any(not torch.equal(ckpt["model_state_dict"][k], base["ema_model_state_dict"][k])
               for k in ckpt["model_state_dict"])

    control = reward_finetuning.main(ft_args(root, *common, "--control", "--run_dir", str(root / f"wc_{source}"),
                                             "--output", str(root / f"wc_{source}.ckpt")))
    assert load_checkpoint(control["output"], "policy")["provenance"]["control"] is True


def test_adjoint_matching_with_the_simulator_gradient(tiny_models):
    root = tiny_models
    out = reward_finetuning.main(ft_args(root, "--reward_source", "simulator", "--num_ft_iters", "1",
                                         "--run_dir", str(root / "am_sim"), "--output", str(root / "am_sim.ckpt")))
    assert out["num_trajectories"] == 4 and np.isfinite(out["loss"]) and out["adjoint_norm"] > 0


def test_method_settings_default_per_method_and_other_methods_flags_are_refused(capsys):
    args = reward_finetuning.parse_args(["--method", "weighted"])
    assert args.lr == 5e-5 and args.num_candidates == 8 and args.ema_decay == 0.998
    assert reward_finetuning.parse_args(["--method", "weighted", "--lr", "3e-3"]).lr == 3e-3
    adjoint = reward_finetuning.parse_args([])
    assert adjoint.method == "adjoint" and adjoint.num_ft_iters == 200 and adjoint.clip_adjoint is False
    assert adjoint.config.params == reward_finetuning.METHODS["adjoint"].config_class()
    for argv, flag in ((["--method", "weighted", "--clip_adjoint"], "--clip_adjoint"),
                       (["--num_candidates", "4"], "--num_candidates")):
        with pytest.raises(SystemExit):
            reward_finetuning.parse_args(argv)
        assert f"{flag} does not apply to --method" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the config's own check, as a one-line error
        reward_finetuning.parse_args(["--ema_decay", "1"])
    assert "ema_decay must be in [0, 1)" in capsys.readouterr().err


def test_adjoint_control_hands_each_chunk_another_chunks_gradient(tiny_models, monkeypatch):
    """--control with Adjoint Matching: the terminal adjoints are the same set of -lambda grad r,
    each given to another chunk (a permutation), not the chunk's own."""
    from diffusion_policy import sources
    from diffusion_policy.finetune import adjoint

    seen = {"grad": [], "terminal": []}
    real_grad, real_lean = sources.ModelReward.reward_and_grad, adjoint.lean_adjoint

    def grad_spy(self, *a, **k):
        out = real_grad(self, *a, **k)
        seen["grad"].append(out[1].detach().clone())
        return out

    def lean_spy(eps_fn, traj, timesteps, prev, abar, terminal, *a, **k):
        seen["terminal"].append(terminal.detach().clone())
        return real_lean(eps_fn, traj, timesteps, prev, abar, terminal, *a, **k)

    monkeypatch.setattr(sources.ModelReward, "reward_and_grad", grad_spy)
    monkeypatch.setattr(adjoint, "lean_adjoint", lean_spy)
    root = tiny_models
    reward_finetuning.main(ft_args(root, "--num_ft_iters", "1", "--num_eps", "4", "--control",
                                   "--run_dir", str(root / "am_control"), "--output", str(root / "am_control.ckpt")))
    grad, terminal = seen["grad"][0], seen["terminal"][0]
    assert len(grad) > 2
    own = -10.0 * grad  # lambda 10, the adjoint method's default
    assert not torch.allclose(terminal, own)
    # the same vectors in another order: each terminal is some chunk's -lambda grad r
    flat_t, flat_o = terminal.flatten(1), own.flatten(1)
    match = torch.cdist(flat_t, flat_o).argmin(1)
    torch.testing.assert_close(flat_t, flat_o[match])
    assert sorted(match.tolist()) == list(range(len(grad)))


def test_help_lists_the_common_flags_then_each_methods_own_under_its_heading():
    out = help_text()
    sections = out.split("\n\n")
    common = next(s for s in sections if s.startswith("options:"))
    common_flags = re.findall(r"^  (--?\w+)", common, flags=re.M)
    assert "--method" in common_flags and len(common_flags) <= 20
    every = len(reward_finetuning.METHODS)
    for name, method in reward_finetuning.METHODS.items():
        own = [(k, v[2]) for k, v in reward_finetuning.method_flags().items() if name in v[2] and len(v[2]) < every]
        assert own, name
        for key, methods in own:  # a method's flags come under the heading of the methods that take them
            heading = out.index(f"--method {' and '.join(methods)}:\n  ")
            assert out.index(f"\n  --{key}") > heading and f"--{key}" not in common_flags
            assert method.about in out[heading:out.index(f"\n  --{key}")]


def flags_named_in_errors(path):
    """Every --flag named in a string of a `raise`, a `.error(...)` call or a method's `nan_advice` (the
    advice a diverged run's message ends with) in the module at `path`."""
    tree = ast.parse(open(path).read())
    named = set()
    for node in ast.walk(tree):
        is_error_call = isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "error"
        is_advice = isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "nan_advice" for t in node.targets)
        if isinstance(node, ast.Raise) or is_error_call or is_advice:
            for const in ast.walk(node):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    named.update(re.findall(r"--([a-z][a-z_]*)", const.value))
    return named


def test_every_flag_an_error_message_names_exists():
    options = {a.lstrip("-") for a in reward_finetuning_options()}
    paths = [os.path.join(ROOT, "reward_finetuning.py"), *glob.glob(os.path.join(ROOT, "diffusion_policy/finetune/*.py"))]
    named = {flag: os.path.relpath(path, ROOT) for path in paths for flag in flags_named_in_errors(path)}
    assert {"hidden_dims", "alpha", "reward_scale", "clip_adjoint", "resume", "lr"} <= set(named)  # the walk finds them
    missing = {flag: path for flag, path in named.items() if flag not in options}
    assert not missing, f"error messages name flags reward_finetuning.py does not have: {missing}"


def help_text():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        reward_finetuning.parse_args(["--help"])
    return out.getvalue()


def reward_finetuning_options():
    return re.findall(r"^  (--\w+)", help_text(), flags=re.M)
