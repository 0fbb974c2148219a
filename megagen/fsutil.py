"""Filesystem helpers shared by the dataset writer and the checkpoint publisher."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk; best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written in directory `path` (created with its parents if missing), or None.

    It really creates the directory and a probe file: permission bits say nothing of read-only mounts,
    /proc, or a quota, and a run should learn this before it spends time building a model.
    """
    import tempfile

    if not str(path):
        return "the path is empty"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".megagen-write-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def ensure_writable_dir(path: str | os.PathLike, key: str) -> None:
    """`unwritable_reason` as a ConfigError naming config `key`."""
    from megagen.errors import ConfigError

    reason = unwritable_reason(path)
    if reason is not None:
        raise ConfigError(key, f"cannot write {path or repr('')}: {reason}")
