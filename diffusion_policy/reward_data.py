"""The reward-data file: a 2-D float64 .npy array, its column layout in a JSON sidecar.

One row per policy call of a rollout. Columns, in order (widths for the 2 / 16 / 8 horizons
and 20-D keypoint observations):

    episode (1)         index of the episode in this collection, 0..N-1
    seed (1)            its start-state seed
    call (1)            index of the policy call within the episode
    branch (1)          0: the chunk the episode executed; 1..M: another chunk sampled from the
                        same window and executed on a copy of the env (collect_rewards.py --branches)
    step (1)            control step at the call (0, 8, 16, ...)
    obs (40)            the raw observation window the policy saw, (obs_horizon, obs_dim) flattened
    action_pred (32)    the whole predicted chunk, raw pixels, (pred_horizon, 2) flattened
    action_exec (16)    the executed actions, raw pixels, (action_horizon, 2) flattened
    reward_before (1)   reward clip(coverage / 0.95, 0, 1) when the call was made
    reward_after (1)    reward after the call's executed actions
    reward_diff (1)     reward_after - reward_before
    return_to_go (1)    sum_{k >= c} gamma^(k - c) reward_after_k over the episode's calls
                        (NaN on branch rows: a branch has no future of its own)
    obs_after (20)      the observation after the executed steps (what the chunk did to the scene;
                        the dynamics-structured reward model learns from it)

The sidecar (`<file>.json`) holds `columns`: name -> [start, stop) and shape, plus units and
provenance. Loading goes through the sidecar, never through fixed column numbers.
"""

import json
import os

import numpy as np

from diffusion_policy.common.atomic import atomic_open, atomic_path

from diffusion_policy.common.runtime import UserError

LAYOUT_VERSION = 3
TARGETS = ("reward_after", "reward_diff", "return_to_go")


class RewardDataError(UserError):
    """A reward-data file that is missing, malformed, or unusable."""


def column_layout(obs_horizon, obs_dim, pred_horizon, action_horizon, action_dim=2):
    """Ordered columns: name -> (shape of one row's entry, unit)."""
    return {
        "episode": ((), "index"),
        "seed": ((), "start-state seed"),
        "call": ((), "index"),
        "branch": ((), "index (0 = executed)"),
        "step": ((), "control steps"),
        "obs": ((obs_horizon, obs_dim), "pixels"),
        "action_pred": ((pred_horizon, action_dim), "pixels"),
        "action_exec": ((action_horizon, action_dim), "pixels"),
        "reward_before": ((), "reward in [0, 1]"),
        "reward_after": ((), "reward in [0, 1]"),
        "reward_diff": ((), "reward change"),
        "return_to_go": ((), "discounted reward sum"),
        "obs_after": ((obs_dim,), "pixels"),
    }


def sidecar_path(npy_path):
    return os.path.splitext(npy_path)[0] + ".json"


def save_reward_data(path, columns, meta):
    """Write rows assembled from `columns` (name -> (rows, *shape) array) and the sidecar.

    `meta` must hold obs_horizon, obs_dim, pred_horizon, action_horizon; it is stored too.
    """
    layout = column_layout(meta["obs_horizon"], meta["obs_dim"], meta["pred_horizon"], meta["action_horizon"])
    n_rows = len(columns["episode"])
    parts, spec, start = [], {}, 0
    for name, (shape, unit) in layout.items():
        values = np.asarray(columns[name], dtype=np.float64).reshape(n_rows, -1)
        width = int(np.prod(shape)) if shape else 1
        if values.shape[1] != width:
            raise ValueError(f"column {name}: expected {width} values per row, got {values.shape[1]}")
        spec[name] = {"start": start, "stop": start + width, "shape": list(shape), "unit": unit}
        parts.append(values)
        start += width
    data = np.concatenate(parts, axis=1)
    # the array under a temporary name, then its sidecar, then the array renamed into place: a write
    # that fails (a full disk) leaves the old pair as it was, never a new array beside an old sidecar
    with atomic_path(path) as data_tmp:
        with open(data_tmp, "wb") as f:
            np.save(f, data)
        with atomic_open(sidecar_path(path)) as f:
            json.dump({"layout_version": LAYOUT_VERSION, "rows": n_rows, "width": start, "columns": spec, **meta}, f,
                      indent=2)
    return data


def load_reward_data(path):
    """(columns: name -> array shaped (rows, *shape), sidecar dict), checked for layout and NaN."""
    if not os.path.isfile(path):
        raise RewardDataError(f"reward data not found at {path}: run collect_rewards.py first "
                              "(python collect_rewards.py --num_eps 300 --model_path <policy.ckpt>)")
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise RewardDataError(f"{path} has no layout sidecar {side}; re-collect it with collect_rewards.py")
    try:
        with open(side) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise RewardDataError(f"{path}: its sidecar {os.path.basename(side)} is not valid JSON ({e.msg} at line "
                              f"{e.lineno}: cut short?); re-collect it with collect_rewards.py") from None
    try:
        data = np.load(path)
    except (ValueError, EOFError, OSError) as e:
        raise RewardDataError(f"{os.path.basename(path)} is not a readable .npy file ({type(e).__name__}: it is empty "
                              f"or cut short); re-collect it with collect_rewards.py") from None
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise RewardDataError(f"{side}: layout_version {meta.get('layout_version')}, expected {LAYOUT_VERSION} "
                              "(an older collection); re-collect it with collect_rewards.py")
    if data.ndim != 2 or data.shape != (meta["rows"], meta["width"]):
        raise RewardDataError(f"{path} has shape {data.shape}, but its sidecar says ({meta['rows']}, {meta['width']})")
    expected = column_layout(meta["obs_horizon"], meta["obs_dim"], meta["pred_horizon"], meta["action_horizon"])
    if list(meta["columns"]) != list(expected):
        raise RewardDataError(f"{side} lists columns {list(meta['columns'])}, expected {list(expected)}")
    finite = np.isfinite(data)
    rtg, branch = meta["columns"]["return_to_go"]["start"], meta["columns"]["branch"]["start"]
    finite[:, rtg] |= np.isnan(data[:, rtg]) & (data[:, branch] > 0)  # branch rows: no return-to-go
    if not np.all(finite):
        bad = sorted({name for name, c in meta["columns"].items()
                      if not np.all(finite[:, c["start"]:c["stop"]])})
        raise RewardDataError(f"{path} contains NaN or inf in columns {bad}; re-collect it")
    columns = {name: data[:, c["start"]:c["stop"]].reshape(len(data), *c["shape"])
               for name, c in meta["columns"].items()}
    return columns, meta


def discounted_return_to_go(rewards, gamma):
    """G_c = sum_{k >= c} gamma^(k - c) r_k along the last axis: (..., C) -> (..., C)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[:-1])
    for c in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., c] + gamma * running
        out[..., c] = running
    return out
