"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""

import json
import os


def save_result(path, result):
    """Write a benchmark's result dict as JSON (no-op without a path)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
