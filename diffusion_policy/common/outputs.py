"""Outputs and their run directories: what made an output (content digests, records), whether a
cached one may be reused, and who may write a run directory (locks, claims).

An output reused because it *exists* can belong to other inputs (another policy file under the
same name, other flags); one reused because its record of what made it matches cannot. A record
is a small JSON beside the output (<output>.key.json): the sha256 of the input files and the flags.
`hold_lock` makes a second writer of the same directory refuse at once instead of interleaving
(an flock on the directory itself: the kernel releases it when the process ends, however it ends).
"""

import contextlib
import fcntl
import hashlib
import json
import os

from diffusion_policy.common.atomic import atomic_open
from diffusion_policy.common.distributed import is_main_process
from diffusion_policy.common.runtime import UserError


def file_digest(path, full=False):
    """sha256 of a file's bytes (the first 16 hex digits, or all 64 with full): what an input *is*,
    whatever its name. The short form keys cached outputs; results record the full one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


def key_path(output):
    return output + ".key.json"


def record_difference(output, key):
    """None if `output` exists and was made from `key`; else why not, in words."""
    if not os.path.exists(output):
        return "it does not exist"
    if not os.path.exists(key_path(output)):
        return "it has no record of what made it"
    with open(key_path(output)) as f:
        saved = json.load(f)
    if saved == key:
        return None
    differ = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in key.items() if saved.get(k) != v)
    return differ or "its record holds other fields"


def write_record(output, key):
    with atomic_open(key_path(output)) as f:
        json.dump(key, f, indent=2)


@contextlib.contextmanager
def hold_lock(directory, what="run"):
    """Hold an exclusive lock on `directory` itself while the block runs (no lock file is left
    behind), or refuse at once if another process holds it."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing {directory} (it holds its lock): wait for that {what} to "
                            "end, or choose another directory") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


RUN_STATE = ("metrics.jsonl", "latest.ckpt", "latest.pt", "partial.pt", "partial_rank0.pt")


def default_run_dir(output):
    """A stage's run directory when --run_dir is not given: beside its output, named after the whole
    output path (<output without extension>_run), so two outputs never share one."""
    return os.path.splitext(output)[0] + "_run"


def claim_run_dir(run_dir, resume, force):
    """A run directory holds one run: refuse, before any work, to start a new run over an earlier
    one's state (continue it with --resume, or start over with --force, which removes that state)."""
    found = [name for name in RUN_STATE if os.path.exists(os.path.join(run_dir, name))]
    if resume and not found:
        raise UserError(f"cannot resume: {run_dir} holds no earlier run (no {' or '.join(RUN_STATE[1:4])}); run "
                        "without --resume to start")
    if not found or resume:
        return
    if not force:
        raise UserError(f"{run_dir} holds an earlier run ({', '.join(found)}): continue it with --resume, or start "
                        "over with --force (which discards it); or choose another --run_dir")
    for name in found:
        os.remove(os.path.join(run_dir, name))


def claim_evaluation_dir(run_dir):
    """An evaluation's run directory may hold an earlier evaluation (redone: evaluations are cheap and
    write their results atomically), never another stage's run."""
    config = os.path.join(run_dir, "config.json")
    found = [name for name in RUN_STATE if os.path.exists(os.path.join(run_dir, name))]
    if not found:
        return
    job = None
    if os.path.exists(config):
        with open(config) as f:
            job = json.load(f).get("job")  # RunLog's job: pretrain, collect_rewards, finetune, evaluate, ...
    if job != "evaluate":
        raise UserError(f"{run_dir} holds another stage's run ({', '.join(found)}"
                        + (f", a {job} run" if job else "") + "): choose another --run_dir")
    os.remove(os.path.join(run_dir, "metrics.jsonl"))


@contextlib.contextmanager
def run_dir_claimed(run_dir, resume, force, what="run"):
    """Hold the run directory's lock while the block runs, claimed under the lock (so a second
    process's --force cannot discard a running run's state); on the main process only: other ranks of a
    torchrun job write nothing there."""
    if not is_main_process():
        yield
        return
    if not os.path.isdir(run_dir):
        claim_run_dir(run_dir, resume, force)  # nothing there: only --resume is refused, before the lock creates it
    with hold_lock(run_dir, what):
        claim_run_dir(run_dir, resume, force)
        yield
