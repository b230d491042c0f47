"""Every bad input to every entry point: refused before any work, in one line, writing nothing.

One table, one row per case: (script, arguments, a fragment of the expected message). Each row
runs the script's entry point as `python <script>.py` does (run_cli: main(parse_args())), in a
scratch directory holding the files the rows point at, and asserts a non-zero exit, a single
stderr line that starts with "error:" and holds the fragment, no traceback, and no new or
changed file anywhere under the scratch directory. Two rows also run as real subprocesses.
"""

import json
import pickle
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import collect_rewards
from benchmarks import finetune_protocol
import evaluate_policy
import pretrain_policy
import reward_finetuning
import run_pipeline
import train_reward
from diffusion_policy.checkpoint import load_checkpoint, policy_checkpoint, policy_from_checkpoint, save_checkpoint
from diffusion_policy.common.outputs import file_digest
from diffusion_policy.common.resume import resumable_state
from diffusion_policy.finetune.qam import QAM, QAMConfig
from diffusion_policy.normalizer import MinMaxNormalizer
from diffusion_policy.reward_data import save_reward_data, sidecar_path
from diffusion_policy.residual_policy import ResidualDiffusionPolicy, ResidualNetConfig
from diffusion_policy.reward_model import RewardModel, RewardModelConfig, reward_checkpoint
from diffusion_policy.common.cli import run_cli
from tests.helpers import META, script_parser, synthetic_columns

SCRIPTS = {m.__name__.split(".")[-1]: m for m in (pretrain_policy, collect_rewards, train_reward, reward_finetuning,
                                                  evaluate_policy, run_pipeline, finetune_protocol)}
FT = ["--noise_pred_model_path", "policy.ckpt", "--reward_model_path", "reward.ckpt"]

