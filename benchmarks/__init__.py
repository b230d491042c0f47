"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""

import json
import os

from diffusion_policy.common.outputs import file_digest, record_difference, write_record  # noqa: F401 (file_digest: for the scripts)
from diffusion_policy.common.runlog import git_commit, machine
from diffusion_policy.common.runtime import UserError


def save_result(path, result, config):
    """Write a benchmark's result dict as JSON, with what reruns it: the resolved `config`, the git
    commit and the machine (no-op without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        stamped = {**result, "config": config, "git_commit": git_commit(),
                   "machine": result.get("machine") or machine()}
        with open(path, "w") as f:
            json.dump(stamped, f, indent=2)


def refuse_if_stale(out, key):
    """Refuse, naming the difference, a cached `out` that exists but was not made from `key`."""
    differ = record_difference(out, key) if os.path.exists(out) else None
    if differ:
        raise UserError(f"{out} was made from other inputs or flags ({differ}): use another name, or remove it to "
                        "redo it")


def add_output_flags(parser, device=True):
    """The flags benchmarks share: --device (where the benchmark runs models) and --json."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def reuse_or_make(out, key, make):
    """The cached output `out` if it was made from `key` (a dict: the inputs' digests and the flags),
    else refuse naming the difference; made by make() when missing, its key written beside it as
    <out>.key.json (diffusion_policy/common/outputs.py). A cache keyed by name alone would pair results of other inputs under a new label."""
    if os.path.exists(out):
        refuse_if_stale(out, key)
        return out
    result = make()
    write_record(out, key)
    return result
