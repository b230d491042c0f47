"""The dataset install command: from a zarr directory, a zip, and a URL; refusals."""

import os
import pathlib
import zipfile

import numpy as np
import pytest

from diffusion_policy.data import download
from diffusion_policy.data.dataset import DatasetError, load_pusht_arrays
from diffusion_policy.data.store import verify_dataset


def _zip_store(store, zip_path):
    """pusht.zip's layout (pusht/<store>/...), without the image chunks to stay small."""
    store = pathlib.Path(store)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(store.rglob("*")):
            rel = path.relative_to(store)
            if path.is_file() and not (rel.parts[:2] == ("data", "img") and not rel.name.startswith(".")):
                zf.write(path, f"pusht/{store.name}/{rel.as_posix()}")


def _install(source, dest, force=False):
    return download.main(download.parse_args(["--source", str(source), "--dest", str(dest)] + ["--force"] * force))


def test_install_from_zarr_directory_then_skip(dataset_path, tmp_path, capsys):
    out = _install(dataset_path, tmp_path / "pusht")
    assert out["installed"] and out["episodes"] == 206 and out["steps"] == 25650
    installed = load_pusht_arrays(out["path"])
    np.testing.assert_array_equal(installed["action"], load_pusht_arrays(dataset_path)["action"])
    again = _install(dataset_path, tmp_path / "pusht")
    assert not again["installed"] and "already installed" in capsys.readouterr().out
    assert _install(dataset_path, tmp_path / "pusht", force=True)["installed"]


def test_install_from_zip_file_and_file_url(dataset_path, tmp_path):
    zip_path = tmp_path / "pusht.zip"
    _zip_store(dataset_path, zip_path)
    out = _install(zip_path, tmp_path / "a")
    assert out["installed"] and out["episodes"] == 206
    out = _install(zip_path.as_uri(), tmp_path / "b")  # the download path, via file://
    assert out["installed"] and os.path.isdir(out["path"])
    assert not [p for p in os.listdir(tmp_path / "b") if p.startswith(".download-")]


def test_zip_without_the_store_is_refused(tmp_path):
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("something/else.txt", "hello")
    with pytest.raises(DatasetError, match="pusht_cchi_v7_replay.zarr"):
        _install(bad, tmp_path / "dest")
    assert not (tmp_path / "dest" / download.STORE_NAME).exists()


def test_store_with_wrong_counts_is_refused(tmp_path):
    import zarr

    fake = tmp_path / "fake" / download.STORE_NAME
    root = zarr.open_group(str(fake), mode="w", zarr_format=2)
    for name, tail in {"action": (2,), "state": (5,), "keypoint": (9, 2), "n_contacts": (1,), "img": (96, 96, 3)}.items():
        root.create_array(f"data/{name}", shape=(30, *tail), dtype="f4")
    root.create_array("meta/episode_ends", shape=(2,), dtype="i8")[:] = [10, 30]
    with pytest.raises(DatasetError, match="2 episodes / 30 steps"):
        _install(fake, tmp_path / "dest")


def test_unreachable_url_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="--source /path/to/pusht.zip"):
        _install((tmp_path / "missing.zip").as_uri(), tmp_path / "dest")


def test_scripts_fetch_the_dataset_on_first_use(dataset_path, tmp_path, monkeypatch, capsys):
    """Neither --dataset_path, $PUSHT_DATASET nor data/pusht/: the store is fetched (here from a
    local zip through a file:// URL, offline), verified and installed at the default path, once."""
    from diffusion_policy.data.dataset import DEFAULT_DATASET_PATH, resolve_dataset_path

    zip_path = tmp_path / "pusht.zip"
    _zip_store(dataset_path, zip_path)
    work = tmp_path / "fresh_clone"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PUSHT_DATASET", raising=False)
    monkeypatch.setenv("PUSHT_SOURCE", zip_path.as_uri())
    path = resolve_dataset_path("./data/pusht/pusht_cchi_v7_replay.zarr")  # the scripts' default
    out = capsys.readouterr()
    assert os.path.samefile(path, work / DEFAULT_DATASET_PATH)
    assert "fetching it once" in out.out and f"({zip_path.stat().st_size / 1e6:.1f} MB)" in out.out
    assert "download pusht.zip" in out.err  # the progress bar
    np.testing.assert_array_equal(load_pusht_arrays(path)["action"], load_pusht_arrays(dataset_path)["action"])
    zip_path.unlink()  # a second use finds the installed store and fetches nothing
    assert resolve_dataset_path() == DEFAULT_DATASET_PATH and "fetching" not in capsys.readouterr().out


