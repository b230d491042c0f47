"""Two processes with the gloo backend, as torchrun would start them: the ranks stay in sync and
the DDP update equals the single-process one on the same global batch."""

import json
import os
import socket
import traceback

import pytest

import torch
import torch.multiprocessing as mp

import collect_rewards
import evaluate_policy
import pretrain_policy
import reward_finetuning
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.distributed import Dist
from diffusion_policy.reward_data import load_reward_data
from tests.test_finetune import ft_argv

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, jobs, out_dir):
    """Run each job's main in turn on this rank (each joins and leaves its own process group, on its
    own port); a failing job leaves its traceback in its result file and the next one still runs."""
    torch.set_num_threads(1)
    modules = {"pretrain": pretrain_policy, "finetune": reward_finetuning, "evaluate": evaluate_policy,
               "collect": collect_rewards}
    for script, argv, port in jobs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(WORLD))
        try:
            module = modules[script]
            result = module.main(module.parse_args(argv))
            keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        except BaseException:  # noqa: BLE001 -- reported by the test that reads this job
            keep = {"error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"{script}_rank{rank}.json"), "w") as f:
            json.dump(keep, f)


def launch(jobs, out_dir):
    """Run every (script, argv) job in WORLD spawned processes, one spawn for all of them (each spawn
    pays for importing torch and the scripts); returns script -> each rank's JSON-able result."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(script, argv, free_port()) for script, argv in jobs]
    mp.start_processes(_worker, args=(jobs, str(out_dir)), nprocs=WORLD, join=True, start_method="spawn")
    return {script: [json.load(open(os.path.join(out_dir, f"{script}_rank{r}.json"))) for r in range(WORLD)]
            for script, *_ in jobs}


def pretrain_argv(dataset_path, tmp, name):
    return ["--preset", "tiny", "--num_steps", "4", "--batch_size", "16", "--log_every", "1", "--save_every", "2",
            "--dataset_path", dataset_path, "--output", str(tmp / f"{name}.ckpt"), "--run_dir", str(tmp / name)]


@pytest.fixture(scope="module")
def ranks(dataset_path, tiny_models, tmp_path_factory):
    """Pre-training, fine-tuning, evaluation and collection, each in two ranks, from one spawn."""
    tmp, policy = tmp_path_factory.mktemp("ranks"), str(tiny_models / "policy.ckpt")
    jobs = [
        ("pretrain", pretrain_argv(dataset_path, tmp, "ddp")),
        ("finetune", ft_argv(tiny_models, "--run_dir", str(tmp / "run"), "--output", str(tmp / "ft.ckpt"))),
        ("evaluate", ["--model_path", policy, "--num_eps", "3", "--max_steps", "16", "--output", str(tmp / "eval.json")]),
        ("collect", ["--model_path", policy, "--num_eps", "3", "--max_steps", "16", "--branches", "1",
                     "--output", str(tmp / "r.npy"), "--run_dir", str(tmp / "c")]),
    ]
    return tmp, launch(jobs, tmp / "results")


def finished(ranks, script):
    """Both ranks' results of one job, failing the test with the job's traceback if it raised."""
    results = ranks[1][script]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_shard_splits_items_contiguously_and_completely():
    items = list(range(7))
    shares = [Dist(rank=r, world_size=3).shard(items) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert Dist().shard(items) == items


def test_ddp_pretraining_matches_one_process_on_the_same_global_batch(dataset_path, ranks, tmp_path):
    tmp, ddp = ranks[0], finished(ranks, "pretrain")
    single = pretrain_policy.main(pretrain_policy.parse_args(pretrain_argv(dataset_path, tmp_path, "single")))
    assert [r["world_size"] for r in ddp] == [2, 2]
    # in sync: bit-identical parameters on both ranks after the steps
    assert ddp[0]["params_sha256"] == ddp[1]["params_sha256"]
    # the same losses step by step (the rank mean of half-batch losses = the full-batch loss)
    losses = {}
    for name, run_dir in (("single", tmp_path / "single"), ("ddp", tmp / "ddp")):
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        losses[name] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses["ddp"]) == 4
    torch.testing.assert_close(torch.tensor(losses["ddp"]), torch.tensor(losses["single"]), rtol=1e-5, atol=1e-6)
    # and the same weights, in the same checkpoint format (rank 0 alone wrote it)
    a, b = load_checkpoint(str(tmp_path / "single.ckpt"), "policy"), load_checkpoint(str(tmp / "ddp.ckpt"), "policy")
    assert a.keys() == b.keys()
    for key in ("model_state_dict", "ema_model_state_dict"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5)
    assert single["world_size"] == 1
    assert not os.path.exists(tmp / "results" / "latest.ckpt")


def test_ddp_finetuning_keeps_ranks_in_sync_and_writes_one_checkpoint(ranks):
    tmp, result = ranks[0], finished(ranks, "finetune")
    assert result[0]["params_sha256"] == result[1]["params_sha256"]
    ckpt = load_checkpoint(str(tmp / "ft.ckpt"), "policy")
    assert ckpt["provenance"]["world_size"] == 2
    rows = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 2 and all(r["num_trajectories"] > 0 for r in trained)
    latest = load_checkpoint(str(tmp / "run" / "latest.ckpt"), "policy")
    assert len(latest["train_state"]["generators"]) == 2


def test_evaluation_and_collection_spread_over_processes(ranks):
    tmp = ranks[0]
    finished(ranks, "evaluate")
    episodes = json.load(open(tmp / "eval.json"))["episodes"]
    assert [e["seed"] for e in episodes] == [100000, 100001, 100002]  # rank 0 took 2, rank 1 took 1

    finished(ranks, "collect")
    cols, meta = load_reward_data(str(tmp / "r.npy"))
    main = cols["branch"] == 0
    assert sorted(set(cols["seed"][main].astype(int))) == [200000, 200001, 200002]
    assert cols["episode"][main].tolist() == sorted(cols["episode"][main].tolist())
    assert (cols["episode"][main] == cols["seed"][main] - 200000).all()
