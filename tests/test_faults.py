"""Faults of the machine and of files: one line naming the file, what is wrong and what to do.

One table, one row per fault: (name, script, arguments, the fault, a fragment of the message).
A fault of the machine (the disk fills up, a permission is taken away) is injected at the write
itself, after part of the file was written, as the kernel would report it (root ignores file
modes, and this machine offers no small file system to fill). A damaged input is made on disk.
Each row runs the script's entry point as `python <script>.py` does and asserts a non-zero exit,
one stderr line starting "error:" that holds the fragment, no traceback, no temporary file left,
and every file that was there before unchanged (the last good state is kept).
"""

import errno
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import collect_rewards
import evaluate_policy
import pretrain_policy
import reward_finetuning
import run_pipeline
import train_reward
from diffusion_policy.checkpoint import load_checkpoint
from diffusion_policy.common.cli import run_cli
from diffusion_policy.reward_data import save_reward_data
from tests.helpers import META, synthetic_columns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {m.__name__: m for m in (pretrain_policy, collect_rewards, train_reward, reward_finetuning, evaluate_policy,
                                   run_pipeline)}
RESIDUAL = ["--method", "residual", "--num_ft_iters", "3", "--num_eps", "2", "--grad_steps_per_iter", "2",
            "--batch_size", "4", "--buffer_size", "64", "--warmup_iters", "1", "--max_steps", "16",
            "--noise_pred_model_path", "policy.ckpt", "--reward_model_path", "reward.ckpt"]
TRAIN = ["--action_reward_path", "r.npy", "--num_epochs", "2", "--hidden_dims", "8", "--structure", "direct"]


def full():
    return OSError(errno.ENOSPC, "No space left on device")


def failing(monkeypatch, owner, name, n, exc, partial=None):
    """owner.name raises `exc` on its n-th call (after writing `partial` bytes to its target path)."""
    original, calls = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            target = next((a for a in args if isinstance(a, str) and os.path.sep in a), None)
            if partial is not None and target:
                with open(target, "wb") as f:
                    f.write(partial)
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def disk_full_at_torch_save(n):
    return lambda mp: failing(mp, torch, "save", n, full(), partial=b"PK\x03\x04 half a checkpoint")


def disk_full_at_np_save(mp):
    def half(f, arr, *a, **k):
        f.write(b"\x93NUMPY half")
        raise full()

    mp.setattr(np, "save", half)


def disk_full_at_video(mp):
    original = imageio.get_writer

    def writer(path, *a, **k):
        w = original(path, *a, **k)

        class Half:
            def __enter__(self):
                return self

            def append_data(self, frame):
                raise full()

            def __exit__(self, *exc):
                w.close()

        return Half()

    mp.setattr(imageio, "get_writer", writer)