CASES = [
    # ---- zero or negative counts and sizes, out-of-range values ------------------------------
    ("pretrain_policy", ["--num_steps", "0"], "argument --num_steps: must be at least 1, got 0"),
    ("pretrain_policy", ["--num_epochs", "-2"], "argument --num_epochs: must be at least 1, got -2"),
    ("pretrain_policy", ["--batch_size", "0"], "argument --batch_size: must be at least 1"),
    ("pretrain_policy", ["--lr", "0"], "argument --lr: must be greater than 0"),
    ("pretrain_policy", ["--num_inference_steps", "0"], "argument --num_inference_steps: must be at least 1"),
    ("pretrain_policy", ["--val_ratio", "1.5"], "argument --val_ratio: must be between 0 and 1"),
    ("collect_rewards", ["--num_eps", "0"], "argument --num_eps: must be at least 1, got 0"),
    ("collect_rewards", ["--branches", "-1"], "argument --branches: must be at least 0, got -1"),
    ("collect_rewards", ["--max_steps", "0"], "argument --max_steps: must be at least 1"),
    ("collect_rewards", ["--gamma", "1.2"], "argument --gamma: must be between 0 and 1"),
    ("collect_rewards", ["--batch_size", "-5"], "argument --batch_size: must be at least 1"),
    ("train_reward", ["--num_epochs", "0"], "argument --num_epochs: must be at least 1, got 0"),
    ("train_reward", ["--lr", "-0.01"], "argument --lr: must be greater than 0"),
    ("train_reward", ["--batch_size", "0"], "argument --batch_size: must be at least 1"),
    ("train_reward", ["--hidden_dims", "64", "0"], "argument --hidden_dims: must be at least 1"),
    ("train_reward", ["--lr", "nan"], "argument --lr: must be finite"),
    ("reward_finetuning", ["--num_ft_iters", "0"], "argument --num_ft_iters: must be at least 1, got 0"),
    ("reward_finetuning", ["--num_eps", "0"], "argument --num_eps: must be at least 1"),
    ("reward_finetuning", ["--lr", "0"], "argument --lr: must be greater than 0"),
    ("reward_finetuning", ["--method", "weighted", "--clip_adjoint"], "--clip_adjoint does not apply to --method weighted"),
    ("reward_finetuning", ["--num_candidates", "4"], "--num_candidates does not apply to --method adjoint"),
    ("reward_finetuning", ["--ema_decay", "1"], "ema_decay must be in [0, 1)"),
    ("reward_finetuning", ["--reward_scale", "-1"], "argument --reward_scale: must be 0 or more, got -1"),
    ("reward_finetuning", ["--num_candidates", "1"], "argument --num_candidates: must be at least 2"),
    ("reward_finetuning", ["--ema_decay", "1.5"], "argument --ema_decay: must be between 0 and 1"),
    ("reward_finetuning", ["--method", "residual", "--alpha", "-0.1"], "argument --alpha: must be 0 or more, got -0.1"),
    ("reward_finetuning", ["--method", "residual", "--buffer_size", "100"],
     "buffer_size (100) must hold at least one batch (256)"),
    ("reward_finetuning", ["--method", "residual", "--warmup_iters", "40"], "warmup_iters must be in [0, num_ft_iters)"),
    ("reward_finetuning", ["--method", "residual", "--reward_scale", "3"], "--reward_scale does not apply to --method residual"),
    ("reward_finetuning", ["--method", "residual", "--noise_pred_model_path", "policy.ckpt", "--reward_model_path",
                           "reward_obs12.ckpt"], "does not fit the policy policy.ckpt: obs_dim 12 vs 20"),
    ("reward_finetuning", ["--method", "weighted", "--noise_pred_model_path", "residual.ckpt", "--reward_model_path",
                           "reward.ckpt"], "residual.ckpt carries a residual (--method residual)"),
    ("reward_finetuning", ["--method", "residual", "--alpha", "0.5", "--noise_pred_model_path", "residual.ckpt",
                           "--reward_model_path", "reward.ckpt"], "continue it with the same --method, --alpha, --hidden_dims and --act_within"),
    ("evaluate_policy", ["--num_eps", "0"], "argument --num_eps: must be at least 1, got 0"),
    ("evaluate_policy", ["--num_inference_steps", "0"], "argument --num_inference_steps: must be at least 1"),
    ("evaluate_policy", ["--num_eps", "ten"], "argument --num_eps: expected a whole number, got 'ten'"),
    ("evaluate_policy", ["--save_vids", "--render_size", "17"], "argument --render_size: must be even"),
    ("evaluate_policy", ["--act_within", "-1"], "argument --act_within: must be 0 or more"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--act_within", "30"], "act_within gates a residual's corrections"),
    ("reward_finetuning", ["--method", "residual_step", *FT, "--act_within", "-3"], "argument --act_within: must be 0 or more"),
    ("evaluate_policy", ["--act_value", "1.5"], "argument --act_value: must be between 0 and 1"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--act_value", "0.5"], "act_value gates a residual's corrections"),
    ("evaluate_policy", ["--model_path", "residual.ckpt", "--act_value", "0.5"], "carries none"),
    ("evaluate_policy", ["--model_path", "residual.ckpt", "--act_value", "0.5", "--act_within", "3"], "two gates: give one"),
    ("reward_finetuning", ["--method", "residual_step", *FT, "--act_value", "0"], "act_value must be in (0, 1]"),
    ("reward_finetuning", ["--method", "residual_step", *FT, "--act_value", "0.5", "--act_within", "30"],
     "act_value and act_within are two gates"),
    ("reward_finetuning", ["--method", "residual_step", *FT, "--act_value", "0.5"],
     "--act_value gates on the reward model's value of a frame"),
    ("reward_finetuning", ["--method", "qam", "--act_value", "0.5"], "--act_value does not apply to --method qam"),
    ("reward_finetuning", ["--method", "qam", "--reward_scale", "0"], "reward_scale (lambda, QAM's inv_temp) must be > 0"),
    ("reward_finetuning", ["--num_critics", "10"], "--num_critics does not apply to --method adjoint"),
    ("reward_finetuning", ["--method", "adjoint", "--backup_pessimism", "0.5"],
     "--backup_pessimism does not apply to --method adjoint"),
    ("reward_finetuning", ["--method", "qam", "--am_batch", "0"], "argument --am_batch: must be at least 1"),
    ("reward_finetuning", ["--method", "qam", "--warmup_iters", "24"], "warmup_iters must be in [0, num_ft_iters)"),
    ("reward_finetuning", ["--method", "qam", "--noise_pred_model_path", "residual.ckpt", "--reward_model_path",
                           "reward.ckpt"], "residual.ckpt carries a residual (--method residual)"),
    ("reward_finetuning", ["--method", "qam", "--correction_dims", "0"], "argument --correction_dims: must be at least 1"),
    ("reward_finetuning", ["--correction_dims", "64"], "--correction_dims does not apply to --method adjoint"),
    ("reward_finetuning", ["--method", "qam", *FT, "--tilt_value", "0"], "tilt_value must be in (0, 1]"),
    ("reward_finetuning", ["--method", "qam", *FT, "--tilt_value", "0.45"], "--tilt_value reads the reward model's value"),
    ("reward_finetuning", ["--tilt_value", "0.45"], "--tilt_value does not apply to --method adjoint"),
    ("reward_finetuning", ["--method", "qam", "--critic_unit", "call"], "critic_unit must be one of ('chunk', 'step')"),
    ("reward_finetuning", ["--critic_unit", "step"], "--critic_unit does not apply to --method adjoint"),
    ("reward_finetuning", ["--method", "qam", "--correction_dims", "8", "--noise_pred_model_path", "corrected.ckpt",
                           "--reward_model_path", "reward.ckpt"], "corrected.ckpt already carries a correction"),
    ("run_pipeline", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    # ---- outputs that cannot be written: found at start ---------------------------------------
    ("pretrain_policy", ["--output", "a_file/policy.ckpt"], "the file"),
    ("pretrain_policy", ["--run_dir", "a_file"], "--run_dir a_file is a file, but a directory is needed"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--output", "/proc/no_such/r.npy"], "is not writable"),
    ("train_reward", ["--action_reward_path", "r.npy", "--run_dir", "a_file/run"], "the file"),
    ("reward_finetuning", FT + ["--output", "/proc/no_such/ft.ckpt"], "is not writable"),
    ("reward_finetuning", FT + ["--output", "a_dir"], "--output a_dir is a directory, but a file is needed"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--output", "a_file/eval.json"], "the file"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--save_vids", "--media_dir", "a_file"],
     "--media_dir a_file is a file"),
    ("run_pipeline", ["--run_dir", "/proc/no_such/run"], "is not writable"),
    # ---- an output that is one of the inputs, or another output (#24, class 2) ---------------------
    ("reward_finetuning", FT + ["--output", "policy.ckpt"], "--output policy.ckpt is --noise_pred_model_path itself"),
    ("reward_finetuning", FT + ["--output", "./reward.ckpt"], "--output ./reward.ckpt is --reward_model_path itself"),
    ("train_reward", ["--action_reward_path", "r.npy", "--output", "r.npy"], "--output r.npy is --action_reward_path itself"),
    ("train_reward", ["--action_reward_path", "r.npy", "--output", "r.json"], "--output r.json is its sidecar itself"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--output", "policy.ckpt"], "must end in .npy"),
    ("collect_rewards", ["--model_path", "policy.json", "--output", "policy.npy"], "its sidecar policy.json is --model_path"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--output", "c.json"], "--output c.json must end in .npy"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--output", "policy.ckpt"], "--output policy.ckpt is --model_path itself"),
    ("evaluate_policy", ["--model_path", "link_to_policy.ckpt", "--output", "policy.ckpt"], "is --model_path itself"),
    # ---- files that are not checkpoints of this repo ------------------------------------------
    ("evaluate_policy", ["--model_path", "not_a_ckpt.json"], "not_a_ckpt.json is not a checkpoint of this project"),
    ("evaluate_policy", ["--model_path", "notes.txt"], "notes.txt is not a checkpoint of this project"),
    ("evaluate_policy", ["--model_path", "truncated.ckpt"], "truncated.ckpt is not a checkpoint of this project"),
    ("collect_rewards", ["--model_path", "missing.ckpt"], "checkpoint not found at missing.ckpt"),
    # ---- checkpoints of the wrong kind, or that do not fit each other -------------------------
    ("evaluate_policy", ["--model_path", "reward.ckpt"], "reward.ckpt is a 'reward' checkpoint, but a 'policy'"),
    ("collect_rewards", ["--model_path", "reward.ckpt"], "reward.ckpt is a 'reward' checkpoint"),
    ("reward_finetuning", ["--noise_pred_model_path", "policy.ckpt", "--reward_model_path", "policy.ckpt"],
     "policy.ckpt is a 'policy' checkpoint, but a 'reward'"),
    ("reward_finetuning", ["--noise_pred_model_path", "policy.ckpt", "--reward_model_path", "reward_obs12.ckpt"],
     "does not fit the policy policy.ckpt: obs_dim 12 vs 20"),
    # ---- reward data ----------------------------------------------------------------------------
    ("train_reward", ["--action_reward_path", "missing.npy"], "reward data not found at missing.npy"),
    ("train_reward", ["--action_reward_path", "no_sidecar.npy"], "has no layout sidecar"),
    ("train_reward", ["--action_reward_path", "wrong_rows.npy"], "but its sidecar says"),
    ("train_reward", ["--action_reward_path", "nan.npy"], "contains NaN or inf"),
    ("reward_finetuning", FT + ["--action_reward_path", "nan.npy"], "contains NaN or inf"),
    # ---- devices, the dataset, resuming, run directories --------------------------------------
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--device", "cuda"], "--device cuda asked for CUDA"),
    ("train_reward", ["--action_reward_path", "r.npy", "--device", "gpu0"], "is not a device torch knows"),
    ("pretrain_policy", ["--dataset_path", "nowhere.zarr"], "Push-T dataset not found at nowhere.zarr"),
    ("reward_finetuning", FT + ["--resume", "--run_dir", "a_dir"], "cannot resume"),
    ("reward_finetuning", FT + ["--reward_diff"], "unrecognized arguments: --reward_diff"),
    ("train_reward", ["--action_reward_path", "r.npy", "--reward_diff"], "unrecognized arguments: --reward_diff"),
    ("run_pipeline", ["--run_dir", "other_run", "--smoke"], "holds another pipeline run"),
    # ---- a run directory holds one run: an earlier one is continued or discarded, never lost (#24, class 1)
    ("pretrain_policy", ["--preset", "tiny", "--run_dir", "earlier_run"],
     "earlier_run holds an earlier run (metrics.jsonl, latest.ckpt): continue it with --resume, or start over with --force"),
    ("reward_finetuning", FT + ["--run_dir", "earlier_run"], "earlier_run holds an earlier run"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--run_dir", "earlier_run"], "earlier_run holds an earlier run"),
    ("train_reward", ["--action_reward_path", "r.npy", "--run_dir", "earlier_run"], "earlier_run holds an earlier run"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--run_dir", "earlier_run"],
     "earlier_run holds another stage's run (metrics.jsonl, latest.ckpt, a pretrain run)"),
    ("reward_finetuning", FT + ["--run_dir", "a_dir", "--resume"], "cannot resume: a_dir holds no earlier run"),
    # ---- caches reused only when what made them matches (#24, classes 3 and 4) ---------------------
    ("finetune_protocol", ["--name", "tiny", "--model_path", "policy.ckpt", "--seeds", "0", "--num_eval", "2",
                           "--out_dir", "proto", "--results_dir", "proto_results", "--", "--lr", "2e-3"],
     "proto/tiny/seed0.ckpt was made from other inputs or flags (flags: ['--lr', '1e-3', '--tilt_every', '4'] there"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--run_dir", "old_collection", "--resume"],
     "cannot resume old_collection/partial.pt with other settings (saved, now): {'model_sha256'"),
    # ---- seeds by purpose (#24, class 6): a stage keeps to its own start states unless told otherwise
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--start_seed", "200000"],
     "evaluation draws its starts from 100000-199999 or 400000-499999"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--start_seed", "199990", "--num_eps", "20"], "seeds 199990-200009 leave them"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--start_seed", "100000"],
     "reward collection draws its starts from 200000-299999"),
    ("reward_finetuning", FT + ["--start_seed", "100000"], "fine-tuning draws its starts from 300000-399999"),
    # ---- tracebacks that were: each a one-line refusal before any work (#24, class 7) -------------
    ("train_reward", ["--action_reward_path", "empty.npy"], "empty.npy is not a readable .npy file"),
    ("train_reward", ["--action_reward_path", "cut_sidecar.npy"], "sidecar cut_sidecar.json is not valid JSON"),
    ("pretrain_policy", ["--val_ratio", "1"], "argument --val_ratio: must be below 1"),
    ("pretrain_policy", ["--preset", "tiny", "--down_dims", "12", "24"], "every down_dim must be divisible by n_groups=8"),
    ("pretrain_policy", ["--preset", "tiny", "--diffusion_step_embed_dim", "15"], "diffusion_step_embed_dim must be even"),
    ("pretrain_policy", ["--preset", "tiny", "--num_inference_steps", "101"], "num_inference_steps must be in [1, 100]"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--num_inference_steps", "101"],
     "num_inference_steps must be in [1, 100]"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--num_inference_steps", "101"],
     "num_inference_steps must be in [1, 100]"),
    ("evaluate_policy", ["--model_path", "policy.ckpt", "--start_seed", "4294967295"], "must be below 2**32"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--start_seed", "4294967000", "--num_eps", "300"],
     "must be below 2**32"),
    ("run_pipeline", ["--run_dir", "empty_manifest", "--smoke"], "pipeline.json is not valid JSON"),
    ("collect_rewards", ["--model_path", "policy.ckpt", "--run_dir", "cut_partial", "--resume"],
     "partial.pt is not a readable"),
    ("run_pipeline", ["--run_dir", "a_dir", "--smoke"], "is not a pipeline run directory"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_models, pusht_arrays):
    """A directory with good and bad files for the rows to point at (the tiny policy and reward model of conftest)."""
    root = tmp_path_factory.mktemp("bad_input")
    for name in ("policy.ckpt", "reward.ckpt"):
        shutil.copy(tiny_models / name, root / name)
    act_norm = MinMaxNormalizer.fit(pusht_arrays["action"])
    small = RewardModel(RewardModelConfig(obs_dim=12, hidden_dims=(8,)),
                        MinMaxNormalizer(torch.zeros(12), torch.ones(12)), act_norm, 0.5, 0.2)
    save_checkpoint(reward_checkpoint(small), str(root / "reward_obs12.ckpt"))
    residual = ResidualDiffusionPolicy.on(policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy")),
                                          ResidualNetConfig())
    save_checkpoint(policy_checkpoint(residual), str(root / "residual.ckpt"))
    corrected = QAM.make_policy(policy_from_checkpoint(load_checkpoint(str(root / "policy.ckpt"), "policy")),
                                QAMConfig(correction_dims=(8,)))
    save_checkpoint(policy_checkpoint(corrected), str(root / "corrected.ckpt"))
    (root / "truncated.ckpt").write_bytes((root / "policy.ckpt").read_bytes()[:300])
    (root / "not_a_ckpt.json").write_text(json.dumps({"kind": "policy"}))
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "a_file").write_text("in the way\n")
    (root / "a_dir").mkdir()
    (root / "a_dir" / "keep.txt").write_text("x")
    columns = synthetic_columns(n_episodes=3, calls=4)
    save_reward_data(str(root / "r.npy"), columns, META)
    for name in ("no_sidecar", "wrong_rows", "nan"):
        save_reward_data(str(root / f"{name}.npy"), columns, META)
    os.remove(sidecar_path(str(root / "no_sidecar.npy")))
    np.save(root / "wrong_rows.npy", np.load(root / "wrong_rows.npy")[:-1])
    data = np.load(root / "nan.npy")
    data[3, 5] = np.nan
    np.save(root / "nan.npy", data)
    os.symlink(root / "policy.ckpt", root / "link_to_policy.ckpt")
    (root / "empty.npy").write_bytes(b"")  # a zero-byte data file beside a good sidecar
    shutil.copy(root / "r.json", root / "empty.json")
    save_reward_data(str(root / "cut_sidecar.npy"), columns, META)
    (root / "cut_sidecar.json").write_text((root / "cut_sidecar.json").read_text()[:40])
    (root / "empty_manifest").mkdir()
    (root / "empty_manifest" / "pipeline.json").write_text("")
    (root / "cut_partial").mkdir()
    (root / "cut_partial" / "partial.pt").write_bytes(b"PK\x03\x04 cut short")
    shutil.copy(root / "policy.ckpt", root / "policy.json")  # a checkpoint under an unlucky name
    (root / "earlier_run").mkdir()  # an interrupted pre-training: its log and resumable state
    (root / "earlier_run" / "metrics.jsonl").write_text('{"step": 300, "train_loss": 0.05}\n')
    shutil.copy(root / "policy.ckpt", root / "earlier_run" / "latest.ckpt")
    (root / "earlier_run" / "config.json").write_text(json.dumps({"job": "pretrain", "command": "pretrain_policy.py --preset tiny"}))
    (root / "proto" / "tiny").mkdir(parents=True)  # a protocol's cached run, made with --lr 1e-3
    shutil.copy(root / "policy.ckpt", root / "proto" / "tiny" / "seed0.ckpt")
    (root / "proto" / "tiny" / "seed0.ckpt.key.json").write_text(json.dumps(
        {"start": file_digest(str(root / "policy.ckpt")), "flags": ["--lr", "1e-3", "--tilt_every", "4"], "seed": 0}))
    (root / "old_collection").mkdir()  # an interrupted collection, made from a policy file since replaced
    cwd = os.getcwd()
    os.chdir(root)
    args = collect_rewards.parse_args(["--model_path", "policy.ckpt", "--run_dir", "old_collection", "--resume"])
    args.output = os.path.join("data", "reward", "action_reward_data_300eps.npy")  # as main resolves it
    settings = collect_rewards.partial_settings(args)
    os.chdir(cwd)
    with open(root / "old_collection" / "partial.pt", "wb") as f:
        pickle.dump(resumable_state(collect_rewards.PARTIAL_KIND, {**settings, "model_sha256": "0123456789abcdef"},
                                    done=0), f)
    (root / "other_run").mkdir()
    (root / "other_run" / "pipeline.json").write_text(json.dumps({"identity": {"preset": "cpu", "seed": 7}}))
    return root


def tree(root):
    """path -> (size, mtime) of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("script,argv,fragment", CASES, ids=[f"{s}:{' '.join(a)}"[:80] for s, a, _ in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(scratch, dataset_path, script, argv, fragment,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("PUSHT_DATASET", os.path.abspath(dataset_path))
    monkeypatch.chdir(scratch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA row, on any machine
    module = SCRIPTS[script]
    before = tree(scratch)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, lambda: module.parse_args(argv))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert tree(scratch) == before


@pytest.mark.parametrize("argv,fragment", [
    (["evaluate_policy.py", "--model_path", "not_a_ckpt.json"], "is not a checkpoint of this project"),
    (["reward_finetuning.py", "--lr", "-1"], "argument --lr: must be greater than 0"),
])
def test_the_real_command_line_prints_the_same_single_line(scratch, argv, fragment):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = tree(scratch)
    proc = subprocess.run([sys.executable, os.path.join(repo, argv[0]), *argv[1:]], cwd=scratch,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr
    assert tree(scratch) == before


@pytest.mark.parametrize("module", [m for n, m in SCRIPTS.items() if n != "finetune_protocol"],
                         ids=[n for n in SCRIPTS if n != "finetune_protocol"])  # benchmarks: their own test below
def test_every_numeric_flag_is_checked_at_parse_time(module, monkeypatch, capsys):
    """No flag takes a bare int or float: each count refuses one below its minimum, each
    positive value refuses 0, and the table above has rows for every script."""
    parser, _ = script_parser(module, monkeypatch)
    bare = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
    assert bare == []
    checked = 0
    for action in parser._actions:
        name = getattr(action.type, "__name__", "")
        if name.startswith("integer >= "):
            bad = str(int(name.rsplit(" ", 1)[1]) - 1)
        elif name == "positive":
            bad = "0"
        elif name in ("nonnegative", "fraction"):
            bad = "-0.5"
        else:
            continue
        with pytest.raises(SystemExit):
            parser.parse_args([action.option_strings[0], bad])
        assert f"argument {action.option_strings[0]}" in capsys.readouterr().err
        checked += 1
    assert checked >= 2 and module.__name__ in {script for script, _, _ in CASES}


BENCHMARKS = ("env_speed", "eval_speed", "finetune_protocol", "pretrain_sweep", "reward_ceiling", "temperature")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_flags_are_checked_at_parse_time(name, monkeypatch, capsys):
    """The benchmark scripts too take no bare int or float: a count refuses 0 or -1 in one line."""
    import importlib

    parser, _ = script_parser(importlib.import_module(f"benchmarks.{name}"), monkeypatch, required_ok=True)
    capsys.readouterr()  # the usage line of a missing required flag
    assert [a.option_strings[0] for a in parser._actions if a.type is int] == []
    assert [a.option_strings[0] for a in parser._actions if a.type is float] == []
    counts = [a for a in parser._actions if getattr(a.type, "__name__", "").startswith("integer >= ")]
    for action in counts:
        bad = str(int(action.type.__name__.rsplit(" ", 1)[1]) - 1)
        with pytest.raises(SystemExit):
            parser.parse_args([action.option_strings[0], bad])
        assert f"argument {action.option_strings[0]}" in capsys.readouterr().err
    assert counts or name == "pretrain_sweep"
