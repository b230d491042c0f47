"""Shared fixtures. The real dataset is required: tests fail (never skip) without it."""

import os

import pytest

from diffusion_policy.data.dataset import DEFAULT_DATASET_PATH, DOWNLOAD_HINT, load_pusht_arrays

# SDL must not look for a display when pygame renders.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


@pytest.fixture(scope="session")
def dataset_path():
    path = os.environ.get("PUSHT_DATASET", DEFAULT_DATASET_PATH)
    if not os.path.isdir(path):
        pytest.fail(
            f"the real Push-T dataset is required at {path}: run '{DOWNLOAD_HINT}' "
            "(here: --source ../shared/data/pusht/pusht_cchi_v7_replay.zarr) or set PUSHT_DATASET"
        )
    return path


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
