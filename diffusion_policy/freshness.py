"""What made an output, and whether a cached one may be reused: content digests, records, locks.

An output reused because it *exists* can belong to other inputs (another policy file under the
same name, other flags); one reused because its record of what made it matches cannot. A record
is a small JSON beside the output (<output>.key.json): the sha256 of the input files and the flags.
`hold_lock` makes a second writer of the same directory refuse at once instead of interleaving.
"""

import contextlib
import fcntl
import hashlib
import json
import os

from diffusion_policy.atomic import atomic_open
from diffusion_policy.runtime import UserError


def file_digest(path):
    """sha256 of a file's bytes (the first 16 hex digits): what an input *is*, whatever its name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def key_path(output):
    return output + ".key.json"


def record_difference(output, key):
    """None if `output` exists and was made from `key`; else why not, in words."""
    if not os.path.exists(output):
        return "it does not exist"
    if not os.path.exists(key_path(output)):
        return "it has no record of what made it"
    with open(key_path(output)) as f:
        saved = json.load(f)
    if saved == key:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in key.items() if saved.get(k) != v) \
        or "its record holds other fields"


def write_record(output, key):
    with atomic_open(key_path(output)) as f:
        json.dump(key, f, indent=2)


@contextlib.contextmanager
def hold_lock(directory, what="run"):
    """Hold `directory`/.lock while the block runs, or refuse at once if another process holds it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing {directory} (it holds {directory}/.lock): wait for that "
                            f"{what} to end, or choose another directory") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