def permission_taken_at_metrics(mp):
    """The run's folder made read-only after the run started: the next metrics line is refused."""
    import builtins

    original = builtins.open

    def guarded(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return original(path, mode, *a, **k)

    mp.setattr(builtins, "open", guarded)


def nothing(mp):
    pass


ROWS = [
    ("disk full at a resumable checkpoint", "reward_finetuning", RESIDUAL + ["--output", "ft.ckpt", "--run_dir", "ft_run"],
     disk_full_at_torch_save(2), "could not write ft_run/latest.ckpt: the disk is full"),
    ("disk full at the reward data", "collect_rewards",
     ["--model_path", "policy.ckpt", "--num_eps", "2", "--max_steps", "16", "--branches", "1", "--output", "c/d.npy"],
     disk_full_at_np_save, "could not write c/d.npy: the disk is full"),
    ("disk full at a video", "evaluate_policy",
     ["--model_path", "policy.ckpt", "--num_eps", "1", "--max_steps", "8", "--save_vids", "--media_dir", "media",
      "--output", "ev/eval.json"], disk_full_at_video, "the disk is full"),
    ("permission taken during a run", "train_reward", TRAIN + ["--output", "tr.ckpt", "--run_dir", "tr_run"],
     permission_taken_at_metrics, "tr_run/metrics.jsonl: permission denied"),
    ("a zarr chunk cut short", "pretrain_policy", ["--preset", "tiny", "--dataset_path", "cut.zarr"],
     nothing, "cut.zarr is damaged: a chunk could not be read"),
    ("reward data cut short", "train_reward", ["--action_reward_path", "cut.npy"], nothing,
     "cut.npy is not a readable .npy file"),
    ("a checkpoint cut short", "reward_finetuning", ["--noise_pred_model_path", "cut.ckpt"], nothing,
     "cut.ckpt is not a checkpoint of this project"),
    ("pipeline.json cut short", "run_pipeline", ["--run_dir", "cut_pipeline", "--smoke"], nothing,
     "pipeline.json is not valid JSON"),
    ("metrics.jsonl damaged inside", "reward_finetuning",
     RESIDUAL + ["--output", "dm.ckpt", "--run_dir", "damaged_run", "--resume"], nothing,
     "damaged_run/metrics.jsonl is damaged at line 1"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_models, dataset_path):
    root = tmp_path_factory.mktemp("faults")
    for name in ("policy.ckpt", "reward.ckpt"):
        shutil.copy(tiny_models / name, root / name)
    save_reward_data(str(root / "r.npy"), synthetic_columns(n_episodes=6, calls=4), META)
    save_reward_data(str(root / "cut.npy"), synthetic_columns(n_episodes=6, calls=4), META)
    data = (root / "cut.npy").read_bytes()
    (root / "cut.npy").write_bytes(data[:len(data) // 2])
    (root / "cut.ckpt").write_bytes((root / "policy.ckpt").read_bytes()[:len((root / "policy.ckpt").read_bytes()) // 2])
    # the real store without its image chunks (their metadata stays: nothing reads them), one state chunk cut
    shutil.copytree(dataset_path, root / "cut.zarr",
                    ignore=lambda d, names: [n for n in names if d.endswith("img") and not n.startswith(".")])
    chunk = root / "cut.zarr" / "data" / "state" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    (root / "cut_pipeline").mkdir()
    (root / "cut_pipeline" / "pipeline.json").write_text('{"identity": {"preset": "smo')
    (root / "damaged_run").mkdir()
    os.chdir(root)
    try:  # an interrupted run whose log got a damaged line
        reward_finetuning.main(reward_finetuning.parse_args(RESIDUAL + ["--output", "dm0.ckpt",
                                                                        "--run_dir", "damaged_run", "--force"]))
    finally:
        os.chdir(tmp_path_factory.getbasetemp())
    (root / "damaged_run" / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2}\n')
    os.remove(root / "dm0.ckpt")
    return root


def tree(root):
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hash(f.read())
    return out


@pytest.mark.parametrize("name,script,argv,fault,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_a_fault_gives_one_line_and_loses_nothing(scratch, dataset_path, name, script, argv, fault, fragment,
                                                  monkeypatch, capsys):
    monkeypatch.setenv("PUSHT_DATASET", os.path.abspath(dataset_path))
    monkeypatch.chdir(scratch)
    before = tree(scratch)
    module = SCRIPTS[script]
    args = module.parse_args(argv)
    with monkeypatch.context() as mp:
        fault(mp)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(module.main, lambda: args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith(("finetune", "rollout"))]
    assert exit_info.value.code not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    after = tree(scratch)
    assert not [p for p in after if ".tmp" in p], "a temporary file was left behind"
    assert {p: h for p, h in after.items() if p in before} == before, "a file that was there changed"
    if name == "disk full at a resumable checkpoint":  # the last good state is kept, and named
        assert "ft_run/latest.ckpt keeps its last good state" in lines[0]
        assert load_checkpoint("ft_run/latest.ckpt", "policy")["train_state"]["iteration"] == 2
        shutil.rmtree("ft_run")
    if name == "disk full at the reward data":  # neither the array nor its sidecar
        assert not os.path.exists("c/d.npy") and not os.path.exists("c/d.json")
        assert "nothing was written to c/d.npy" in lines[0]
    if name == "disk full at a video":
        assert not os.path.isdir("media") or not os.listdir("media")
    for leftover in ("ft_run", "c", "ev", "media", "tr_run", "c_run", "tr.ckpt", "ft.ckpt"):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
        elif os.path.exists(leftover):
            os.remove(leftover)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 300 kB tmpfs mounted at tmp_path/full (as root): a disk that really fills up."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses to mount a small tmpfs ({done.stderr.strip()}): the real full disk "
                    "cannot be made here; the injected row above stands in for it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def run_script(argv, cwd, dataset_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PUSHT_DATASET": os.path.abspath(dataset_path)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_real_full_disk_ends_in_one_line(small_tmpfs, dataset_path, tmp_path):
    """torch.save on a full disk raises RuntimeError ("iostream error", "unexpected pos"), not an OSError:
    the run still ends in the one line of a full disk, in a fresh process, with nothing after it."""
    out = run_script([os.path.join(ROOT, "pretrain_policy.py"), "--preset", "tiny", "--save_every", "20",
                      "--output", str(small_tmpfs / "p.ckpt"), "--run_dir", str(small_tmpfs / "run")],
                     tmp_path, dataset_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode not in (0, None) and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: could not write {small_tmpfs}/run/latest.ckpt: the disk is full"), lines[0]
    assert not [p for p in os.listdir(small_tmpfs / "run") if ".tmp" in p or p.startswith(".probe")]


def test_a_damaged_zarr_chunk_ends_in_one_line_in_a_fresh_process(scratch, dataset_path):
    """zarr's other chunk reads, still in flight when one fails, end quietly: no traceback at exit."""
    out = run_script([os.path.join(ROOT, "pretrain_policy.py"), "--preset", "tiny", "--dataset_path", "cut.zarr",
                      "--output", "never.ckpt", "--run_dir", "never_run"], scratch, dataset_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[:3000]
    assert lines[0].startswith("error: cut.zarr is damaged: a chunk could not be read"), lines[0]
    assert not (scratch / "never.ckpt").exists()


def test_no_zarr_read_is_left_in_flight_after_a_damaged_chunk(scratch):
    """The deterministic half of the row above: zarr reads an array's ~160 chunks as tasks on its own
    loop; right after the damaged one raised, none of the others may still be pending (before, about
    160 were, and those still pending at exit each printed a traceback under the one-line error)."""
    import asyncio

    from zarr.core.sync import sync

    from diffusion_policy.data.dataset import load_pusht_arrays
    from diffusion_policy.data.store import DatasetError

    async def in_flight():
        return sum(1 for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done())

    with pytest.raises(DatasetError, match="a chunk could not be read"):
        load_pusht_arrays(str(scratch / "cut.zarr"))
    assert sync(in_flight()) == 0
