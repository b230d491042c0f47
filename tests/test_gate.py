"""The residual's learned gate (`act_value`): it acts where the reward model's frame value is at least a level."""

import numpy as np
import pytest
import torch

import reward_finetuning
from diffusion_policy.checkpoint import (load_checkpoint, policy_checkpoint, policy_from_checkpoint, save_checkpoint)
from diffusion_policy.common.runtime import UserError
from diffusion_policy.env import geometry
from diffusion_policy import residual_policy
from diffusion_policy.report import gate_sentence
from diffusion_policy.residual_policy import FrameValue, ResidualDiffusionPolicy, ResidualNetConfig
from diffusion_policy.reward_model import RewardModel, RewardModelConfig, load_reward_model, reward_checkpoint
from tests.test_residual import SMALL, base_policy, randomised
from tests.test_residual_step import first_actions, goal_windows


@pytest.fixture(scope="module")
def dynamics_reward(tiny_models):
    """A tiny dynamics reward model (random weights) beside the tiny policy, whose frame values spread."""
    torch.manual_seed(7)
    base = base_policy(tiny_models)
    model = RewardModel(RewardModelConfig(hidden_dims=(32,), structure="dynamics", target="reward_after"),
                        base.obs_normalizer, base.action_normalizer, 0.5, 0.2)
    path = tiny_models / "reward_dynamics.ckpt"
    save_checkpoint(reward_checkpoint(model, provenance={}), str(path))
    return path


def windows_and_level(base, reward_path):
    """Windows at 0..80 px from the goal and elsewhere; a level between their frame values' extremes."""
    windows = goal_windows(base.config.obs_horizon, [0.0, 10.0, 20.0, 40.0, 80.0, 160.0])
    values = load_reward_model(str(reward_path)).frame_reward(torch.from_numpy(windows[:, -1]).float()).detach()
    level = float(values.median())
    return windows, values, level


@pytest.mark.parametrize("per_step", [True, False])
def test_the_gate_acts_exactly_where_the_frame_value_is_at_or_above_the_level(tiny_models, dynamics_reward, per_step):
    base = base_policy(tiny_models)
    windows, values, level = windows_and_level(base, dynamics_reward)
    gated = randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05, per_step=per_step,
                                                                          act_value=level)))
    gated.frame_value = FrameValue.of(load_reward_model(str(dynamics_reward)))
    expected = (values >= level).numpy()
    assert expected.any() and not expected.all()  # the level splits the windows
    np.testing.assert_array_equal(gated.acting(windows[:, -1]).numpy(), expected)
    everywhere = ResidualDiffusionPolicy.on(base, ResidualNetConfig(alpha=0.05, per_step=per_step))
    everywhere.residual.load_state_dict(gated.residual.state_dict())

    plain = first_actions(base, windows)
    got, corrected = first_actions(gated, windows, per_step), first_actions(everywhere, windows, per_step)
    assert (corrected - plain).abs().amax(-1).min() > 1e-3  # the residual corrects every one of them
    torch.testing.assert_close(got[expected], corrected[expected], rtol=0, atol=0)  # value at or above: it acts
    torch.testing.assert_close(got[~expected], plain[~expected], rtol=0, atol=0)  # below: the base alone
    gated.residual.config.act_value = float(values.max())  # at the level exactly still acts
    assert gated.acting(windows[:, -1]).numpy().tolist() == (values >= values.max()).numpy().tolist()


def test_the_gates_decision_reads_no_goal_pose(tiny_models, dynamics_reward, monkeypatch):
    base = base_policy(tiny_models)
    windows, _, level = windows_and_level(base, dynamics_reward)
    learned = ResidualDiffusionPolicy.on(base, ResidualNetConfig(act_value=level))
    learned.frame_value = FrameValue.of(load_reward_model(str(dynamics_reward)))
    rule = ResidualDiffusionPolicy.on(base, ResidualNetConfig(act_within=30.0))
    before_learned, before_rule = learned.acting(windows[:, -1]), rule.acting(windows[:, -1])
    other = (100.0, 400.0, 1.0)  # the goal moved: another pose
    monkeypatch.setattr(geometry, "GOAL_POSE", other)
    monkeypatch.setattr(residual_policy, "GOAL_KEYPOINTS", geometry.block_keypoints(other))
    assert torch.equal(learned.acting(windows[:, -1]), before_learned)  # the learned gate: unchanged
    assert not torch.equal(rule.acting(windows[:, -1]), before_rule)  # the rule moved with the goal (the patch bites)