def test_fetch_on_first_use_without_network_says_what_to_do(tmp_path, monkeypatch):
    from diffusion_policy.data.dataset import resolve_dataset_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PUSHT_DATASET", raising=False)
    monkeypatch.setenv("PUSHT_SOURCE", (tmp_path / "unreachable.zip").as_uri())
    with pytest.raises(DatasetError, match="--source /path/to/pusht.zip"):
        resolve_dataset_path()
    assert not (tmp_path / "data" / "pusht" / download.STORE_NAME).exists()


def fake_store(path, episode_ends):
    """A zarr store with the real store's arrays and shapes (nothing written but the episode ends)."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    n = 25650
    for name, tail in (("action", (2,)), ("state", (5,)), ("keypoint", (9, 2)), ("n_contacts", (1,)),
                       ("img", (96, 96, 3))):
        root.create_array(f"data/{name}", shape=(n, *tail), dtype="float32", chunks=(4096, *tail))
    root.create_array("meta/episode_ends", shape=(len(episode_ends),), dtype="int64")[:] = episode_ends
    return str(path)


def test_a_store_with_corrupt_episode_ends_is_refused_when_loaded(pusht_arrays, tmp_path):
    ends = pusht_arrays["episode_ends"].copy()
    fake_store(tmp_path / "good.zarr", ends)
    verify_dataset(str(tmp_path / "good.zarr"))  # the fake itself passes: only the corruption is refused
    ends[[10, 11]] = ends[[11, 10]]  # two episodes' ends swapped: the counts still match
    with pytest.raises(DatasetError, match="episode_ends is not strictly increasing"):
        load_pusht_arrays(fake_store(tmp_path / "bad.zarr", ends))


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_pusht_dataset_that_is_not_a_store_is_an_error_naming_the_variable(tmp_path, monkeypatch, kind):
    from diffusion_policy.data.dataset import resolve_dataset_path

    target = tmp_path / "nowhere"
    if kind == "a file":
        target.write_text("not a store")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PUSHT_DATASET", str(target))
    monkeypatch.setenv("PUSHT_SOURCE", (tmp_path / "must_not_be_fetched.zip").as_uri())
    with pytest.raises(DatasetError, match=r"\$PUSHT_DATASET is .*nowhere, which is not a directory"):
        resolve_dataset_path()
    assert not (tmp_path / "data").exists()  # nothing fetched or installed


def test_the_suite_without_the_dataset_or_a_network_stops_once_in_one_line(tmp_path):
    """A new user's first `python -m pytest -q` on a machine that cannot fetch the dataset: no test runs,
    and the run says once how to point PUSHT_DATASET at a copy (not an error and a traceback per test).
    The fetch really fails: its source is a closed port on this machine."""
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PUSHT_DATASET"}
    env.update(PUSHT_SOURCE="http://127.0.0.1:9/pusht.zip", PYTHONPATH=str(repo))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(repo / "pytest.ini"),
                          "--rootdir", str(repo), str(repo / "tests")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    out = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 4, out[-5:]
    said = [line for line in out if "PUSHT_DATASET" in line]
    assert len(said) == 1 and "PUSHT_DATASET=/path/to/pusht_cchi_v7_replay.zarr python -m pytest -q" in said[0]
    assert "Connection refused" in said[0]  # the machine's own fault, named
    assert len(out) <= 3 and not any("Traceback" in line or "Error" in line.split(":")[0] for line in out)
    assert "no tests ran" in run.stdout
