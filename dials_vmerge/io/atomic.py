"""Atomic output: write to a temporary file in the target directory, rename on success.

An interrupted run therefore never leaves a half-written file, and writing over an input of
the same name only replaces it once the new content is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def _temp_path_beside(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".part", dir=directory
    )
    os.close(fd)
    return temp


@contextlib.contextmanager
def atomic_output_path(path: str):
    """Yield a temporary path; it replaces `path` if the block succeeds, else is removed."""
    temp = _temp_path_beside(path)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file for writing; it replaces `path` only if the block succeeds."""
    with atomic_output_path(path) as temp:
        encoding = None if "b" in mode else "utf-8"
        with open(temp, mode, encoding=encoding) as f:
            yield f