def test_the_checkpoint_carries_the_value_and_old_checkpoints_load_as_before(tiny_models, dynamics_reward):
    base = base_policy(tiny_models)
    windows, values, level = windows_and_level(base, dynamics_reward)
    gated = randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(per_step=True, act_value=level)))
    gated.frame_value = FrameValue.of(load_reward_model(str(dynamics_reward)))
    ckpt = policy_checkpoint(gated)
    save_checkpoint(ckpt, str(tiny_models / "gated.ckpt"))
    again = policy_from_checkpoint(load_checkpoint(str(tiny_models / "gated.ckpt"), "policy"))
    assert again.residual.config.act_value == level
    torch.testing.assert_close(again.frame_value(windows[:, -1]), values, rtol=0, atol=1e-6)  # no second file
    assert torch.equal(again.acting(windows[:, -1]), gated.acting(windows[:, -1]))
    # evaluation's override: another level, or the goal-pose rule in its place
    assert policy_from_checkpoint(ckpt, act_value=1.0).residual.config.act_value == 1.0
    rule = policy_from_checkpoint(ckpt, act_within=30.0).residual.config
    assert rule.act_within == 30.0 and rule.act_value is None
    # a checkpoint written before the learned gate: no level, no value; it loads as it did, and refuses the gate
    old = policy_checkpoint(randomised(ResidualDiffusionPolicy.on(base, ResidualNetConfig(per_step=True))))
    del old["residual"]["config"]["act_value"]
    loaded = policy_from_checkpoint(old)
    assert loaded.residual.config.act_value is None and loaded.frame_value is None
    assert loaded.acting(windows[:, -1]).all()
    with pytest.raises(UserError, match="carries none"):
        policy_from_checkpoint(old, act_value=0.5)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(UserError, match=r"act_value must be in \(0, 1\]"):
            policy_from_checkpoint(ckpt, act_value=bad)


def test_a_run_writes_the_gate_and_its_value_and_trains_as_without_it(tiny_models, dynamics_reward):
    root = tiny_models
    flags = ["--method", "residual_step", *SMALL[2:], "--noise_pred_model_path", str(root / "policy.ckpt"),
             "--reward_model_path", str(dynamics_reward), "--explore_std", "0"]

    def run(name, *extra):
        return reward_finetuning.main(reward_finetuning.parse_args([*flags, "--output", str(root / f"{name}.ckpt"),
                                                                    "--run_dir", str(root / f"{name}_run"), *extra]))

    gated = load_checkpoint(run("gv", "--act_value", "0.6")["output"], "policy")
    assert gated["residual"]["config"]["act_value"] == 0.6
    reward = load_reward_model(str(dynamics_reward))
    for key, value in reward.value.state_dict().items():  # the reward model's own frame value, copied in
        torch.testing.assert_close(gated["residual"]["frame_value"]["state_dict"][key], value, rtol=0, atol=0)
    plain = load_checkpoint(run("gvp")["output"], "policy")  # a deployment setting: the same weights
    assert "frame_value" in plain["residual"] and plain["residual"]["config"]["act_value"] is None
    for key, value in plain["residual"]["state_dict"].items():
        torch.testing.assert_close(gated["residual"]["state_dict"][key], value, rtol=0, atol=0)
    with pytest.raises(UserError, match="--act_value gates on the reward model's value of a frame"):
        run("gvs", "--act_value", "0.6", "--reward_source", "simulator")


def test_the_pipelines_report_names_the_gate_the_policy_acts_behind(tiny_models, dynamics_reward, tmp_path):
    """report.md's sentence on the gate is read off the fine-tuned checkpoint: the level it carries, and why."""
    base = base_policy(tiny_models)
    gated = ResidualDiffusionPolicy.on(base, ResidualNetConfig(per_step=True, act_value=0.45))
    gated.frame_value = FrameValue.of(load_reward_model(str(dynamics_reward)))
    paths = {}
    for name, policy in (("value", gated), ("within", ResidualDiffusionPolicy.on(base, ResidualNetConfig(act_within=30))),
                         ("none", ResidualDiffusionPolicy.on(base, ResidualNetConfig())), ("plain", base)):
        paths[name] = str(tmp_path / f"{name}.ckpt")
        save_checkpoint(policy_checkpoint(policy), paths[name])
    assert "value of the frame is at least 0.45 (`--act_value`" in gate_sentence(paths["value"])
    assert "within 30 px of the goal pose (`--act_within`)" in gate_sentence(paths["within"])
    assert gate_sentence(paths["none"]).startswith("The residual acts at every step")
    assert gate_sentence(paths["plain"]) == ""


def test_copying_the_frame_value_draws_nothing_from_the_global_generator(dynamics_reward):
    """A run that copies the reward model's frame value (every residual run on a dynamics reward model) must draw the
    critic and actor it drew before the gate existed: the copy's overwritten initial weights take no random numbers."""
    reward = load_reward_model(str(dynamics_reward))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    value = FrameValue.of(reward)
    FrameValue.from_checkpoint(value.to_checkpoint())
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
