"""The Push-T zarr store: where it lives by default, and the check that it is the real one.

Kept apart from dataset.py (reading windows) and download.py (fetching), which both use it.
"""

import os

import numpy as np

from diffusion_policy.common.runtime import UserError

DEFAULT_DATASET_PATH = os.path.join("data", "pusht", "pusht_cchi_v7_replay.zarr")
DOWNLOAD_HINT = "python -m diffusion_policy.data.download"
EXPECTED_EPISODES = 206
EXPECTED_STEPS = 25650
# array name -> shape after the step axis
EXPECTED_ARRAYS = {
    "data/action": (2,),
    "data/state": (5,),
    "data/keypoint": (9, 2),
    "data/n_contacts": (1,),
    "data/img": (96, 96, 3),
}


class DatasetError(UserError):
    """The Push-T store is missing or not what it should be."""


def open_store(path):
    import zarr  # deferred: only data loading needs it

    try:
        return zarr.open_group(path, mode="r")
    except Exception as e:  # zarr raises several types for a non-store directory
        raise DatasetError(f"{path} is not a readable zarr store ({e}); re-run '{DOWNLOAD_HINT}'") from e


def verify_dataset(path):
    """Check the store's arrays, shapes and counts (metadata only); return a summary dict."""
    root = open_store(path)
    shapes = {}
    for name, tail in EXPECTED_ARRAYS.items():
        try:
            shapes[name] = tuple(root[name].shape)
        except KeyError:
            raise DatasetError(f"{path} has no array '{name}'; re-run '{DOWNLOAD_HINT}'") from None
        if shapes[name][1:] != tail:
            raise DatasetError(f"{path}: '{name}' has shape {shapes[name]}, expected (N, {', '.join(map(str, tail))})")
    ends = np.asarray(root["meta/episode_ends"][:])
    n_steps = shapes["data/action"][0]
    if len(ends) != EXPECTED_EPISODES or n_steps != EXPECTED_STEPS or ends[-1] != n_steps:
        raise DatasetError(
            f"{path}: {len(ends)} episodes / {n_steps} steps (last episode end {ends[-1]}), expected "
            f"{EXPECTED_EPISODES} / {EXPECTED_STEPS}; re-run '{DOWNLOAD_HINT}'"
        )
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise DatasetError(f"{path}: meta/episode_ends is not strictly increasing from above 0 (the store is corrupt); "
                           f"re-run '{DOWNLOAD_HINT}'")
    if any(shape[0] != n_steps for shape in shapes.values()):
        raise DatasetError(f"{path}: arrays disagree on the number of steps: {shapes}")
    return {"path": path, "episodes": len(ends), "steps": n_steps, "arrays": {k: list(v) for k, v in shapes.items()}}
