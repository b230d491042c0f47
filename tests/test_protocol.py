"""benchmarks/finetune_protocol.py: paired differences, the JSON it writes, and resuming."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import reward_finetuning
from benchmarks import finetune_protocol, plot_protocol
from diffusion_policy.checkpoint import load_checkpoint


def test_paired_interval():
    ft, pre = np.array([1, 1, 0, 1, 0, 1]), np.array([0, 1, 0, 0, 0, 1])
    mean, (low, high) = finetune_protocol.paired(ft, pre)
    d = ft - pre
    assert mean == pytest.approx(d.mean())
    assert high - mean == pytest.approx(1.959964 * d.std(ddof=1) / np.sqrt(len(d)))
    assert mean - low == pytest.approx(high - mean)


@pytest.fixture(scope="module")
def tiny_protocol(tiny_models, tmp_path_factory):
    """One tiny protocol run (two seeds, two iterations) that the tests below read and extend."""
    root, tmp = tiny_models, tmp_path_factory.mktemp("protocol")
    ft = ["--method", "weighted", "--reward_model_path", str(root / "reward.ckpt"), "--num_ft_iters", "2",
          "--num_eps", "1", "--max_steps", "16", "--num_candidates", "2", "--states_per_iter", "2",
          "--batch_states", "2", "--grad_steps_per_iter", "2", "--lr", "1e-2", "--tilt_states", "2",
          "--tilt_samples", "2"]
    own = ["--name", "tiny", "--model_path", str(root / "policy.ckpt"), "--seeds", "0", "1", "--num_eval", "2",
           "--out_dir", str(tmp / "work"), "--results_dir", str(tmp / "results"), "--tilt_every", "1"]
    result = finetune_protocol.main(finetune_protocol.parse_args(own + ["--"] + ft))
    return SimpleNamespace(root=root, tmp=tmp, ft=ft, own=own, result=result)


def test_protocol_writes_paired_results_and_resumes(tiny_protocol):
    tmp, result = tiny_protocol.tmp, tiny_protocol.result
    argv = tiny_protocol.own + ["--"] + tiny_protocol.ft
    saved = json.load(open(tmp / "results" / "finetune_tiny.json"))
    assert saved["method"] == "weighted" and saved["reward_source"] == "model" and set(saved["runs"]) == {"0", "1"}
    pre = json.load(open(tmp / "work" / "pretrained_eval_2.json"))["episodes"]
    for seed, run in saved["runs"].items():
        ft = json.load(open(tmp / "work" / "tiny" / f"seed{seed}_eval.json"))["episodes"]
        assert [e["seed"] for e in ft] == [100000, 100001]
        assert run["success_diff"] == pytest.approx(np.mean([a["success"] - b["success"] for a, b in zip(ft, pre)]))
        assert run["score_diff"] == pytest.approx(np.mean([a["score"] - b["score"] for a, b in zip(ft, pre)]))
        for key in ("success", "score", "success_diff_ci95", "tilt_realised", "tilt_predicted", "wall_s"):
            assert key in run
    assert saved["mean_success_diff"] == pytest.approx(np.mean([r["success_diff"] for r in saved["runs"].values()]))
    assert result["wall_s_per_run"] > 0 and "--seed S" in saved["command"]

    png = plot_protocol.plot(str(tmp / "fig.png"), [str(tmp / "results" / "finetune_tiny.json")])
    assert os.path.getsize(png) > 1000

    stamp = os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt")
    finetune_protocol.main(finetune_protocol.parse_args(argv))  # everything exists: nothing is redone
    assert os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt") == stamp

    # one seed at a time, as separate processes of the same --name do: neither drops the other's
    seed1 = argv.index("1", argv.index("--seeds"))
    alone = finetune_protocol.main(finetune_protocol.parse_args(argv[:seed1] + argv[seed1 + 1:]))
    assert set(alone["runs"]) == {"0", "1"} and alone["runs"]["1"] == saved["runs"]["1"]
    assert alone["mean_success_diff"] == pytest.approx(saved["mean_success_diff"])
    assert set(json.load(open(tmp / "work" / "tiny" / "wall_s.json"))) == {"0", "1"}


def test_second_round_starts_from_the_first_rounds_policies(tiny_protocol):
    """--init_from NAME: seed S fine-tunes NAME's seed-S policy and is still compared with --model_path."""
    tmp, ft = tiny_protocol.tmp, tiny_protocol.ft
    seeds = tiny_protocol.own.index("--seeds")
    own = tiny_protocol.own[:seeds + 2] + tiny_protocol.own[seeds + 3:]  # seed 0 only
    own[own.index("tiny")] = "tiny_round2"
    out = finetune_protocol.main(finetune_protocol.parse_args(own + ["--init_from", "tiny", "--"] + ft))
    config = json.load(open(tmp / "work" / "tiny_round2" / "seed0" / "config.json"))["args"]
    assert config["noise_pred_model_path"] == str(tmp / "work" / "tiny" / "seed0.ckpt")
    assert out["init_from"] == "tiny" and out["pretrained"]["model_path"] == str(tiny_protocol.root / "policy.ckpt")
    assert os.path.join("tiny", "seedS.ckpt") in out["command"]
    pre = json.load(open(tmp / "work" / "pretrained_eval_2.json"))["episodes"]
    mine = json.load(open(tmp / "work" / "tiny_round2" / "seed0_eval.json"))["episodes"]
    assert out["runs"]["0"]["success_diff"] == pytest.approx(np.mean([a["success"] - b["success"] for a, b in zip(mine, pre)]))
    with pytest.raises(SystemExit, match="tiny_control"):  # no first-round control to start from
        finetune_protocol.main(finetune_protocol.parse_args(own + ["--control", "--init_from", "tiny", "--"] + ft))
    with pytest.raises(SystemExit):
        finetune_protocol.parse_args(own + ["--init_from", "tiny", "--extrapolate", "2", "--"] + ft)


