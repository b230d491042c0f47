"""The demonstration dataset: layout, windows against the raw arrays, split, normaliser."""

import numpy as np
import pytest
import torch

from diffusion_policy.data.dataset import (
    DatasetError,
    PushTLowdimDataset,
    episode_bounds,
    resolve_dataset_path,
    split_episodes,
    window_indices,
)
from diffusion_policy.data.store import verify_dataset
from diffusion_policy.normalizer import MinMaxNormalizer


def test_verify_real_dataset(dataset_path):
    summary = verify_dataset(dataset_path)
    assert summary["episodes"] == 206 and summary["steps"] == 25650
    assert summary["arrays"]["data/keypoint"] == [25650, 9, 2]


def test_obs_layout_is_keypoints_then_agent(pusht_arrays, dataset_path):
    import zarr

    root = zarr.open_group(dataset_path, mode="r")
    rows = slice(1000, 1010)
    np.testing.assert_array_equal(pusht_arrays["obs"][rows, :18], root["data/keypoint"][rows].reshape(10, 18))
    np.testing.assert_array_equal(pusht_arrays["obs"][rows, 18:], root["data/state"][rows][:, :2])
    assert pusht_arrays["obs"].shape == (25650, 20) and pusht_arrays["action"].shape == (25650, 2)


def test_missing_dataset_error_names_path_and_command(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(DatasetError) as err:
        resolve_dataset_path(str(missing))
    assert str(missing) in str(err.value) and "--dataset_path" in str(err.value)


def test_window_counts_cover_every_step(pusht_arrays):
    ends = pusht_arrays["episode_ends"]
    obs_index, action_index = window_indices(ends, np.arange(206), 2, 16, 8)
    assert len(obs_index) == 25650 - 7 * 206  # L - 7 windows per episode
    # the executed part (window positions 1..8) of some window covers every step
    executed = np.unique(action_index[:, 1:9])
    np.testing.assert_array_equal(executed, np.arange(25650))
    # a window never crosses an episode boundary
    episode_of = np.searchsorted(ends, action_index, side="right")
    assert np.all(episode_of == episode_of[:, :1])


def test_window_contents_at_start_middle_and_end_match_raw_arrays(pusht_arrays):
    obs, action = pusht_arrays["obs"], pusht_arrays["action"]
    ep = 7
    start, end = episode_bounds(pusht_arrays["episode_ends"])[ep]
    ds = PushTLowdimDataset(pusht_arrays, [ep])
    raw = lambda item: (ds.obs_normalizer.unnormalize(item["obs"]).numpy(),  # noqa: E731
                        ds.action_normalizer.unnormalize(item["action"]).numpy())
    assert len(ds) == (end - start) - 7

    o, a = raw(ds[0])  # start: one padded observation, one padded action
    np.testing.assert_allclose(o, obs[[start, start]], atol=1e-3)
    np.testing.assert_allclose(a, action[[start] + list(range(start, start + 15))], atol=1e-3)

    o, a = raw(ds[50])  # middle: window starts at step start + 49
    t = start + 49
    np.testing.assert_allclose(o, obs[t:t + 2], atol=1e-3)
    np.testing.assert_allclose(a, action[t:t + 16], atol=1e-3)

    o, a = raw(ds[len(ds) - 1])  # end: last 9 real actions, then the last one repeated 7 times
    np.testing.assert_allclose(o, obs[end - 9:end - 7], atol=1e-3)
    np.testing.assert_allclose(a, action[list(range(end - 9, end)) + [end - 1] * 7], atol=1e-3)

    batch = ds.batch(torch.tensor([0, 50, len(ds) - 1]))
    assert batch["obs"].shape == (3, 2, 20) and batch["action"].shape == (3, 16, 2)
    torch.testing.assert_close(batch["action"][1], ds[50]["action"])


def test_split_is_disjoint_deterministic_and_capped():
    train, val = split_episodes(206, val_ratio=0.05, seed=1)
    assert len(val) == 10 and len(train) == 196 and not set(train) & set(val)
    train2, val2 = split_episodes(206, val_ratio=0.05, seed=1)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    capped, val3 = split_episodes(206, val_ratio=0.05, max_train_episodes=90, seed=1)
    assert len(capped) == 90 and set(capped) <= set(train)
    np.testing.assert_array_equal(val3, val)
    with pytest.raises(ValueError):
        split_episodes(206, val_ratio=1.0)


def test_normaliser_fitted_on_training_episodes(pusht_arrays):
    train, val = split_episodes(206, val_ratio=0.05, seed=0)
    ds = PushTLowdimDataset(pusht_arrays, train)
    rows = np.concatenate([np.arange(s, e) for s, e in episode_bounds(pusht_arrays["episode_ends"])[train]])
    np.testing.assert_allclose(ds.action_normalizer.low.numpy(), pusht_arrays["action"][rows].min(0))
    np.testing.assert_allclose(ds.action_normalizer.high.numpy(), pusht_arrays["action"][rows].max(0))
    every = ds.batch(torch.arange(len(ds)))
    assert every["obs"].min() >= -1 - 1e-6 and every["obs"].max() <= 1 + 1e-6
    assert every["action"].min() >= -1 - 1e-6 and every["action"].max() <= 1 + 1e-6
    # validation windows reuse the training normaliser
    val_ds = PushTLowdimDataset(pusht_arrays, val, obs_normalizer=ds.obs_normalizer,
                                action_normalizer=ds.action_normalizer)
    assert val_ds.obs_normalizer is ds.obs_normalizer


def test_normaliser_round_trip_and_constant_dims():
    data = np.array([[0.0, 5.0, 1.0], [10.0, 5.0, 3.0], [4.0, 5.0, 2.0]])
    norm = MinMaxNormalizer.fit(data)
    x = torch.tensor(data, dtype=torch.float32)
    y = norm.normalize(x)
    torch.testing.assert_close(y[:, 0], torch.tensor([-1.0, 1.0, -0.2]))
    torch.testing.assert_close(y[:, 1], torch.zeros(3))  # constant: centred, not blown up
    torch.testing.assert_close(norm.unnormalize(y), x)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(x.double())), x.double())
    with pytest.raises(ValueError, match="NaN"):
        MinMaxNormalizer.fit(np.array([[np.nan, 1.0]]))
    state = norm.state_dict()
    restored = MinMaxNormalizer(state["low"], state["high"])
    torch.testing.assert_close(restored.normalize(x), y)
