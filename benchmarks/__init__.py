"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""

import json
import os
import subprocess
import sys

import torch

from diffusion_policy.common.atomic import atomic_open
from diffusion_policy.common.outputs import file_digest, key_path, record_difference, write_record  # noqa: F401 (file_digest: for the scripts)
from diffusion_policy.common.runlog import git_commit, machine
from diffusion_policy.common.runtime import UserError


def save_result(path, result, config):
    """Write a benchmark's result dict as JSON, with what reruns it: the resolved `config`, the git
    commit and the machine (no-op without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        stamped = {**result, "config": config, "git_commit": git_commit(),
                   "machine": result.get("machine") or machine()}
        with atomic_open(path) as f:  # a killed process leaves the last whole result, never half of one
            json.dump(stamped, f, indent=2)


def read_json(path, what):
    """A JSON file the benchmarks reuse; one that does not parse (cut short by a full disk or a killed
    process) is refused in one line that names it, never a traceback."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} ({what}) is damaged: it does not parse as JSON ({e}), as a file cut short by a full "
                        "disk or a killed process; restore it (git checkout, for a committed result) or remove it "
                        "to make it again") from None


def damage(out):
    """Why the cached output `out` or its record (<out>.key.json) cannot be read whole, or None: a JSON that
    does not parse, or a checkpoint that does not load (cut short by a full disk or a killed process)."""
    for path in (out, key_path(out)):
        if not os.path.exists(path):
            continue
        if path.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except ValueError as e:
                return f"{path} does not parse as JSON: {e}"
        elif path.endswith(".ckpt"):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 -- whatever torch says of a cut file, it is not whole
                return f"{path} does not load: {str(e).splitlines()[0][:120]}"
    return None


def refuse_if_stale(out, key, remake=False):
    """Refuse, naming the difference, a cached `out` that exists but was not made from `key`. A damaged one
    (`damage`) is never reused: removed, with a line that says so, to be made again where `remake` (an
    evaluation, minutes), else refused in one line that names it (a fine-tuned policy: remade by hand)."""
    if not os.path.exists(out):
        return
    why = damage(out)
    if why and remake:
        print(f"{out} is damaged ({why}): making it again", flush=True)
        for path in (out, key_path(out)):
            if os.path.exists(path):
                os.remove(path)
        return
    if why:
        raise UserError(f"{out} is damaged ({why}): remove it and {key_path(out)} (and its run directory) to make "
                        "it again")
    differ = record_difference(out, key)
    if differ:
        raise UserError(f"{out} was made from other inputs or flags ({differ}): use another name, or remove it to "
                        "redo it")


def add_output_flags(parser, device=True):
    """The flags benchmarks share: --device (where the benchmark runs models) and --json."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def reuse_or_make(out, key, make, remake=False):
    """The cached output `out` if it was made from `key` (a dict: the inputs' digests and the flags),
    else refuse naming the difference; made by make() when missing (or damaged, where `remake`), its key
    written beside it as <out>.key.json (diffusion_policy/common/outputs.py). A cache keyed by name alone
    would pair results of other inputs under a new label."""
    refuse_if_stale(out, key, remake)
    if os.path.exists(out):
        return out
    result = make()
    write_record(out, key)
    return result


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_command(model_path, out, num_eval, start_seed, extra=(), sampling_seed=0):
    """evaluate_policy.py on `num_eval` starts from `start_seed` with sampling seed 0 (every policy
    the benchmarks compare sees the same starts and the same noise; another `sampling_seed` draws the
    policy's noise anew), `extra` flags, to `out`."""
    return [sys.executable, "evaluate_policy.py", "--model_path", model_path, "--num_eps", str(num_eval),
            "--start_seed", str(start_seed), "--seed", str(sampling_seed), *extra, "--output", out]


def run_logged(cmd, log_path, env=None):
    """Run a script's command line in the repo root, its output appended to log_path; fails loudly."""
    with open(log_path, "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)


def evaluation(model_path, out, num_eval, start_seed, extra=(), run=run_logged, sampling_seed=0):
    """The eval.json `out` of `eval_command`, reused if its record (the policy file's sha256 and the
    flags) matches, else made by run(cmd, out + ".log"). Returns out."""
    cmd = eval_command(model_path, out, num_eval, start_seed, extra, sampling_seed)
    reuse_or_make(out, eval_key(model_path, out, num_eval, start_seed, extra, sampling_seed),
                  lambda: run(cmd, out + ".log"), remake=True)
    return out


def eval_key(model_path, out, num_eval, start_seed, extra=(), sampling_seed=0):
    """What an evaluation's cache is keyed by: the policy file's content (not its path) and the flags."""
    return {"model": file_digest(model_path),
            "flags": eval_command(model_path, out, num_eval, start_seed, extra, sampling_seed)[4:-2]}
