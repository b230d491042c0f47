"""The Push-T demonstrations: reading the zarr store, episode splits, and training windows.

The store (zarr v2, read with zarr 3) holds 206 episodes, 25,650 steps:
    data/state      (N, 5)     agent x, y, block x, y, block angle
    data/keypoint   (N, 9, 2)  block keypoints in pixels
    data/action     (N, 2)     commanded agent position in pixels
    data/n_contacts (N, 1)
    data/img        (N, 96, 96, 3)  never read here: low-dim work does not need its 2.8 GB
    meta/episode_ends (206,)   exclusive end index of each episode

A training sample is a window of `pred_horizon` consecutive steps of one episode; its first
`obs_horizon` observations condition the policy and all of its actions are the target.
Windows run past the episode's edges by `obs_horizon - 1` steps before and
`action_horizon - 1` after, padded by repeating the edge frame:

    episode:      |s0 s1 s2 ...                       ... s(L-1)|
    first window: [s0 s0 s1 ... s14]        (obs = s0 s0: the start padded once)
    last window:          [s(L-9) ... s(L-1) s(L-1) x7]  (executed actions all real)

so every step of every episode falls inside the executed part (`obs_horizon - 1` to
`obs_horizon - 1 + action_horizon`) of some window: L - 7 windows for an episode of L steps
with the 2 / 16 / 8 horizons.
"""

import os

import numpy as np
import torch

from diffusion_policy.data import download
from diffusion_policy.data.store import (DEFAULT_DATASET_PATH, DOWNLOAD_HINT, DatasetError, drain_pending_reads, open_store,
                                         verify_dataset)
from diffusion_policy.normalizer import MinMaxNormalizer

def resolve_dataset_path(path=None):
    """The store to read, fetched on first use.

    An explicit path other than the default must exist. Otherwise $PUSHT_DATASET, if set, must be
    a directory; else data/pusht/pusht_cchi_v7_replay.zarr is used, and if it does not exist the
    store is downloaded from $PUSHT_SOURCE (default: the official pusht.zip), verified and
    installed at the default path, as `python -m diffusion_policy.data.download` does."""
    default = os.path.normpath(DEFAULT_DATASET_PATH)
    if path and os.path.normpath(path) != default:
        if not os.path.isdir(path):
            raise DatasetError(
                f"Push-T dataset not found at {path}: check --dataset_path, or leave it out to use "
                f"$PUSHT_DATASET or {DEFAULT_DATASET_PATH} (fetched on first use)")
        return path
    env_path = os.environ.get("PUSHT_DATASET")
    if env_path:
        if not os.path.isdir(env_path):
            raise DatasetError(f"$PUSHT_DATASET is {env_path}, which is not a directory (a Push-T zarr store): "
                               "point it at pusht_cchi_v7_replay.zarr, or unset it to use "
                               f"{DEFAULT_DATASET_PATH} (fetched on first use)")
        return env_path
    if os.path.isdir(DEFAULT_DATASET_PATH):
        return DEFAULT_DATASET_PATH
    source = os.environ.get("PUSHT_SOURCE") or download.OFFICIAL_URL
    print(f"Push-T dataset not found at {DEFAULT_DATASET_PATH} (nor $PUSHT_DATASET): fetching it once from "
          f"{source}; offline, run '{DOWNLOAD_HINT} --source /path/to/pusht.zip' instead")
    return download.install(source, os.path.dirname(DEFAULT_DATASET_PATH))["path"]


def load_pusht_arrays(path):
    """The low-dim arrays of the store, as numpy (the image array is never read).

    Returns a dict: obs (N, 20) float32 = keypoints (9 x 2, flattened) then agent (x, y);
    state (N, 5), action (N, 2), n_contacts (N,) float32; episode_ends (E,) int64.
    """
    verify_dataset(path)  # counts, shapes and episode ends, before anything trains on it
    root = open_store(path)
    try:
        state = np.asarray(root["data/state"][:], dtype=np.float32)
        keypoint = np.asarray(root["data/keypoint"][:], dtype=np.float32)
        action = np.asarray(root["data/action"][:], dtype=np.float32)
        n_contacts = np.asarray(root["data/n_contacts"][:], dtype=np.float32).reshape(-1)
        ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
    except KeyError as e:
        raise DatasetError(f"{path} lacks array {e}; re-run '{DOWNLOAD_HINT}'") from None
    except Exception as e:  # a chunk cut short or overwritten: the codec or zarr raises, by version
        drain_pending_reads()
        raise DatasetError(f"{path} is damaged: a chunk could not be read ({type(e).__name__}: {e}); "
                           f"re-run '{DOWNLOAD_HINT}'") from None
    obs = np.concatenate([keypoint.reshape(len(keypoint), -1), state[:, :2]], axis=1)
    return {"obs": obs, "state": state, "action": action, "n_contacts": n_contacts, "episode_ends": ends}


