"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""

import json
import os

from diffusion_policy.runlog import git_commit, machine


def save_result(path, result, config):
    """Write a benchmark's result dict as JSON, with what reruns it: the resolved `config`, the git
    commit and the machine (no-op without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        stamped = {**result, "config": config, "git_commit": git_commit(),
                   "machine": result.get("machine") or machine()}
        with open(path, "w") as f:
            json.dump(stamped, f, indent=2)


def add_output_flags(parser, device=True):
    """The flags benchmarks share: --device (where the benchmark runs models) and --json."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
