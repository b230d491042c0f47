"""Atomic outputs: a file is written under a temporary name and renamed into place, so an
interrupted stage leaves either the old file or the new one, never half of one."""

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension, for writers that look at it); on
    success it replaces `path`, on any failure or interruption it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """open(path, mode) that lands atomically."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
