"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""

import json
import os


def save_result(path, result):
    """Write a benchmark's result dict as JSON (no-op without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def add_output_flags(parser, device=True):
    """The flags benchmarks share: --device (where the benchmark runs models) and --json."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
