"""Install the Push-T demonstrations into data/pusht/ and verify them.

Usage:
    python -m diffusion_policy.data.download
    python -m diffusion_policy.data.download --source /path/to/pusht.zip
    python -m diffusion_policy.data.download --source /path/to/pusht_cchi_v7_replay.zarr
    python -m diffusion_policy.data.download --dest data/pusht --force

Without --source it fetches the official pusht.zip of the Diffusion Policy project. The
result is verified (206 episodes, 25,650 steps, the expected arrays) before it is moved into
place, so a broken download never leaves a half-written store behind.
"""

import json
import os
import shutil
import tempfile
import urllib.request
import zipfile

from tqdm import tqdm

from diffusion_policy.common.cli import Parser
from diffusion_policy.data.store import DatasetError, verify_dataset

OFFICIAL_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
STORE_NAME = "pusht_cchi_v7_replay.zarr"


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--source", default=OFFICIAL_URL,
                   help="a URL or local path of pusht.zip, or a local pusht_cchi_v7_replay.zarr directory "
                        "(default: the official download)")
    p.add_argument("--dest", default=os.path.join("data", "pusht"),
                   help="directory that will hold pusht_cchi_v7_replay.zarr (default: data/pusht)")
    p.add_argument("--force", action="store_true", help="replace a store that is already installed and valid")
    return p.parse_args(argv)


def _fetch(url, path):
    with urllib.request.urlopen(url) as response, open(path, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        size = f"{total / 1e6:.1f} MB" if total else "size unknown"
        print(f"downloading {url} ({size})")
        with tqdm(total=total, unit="B", unit_scale=True, desc="download pusht.zip") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _extract_store(zip_path, out_dir):
    """Extract the members under '<anything>/pusht_cchi_v7_replay.zarr/' to out_dir/<store>."""
    with zipfile.ZipFile(zip_path) as zf:
        members = [m for m in zf.namelist() if f"{STORE_NAME}/" in m]
        if not members:
            raise DatasetError(f"{zip_path} holds no {STORE_NAME}/: is it the Push-T pusht.zip?")
        prefix = members[0][: members[0].index(STORE_NAME)]
        for member in tqdm(members, desc="extract", unit="file"):
            if member.endswith("/") or not member.startswith(prefix):
                continue
            target = os.path.join(out_dir, member[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return os.path.join(out_dir, STORE_NAME)


def install(source=OFFICIAL_URL, dest=os.path.join("data", "pusht"), force=False):
    """Install the store from `source` (URL, zip or zarr directory) under `dest`, verified; a
    valid store already there is kept unless `force`. Returns the summary with its path."""
    target = os.path.join(dest, STORE_NAME)
    if os.path.isdir(target) and not force:
        try:
            summary = verify_dataset(target)
            print(f"already installed and valid: {target} ({summary['episodes']} episodes, "
                  f"{summary['steps']} steps); --force replaces it")
            return {**summary, "path": target, "installed": False}
        except DatasetError as e:
            print(f"replacing the invalid store at {target}: {e}")

    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        if os.path.isdir(source):
            staged = os.path.join(tmp, STORE_NAME)
            shutil.copytree(source, staged)
        else:
            if not os.path.isfile(source):  # a URL (http, https, file)
                zip_path = os.path.join(tmp, "pusht.zip")
                try:
                    _fetch(source, zip_path)
                except (OSError, ValueError) as e:
                    raise DatasetError(
                        f"could not download {source} ({e}); fetch pusht.zip elsewhere and run "
                        "'python -m diffusion_policy.data.download --source /path/to/pusht.zip'") from None
                source = zip_path
            staged = _extract_store(source, tmp)
        summary = verify_dataset(staged)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staged, target)
    summary["path"] = target
    print(f"installed {target}: {summary['episodes']} episodes, {summary['steps']} steps")
    print(json.dumps(summary["arrays"]))
    return {**summary, "installed": True}


def main(args):
    return install(args.source, args.dest, args.force)


if __name__ == "__main__":
    main(parse_args())
