"""Shared fixtures. The real dataset is required: $PUSHT_DATASET, data/pusht/, or fetched on first
use like every script does; tests fail (never skip) when it cannot be had."""

import os

import pytest

from diffusion_policy.data.dataset import DatasetError, load_pusht_arrays, resolve_dataset_path

# SDL must not look for a display when pygame renders.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


@pytest.fixture(scope="session")
def dataset_path():
    try:
        return os.path.abspath(resolve_dataset_path())
    except DatasetError as e:
        pytest.fail(f"the real Push-T dataset is required: {e}")


@pytest.fixture(scope="session")
def pusht_arrays(dataset_path):
    return load_pusht_arrays(dataset_path)


def pytest_sessionfinish(session, exitstatus):
    """Under CI, a skipped test fails the run: every check here must actually run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; every test must run in CI", red=True)
        session.exitstatus = 1
