"""Measurements too long for the test suite; run each with `python -m benchmarks.<name>`."""