def test_extrapolated_protocol_reuses_the_runs_and_matches_the_flag(tiny_protocol):
    """--extrapolate s judges base + s (fine-tuned - base) of the same runs without training
    again, and that policy is the one reward_finetuning.py --extrapolate s saves."""
    root, tmp, ft = tiny_protocol.root, tiny_protocol.tmp, tiny_protocol.ft
    seeds = tiny_protocol.own.index("--seeds")
    own = tiny_protocol.own[:seeds + 2] + tiny_protocol.own[seeds + 3:]  # seed 0 only
    stamp = os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt")
    out = finetune_protocol.main(finetune_protocol.parse_args(own + ["--extrapolate", "2", "--"] + ft))
    assert os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt") == stamp  # not trained again
    saved = json.load(open(tmp / "results" / "finetune_tiny_x2.json"))
    assert saved["extrapolate"] == 2 and "--extrapolate 2 --seed S" in saved["command"]
    assert saved["runs"]["0"]["tilt_predicted"] == out["runs"]["0"]["tilt_predicted"] and "tilt_realised" in saved["runs"]["0"]

    derived = load_checkpoint(str(tmp / "work" / "tiny_x2" / "seed0.ckpt"), "policy")
    direct = reward_finetuning.main(reward_finetuning.parse_args(
        [*ft, "--noise_pred_model_path", str(root / "policy.ckpt"), "--seed", "0", "--extrapolate", "2",
         "--tilt_every", "1", "--output", str(tmp / "direct.ckpt"), "--run_dir", str(tmp / "direct"),
         "--no_progress"]))
    flagged = load_checkpoint(direct["output"], "policy")
    assert flagged["provenance"]["extrapolate"] == 2 and "tilt_realised_unextrapolated" in direct
    base = load_checkpoint(str(root / "policy.ckpt"), "policy")["ema_model_state_dict"]
    moved = False
    for key, value in flagged["ema_model_state_dict"].items():  # training in another process: equal to float noise
        torch.testing.assert_close(value, derived["ema_model_state_dict"][key], rtol=1e-4, atol=1e-6)
        moved |= not torch.equal(value, base[key])
    assert moved
    trained = load_checkpoint(str(tmp / "work" / "tiny" / "seed0.ckpt"), "policy")["ema_model_state_dict"]
    for key, value in derived["ema_model_state_dict"].items():  # twice the step the run took
        torch.testing.assert_close(value - base[key], 2 * (trained[key] - base[key]), rtol=1e-5, atol=1e-7)