def episode_bounds(episode_ends):
    """(start, end) of every episode, end exclusive: (E, 2) int64."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    return np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1)


def split_episodes(n_episodes, val_ratio=0.05, max_train_episodes=None, seed=42):
    """Episode-level split: (train_ids, val_ids), each sorted.

    `val_ratio` of the episodes (at least one if val_ratio > 0) are held out; of the rest,
    `max_train_episodes` are kept (the paper trains on 90), drawn with `seed`.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_episodes)
    n_val = 0 if val_ratio == 0 else max(1, int(round(n_episodes * val_ratio)))
    val, train = order[:n_val], order[n_val:]
    if max_train_episodes is not None:
        if max_train_episodes < 1:
            raise ValueError(f"max_train_episodes must be at least 1, got {max_train_episodes}")
        train = train[:max_train_episodes]
    return np.sort(train), np.sort(val)


def window_indices(episode_ends, episode_ids, obs_horizon=2, pred_horizon=16, action_horizon=8):
    """Row indices of every training window of the chosen episodes.

    Returns (obs_index (S, obs_horizon), action_index (S, pred_horizon)) int64, rows into
    the step arrays; indices past an episode's edge are clamped to its first/last step.
    """
    if not 1 <= obs_horizon <= pred_horizon or not 1 <= action_horizon <= pred_horizon - obs_horizon + 1:
        raise ValueError(
            f"need 1 <= obs_horizon <= pred_horizon and 1 <= action_horizon <= pred_horizon - obs_horizon + 1,"
            f" got {obs_horizon} / {pred_horizon} / {action_horizon}"
        )
    bounds = episode_bounds(episode_ends)[np.asarray(episode_ids, dtype=np.int64)]
    offsets = np.arange(pred_horizon)
    windows = []
    for start, end in bounds:
        first = start - (obs_horizon - 1)
        last = end - pred_horizon + (action_horizon - 1)  # inclusive
        if last < first:
            continue  # an episode shorter than one window's real part
        window_starts = np.arange(first, last + 1)
        windows.append(np.clip(window_starts[:, None] + offsets, start, end - 1))
    rows = np.concatenate(windows) if windows else np.zeros((0, pred_horizon), dtype=np.int64)
    return rows[:, :obs_horizon].copy(), rows


class PushTLowdimDataset(torch.utils.data.Dataset):
    """Normalised training windows of chosen episodes.

    Item i: {"obs": (obs_horizon, 20), "action": (pred_horizon, 2)} float32 in [-1, 1]
    (normalisers fitted on these episodes unless given). `batch(idx)` gathers many at once,
    which is what the training loop uses: the whole low-dim dataset fits in memory.
    """

    def __init__(self, arrays, episode_ids, obs_horizon=2, pred_horizon=16, action_horizon=8,
                 obs_normalizer=None, action_normalizer=None):
        self.episode_ids = np.asarray(episode_ids, dtype=np.int64)
        obs_index, action_index = window_indices(
            arrays["episode_ends"], self.episode_ids, obs_horizon, pred_horizon, action_horizon)
        rows = np.concatenate([np.arange(s, e) for s, e in episode_bounds(arrays["episode_ends"])[self.episode_ids]])
        self.obs_normalizer = obs_normalizer or MinMaxNormalizer.fit(arrays["obs"][rows])
        self.action_normalizer = action_normalizer or MinMaxNormalizer.fit(arrays["action"][rows])
        with torch.no_grad():
            self._obs = self.obs_normalizer.normalize(torch.from_numpy(arrays["obs"]))
            self._action = self.action_normalizer.normalize(torch.from_numpy(arrays["action"]))
        self.obs_index = torch.from_numpy(obs_index)
        self.action_index = torch.from_numpy(action_index)

    def __len__(self):
        return len(self.obs_index)

    def __getitem__(self, i):
        return {"obs": self._obs[self.obs_index[i]], "action": self._action[self.action_index[i]]}

    def batch(self, idx):
        """Windows `idx` (B,) -> {"obs": (B, obs_horizon, 20), "action": (B, pred_horizon, 2)}."""
        return {"obs": self._obs[self.obs_index[idx]], "action": self._action[self.action_index[idx]]}
