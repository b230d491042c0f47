"""Atomic outputs: a file is written under a temporary name and renamed into place, so an
interrupted stage leaves either the old file or the new one, never half of one.

A write the machine refuses (a full disk, a permission taken away during the run, a read-only
or failing disk) raises `StorageError` (also where the writer, like torch.save, reports it as a
RuntimeError: the disk is then asked by a small write of its own), one line naming the file, what went wrong, that the file
keeps its last good state (or that nothing was written there), and what to do.
"""

import contextlib
import errno
import os

from diffusion_policy.common.runtime import UserError

# faults of the machine, not of the code: reported in one line wherever they surface
MACHINE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only", errno.EIO: "the disk reported an I/O error"}


class StorageError(UserError):
    """A file that could not be written because of the machine (space, permissions, the disk)."""


def what_to_do(err):
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there and run the same command again (with --resume where the stage has it)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make that folder writable (or choose another output) and run the same command again"
    return "check the disk, then run the same command again"


def storage_error(err, path):
    """The one-line StorageError for an OSError `err` met while writing `path`."""
    kept = f"{path} keeps its last good state" if os.path.exists(path) else f"nothing was written to {path}"
    why = MACHINE_ERRNOS.get(err.errno, err.strerror or str(err))
    return StorageError(f"could not write {path}: {why} ({err.strerror or err}); {kept}; {what_to_do(err)}")


@contextlib.contextmanager
def storage_errors(path):
    """While the block writes `path`, an OSError of the machine (MACHINE_ERRNOS) becomes a StorageError."""
    try:
        yield
    except OSError as e:
        if e.errno in MACHINE_ERRNOS:
            raise storage_error(e, path) from None
        raise


def probe_disk(directory, size=65536):
    """The OSError the machine raises for a small write in `directory` now (None if it takes it): what
    a writer that reports its failures without an errno, such as torch.save's, ran into."""
    probe = os.path.join(directory, f".probe{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = size
            while left > 0:  # a nearly full disk takes part of a write, then refuses the rest
                written = os.write(fd, b"\0" * left)
                if written == 0:
                    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                left -= written
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension, for writers that look at it); on
    success it replaces `path`, on any failure or interruption it is removed. An OSError of the
    machine while writing (MACHINE_ERRNOS) becomes a StorageError naming `path`."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        with storage_errors(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            try:
                yield tmp
            except RuntimeError:  # torch.save's writer reports a failed write so ("iostream error", "unexpected pos")
                err = probe_disk(os.path.dirname(os.path.abspath(path)))
                if err is not None and err.errno in MACHINE_ERRNOS:
                    raise storage_error(err, path) from None
                raise
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """open(path, mode) that lands atomically."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
