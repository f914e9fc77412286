"""One piece of work run in a thread while the caller goes on (issue 10).

dials.vmerge writes scaled.refl (~340 MB for a 1e6-observation sweep, ~1 s of a 7 s run)
while merging runs: the writer spends its time in file reads and writes and numpy copies,
which release the GIL, so on two cores it costs merging little. Merging reads the scaled
table's columns (file-backed, never modified in place), which the writer only reads too.

The thread logs nothing (the log's order must not depend on timing) and keeps its error: the
caller's `result()` joins it and re-raises the error there, so a failed write is reported as
it was when the write ran in line. `wait()` joins without raising, for a caller that is
failing already and must not leave the file half-written behind its cleanup.
"""

from __future__ import annotations

import sys
import threading

# While the worker runs, the interpreter hands the GIL over every 0.5 ms instead of 5 ms:
# each of the worker's ~10^3 returns from a read or write waits at most one interval for a
# main thread that is running Python code (measured on a 1e6 sweep: see README, issue 10).
SWITCH_INTERVAL_S = 0.0005


class BackgroundTask:
    """function(*args, **kwargs) started in a daemon thread at construction."""

    def __init__(self, function, *args, **kwargs):
        self._value = None
        self._error = None
        self._previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._previous_interval, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs),
                                        name="dials_vmerge background task", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            sys.setswitchinterval(self._previous_interval)
            raise

    def _run(self, function, args, kwargs):
        try:
            self._value = function(*args, **kwargs)
        except BaseException as e:  # handed to the caller by result()
            self._error = e
        finally:
            # glibc gave this thread an arena of its own: its freed buffers would stay in
            # the process's RSS to the end of the run (+25 MB on a 1e6 sweep) unless trimmed
            from .memory import release_free_memory

            release_free_memory(collect_cycles=False)

    def wait(self) -> None:
        """Join the thread (its error, if any, stays for result())."""
        self._thread.join()
        if self._previous_interval is not None:
            sys.setswitchinterval(self._previous_interval)
            self._previous_interval = None

    def result(self):
        """Join the thread; its return value, or its exception raised here."""
        self.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value
