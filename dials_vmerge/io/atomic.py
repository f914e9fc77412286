"""Atomic output: write to a temporary file in the target directory, rename on success.

An interrupted run therefore never leaves a half-written file, and writing over an input of
the same name only replaces it once the new content is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def _temp_path_beside(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    # MPI ranks other than 0 compute the same outputs but never publish them
    directory = _private_output_dir() or directory
    fd, temp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".part", dir=directory
    )
    os.close(fd)
    return temp


def _replace(temp: str, path: str) -> None:
    """Flush `temp` to disk, give it a plain open()'s mode (mkstemp makes 0600) and rename."""
    from ..backends.mpi_world import agree_to_publish

    agree_to_publish()  # under MPI: only once no rank has failed
    private = _private_output_dir()
    if private is not None and os.path.dirname(os.path.abspath(path)) != private:
        os.unlink(temp)
        return
    with open(temp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    os.replace(temp, path)


def _private_output_dir():
    """Under MPI, on ranks other than 0: where their outputs go (never published)."""
    from ..backends.mpi_world import private_output_dir

    return private_output_dir()


@contextlib.contextmanager
def atomic_output_path(path: str):
    """Yield a temporary path; it replaces `path` if the block succeeds, else is removed."""
    temp = _temp_path_beside(path)
    try:
        yield temp
        _replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def streamed_output_path(path: str):
    """Yield a path to write while the run goes (the log): a file in the system's temporary
    directory, not beside the outputs, so that a run killed outright (SIGKILL; under MPI the
    launcher kills every rank so when one dies) leaves nothing where the outputs go. When the
    block succeeds its content becomes `path` atomically; the temporary file always goes."""
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part")
    os.close(fd)
    try:
        yield temp
        with atomic_output_path(path) as final:
            shutil.copyfile(temp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class StagedOutputs:
    """Outputs written early under temporary names and renamed only when the whole job has
    succeeded (on leaving the `with` block without an exception; otherwise removed).

    dials.vmerge writes scaled.refl before merging so that the scaled table need not stay in
    memory while merging runs, yet a failure in merging still leaves no new scaled files.
    """

    def __init__(self):
        self._pending = []  # (temporary path, final path)

    def path_for(self, path: str) -> str:
        temp = _temp_path_beside(path)
        self._pending.append((temp, path))
        return temp

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pending, self._pending = self._pending, []
        if exc_type is None:
            for temp, path in pending:
                _replace(temp, path)
            return
        for temp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file for writing; it replaces `path` only if the block succeeds."""
    with atomic_output_path(path) as temp:
        encoding = None if "b" in mode else "utf-8"
        with open(temp, mode, encoding=encoding) as f:
            yield f


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C and SIGTERM while native library code runs (gemmi's MTZ I/O).

    gemmi's bindings check Python's pending signals and turn a KeyboardInterrupt raised
    inside C++ into std::terminate: the run aborts with a C++ message instead of stopping
    cleanly. Python-level handlers are swapped for a recorder here and the first signal
    received is re-delivered to the original handler once the native call has returned."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if callable(handler):  # only Python-level handlers run inside native code
            previous[number] = handler
            signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            previous[received[0]](received[0], None)