def test_tilt_meter_reads_policies_along_their_update(tiny_models, tmp_path):
    """s = 0 is the base itself (realised exactly 0, the same sampling noise); s = 1 the policy."""
    from benchmarks import tilt_meter

    root = tiny_models
    ft = reward_finetuning.main(reward_finetuning.parse_args(
        ["--method", "weighted", "--reward_model_path", str(root / "reward.ckpt"), "--noise_pred_model_path",
         str(root / "policy.ckpt"), "--num_ft_iters", "2", "--num_eps", "1", "--max_steps", "16", "--num_candidates",
         "2", "--states_per_iter", "2", "--batch_states", "2", "--grad_steps_per_iter", "2", "--lr", "1e-2",
         "--output", str(tmp_path / "ft.ckpt"), "--run_dir", str(tmp_path / "run"), "--no_progress"]))
    common = ["--model_path", ft["output"], "--base_path", str(root / "policy.ckpt"), "--reward_model_path",
              str(root / "reward.ckpt"), "--num_states", "4", "--num_samples", "3", "--max_steps", "16"]
    out = tilt_meter.main(tilt_meter.parse_args(common + ["--extrapolate", "0", "1", "--json", str(tmp_path / "t.json")]))
    at0, at1 = out["rows"]
    assert at0["extrapolate"] == 0 and at0["tilt_realised"] == 0.0
    plain = tilt_meter.main(tilt_meter.parse_args(common + ["--json", str(tmp_path / "p.json")]))["rows"][0]
    assert at1["tilt_realised"] == plain["tilt_realised"] != 0.0


def test_soup_probe_pairs_each_soup_with_the_pretrained_policy(tiny_models, tmp_path):
    from benchmarks import soup_probe

    root = tiny_models
    argv = ["--name", "tiny", "--model_path", str(root / "policy.ckpt"), "--seeds", "0", "1", "--num_eval", "2",
            "--out_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"), "--",
            "--method", "weighted", "--reward_model_path", str(root / "reward.ckpt"), "--num_ft_iters", "1",
            "--num_eps", "1", "--max_steps", "16", "--num_candidates", "2", "--states_per_iter", "2",
            "--batch_states", "2", "--grad_steps_per_iter", "1", "--lr", "1e-2", "--tilt_states", "2", "--tilt_samples", "2"]
    finetune_protocol.main(finetune_protocol.parse_args(argv))
    members = [str(tmp_path / "work" / "tiny" / f"seed{s}.ckpt") for s in (0, 1)]
    out = soup_probe.main(soup_probe.parse_args([
        "--name", "tiny", "--model_path", *members, "--base_path", str(root / "policy.ckpt"), "--reward_model_path",
        str(root / "reward.ckpt"), "--extrapolate", "0", "2", "--num_eval", "2", "--pretrained_eval",
        str(tmp_path / "work" / "pretrained_eval_2.json"), "--out_dir", str(tmp_path / "soups"),
        "--results_dir", str(tmp_path / "results")]))
    at0, at2 = out["rows"]
    assert at0["extrapolate"] == 0 and at0["tilt_realised"] == 0.0  # s = 0 is the pre-trained policy itself
    pre = json.load(open(tmp_path / "work" / "pretrained_eval_2.json"))["episodes"]
    soup0 = json.load(open(tmp_path / "soups" / "tiny" / "soup_x0_eval.json"))["episodes"]
    assert [e["success"] for e in soup0] == [e["success"] for e in pre] and at0["success_diff"] == 0.0
    saved = json.load(open(tmp_path / "results" / "soup_probe_tiny.json"))
    assert saved["members"] == members and len(saved["rows"]) == 2 and "success_diff_ci95" in saved["rows"][1]
