"""benchmarks/reward_ceiling.py and temperature.py: every row is paired with plain sampling on the
same starts and the same sampling noise."""

import json

import pytest

from benchmarks import reward_ceiling, temperature


def test_ceiling_rows_pair_best_of_n_with_plain_sampling(tiny_models, tmp_path):
    root = tiny_models
    common = ["--model_path", str(root / "policy.ckpt"), "--num_eval", "3", "--max_steps", "16",
              "--out_dir", str(tmp_path / "work")]
    out = reward_ceiling.main(reward_ceiling.parse_args(common + [
        "--reward_model_path", str(root / "reward.ckpt"), "--n", "2", "--json", str(tmp_path / "ceiling.json")]))
    plain = json.load(open(tmp_path / "work" / "plain" / "eval.json"))
    saved = json.load(open(tmp_path / "ceiling.json"))
    assert [r["reward_model"] for r in saved["rows"]] == [str(root / "reward.ckpt"), "simulator"]
    assert saved["git_commit"] and saved["config"]["n"] == 2 and "cores" in saved["machine"]
    for r in saved["rows"]:
        ev = json.load(open(tmp_path / "work" / f"best_of_2_{'simulator' if r['reward_model'] == 'simulator' else 'reward'}"
                            / "eval.json"))
        # the same starts and the same sampling seed as the plain run, paired start by start
        assert [e["seed"] for e in ev["episodes"]] == [e["seed"] for e in plain["episodes"]]
        assert ev["summary"]["best_of"] == 2 and r["n"] == 2
        want = sum(a["success"] - b["success"] for a, b in zip(ev["episodes"], plain["episodes"])) / 3
        assert r["success_diff"] == pytest.approx(want) and r["wall_s_per_call"] > 0
    assert saved["rows"][0]["target"] == "reward_after" and out["plain"]["success"] == saved["plain"]["success"]
    # pilots run on the validation starts, paired there too; the held-out starts' cache is not reused
    reward_ceiling.main(reward_ceiling.parse_args(common[:-1] + [str(tmp_path / "pilot"), "--eval_start", "400000",
                                                                 "--no-simulator", "--n", "2", "--reward_model_path",
                                                                 str(root / "reward.ckpt"), "--json",
                                                                 str(tmp_path / "pilot.json")]))
    for name in ("plain", "best_of_2_reward"):
        assert [e["seed"] for e in json.load(open(tmp_path / "pilot" / name / "eval.json"))["episodes"]] == [
            400000, 400001, 400002]
    with pytest.raises(SystemExit):
        reward_ceiling.parse_args(["--eval_start", "200000"])  # reward collection's starts

    temps = temperature.main(temperature.parse_args(common + ["--rows", "ddpm:1", "ddim:0", "--json",
                                                              str(tmp_path / "t.json")]))
    assert temps["rows"][0]["success_diff"] == 0.0 and temps["rows"][0]["score_diff"] == 0.0  # ddpm at s = 1 is plain
    assert temps["rows"][1]["sampler"] == "ddim" and temps["rows"][1]["noise_scale"] == 0.0
    with pytest.raises(SystemExit):
        temperature.parse_args(["--rows", "euler:1"])
