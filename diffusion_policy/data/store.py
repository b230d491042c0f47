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


def drain_pending_reads():
    """Cancel the chunk reads zarr still has in flight after one of them failed.

    zarr 3 reads an array's chunks as concurrent tasks on its own event loop; when one chunk cannot
    be decoded the read raises at once and the others stay pending, to fail at interpreter exit
    ("cannot schedule new futures after shutdown"), each printing a traceback under the one-line
    error. Cancelled and awaited here, they end quietly."""
    import asyncio

    try:
        from zarr.core.sync import sync
    except ImportError:  # another zarr: nothing of this kind to drain
        return

    async def cancel_others():
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    sync(cancel_others())


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
    try:
        ends = np.asarray(root["meta/episode_ends"][:])
    except Exception as e:  # a chunk cut short or overwritten
        drain_pending_reads()
        raise DatasetError(f"{path} is damaged: meta/episode_ends could not be read ({type(e).__name__}: {e}); "
                           f"re-run '{DOWNLOAD_HINT}'") from None
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
