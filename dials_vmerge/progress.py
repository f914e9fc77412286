"""Progress of a run: a tqdm bar over its stages on a terminal, and a log line for every
stage that takes MIN_LOGGED_SECONDS or more.

A program opens the bar with `run_progress(log, n_stages)`; library code marks its stages
with `stage(log, "Merging")`, which works with or without an open bar (in tests, in
library use, and when stderr is not a terminal only the log lines remain). While the bar is
shown, the log's console lines are printed above it (tqdm's logging redirect).

Loops (scaling rounds, filtering cycles) can show their own bar with `steps`:

    for round_ in steps(log, "Scaling rounds", rounds): ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Optional

MIN_LOGGED_SECONDS = 2.0

_active_bar = None  # the bar of the running program, if it shows one


def terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


@contextlib.contextmanager
def run_progress(log, n_stages: int, enabled: Optional[bool] = None, file=None):
    """A bar over the program's n_stages stages (on a terminal unless `enabled` says)."""
    global _active_bar
    enabled = terminal() if enabled is None else enabled
    if not enabled:
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=n_stages, file=file or sys.stderr, leave=False, unit="stage",
               bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]")
    previous, _active_bar = _active_bar, bar
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield bar
    finally:
        _active_bar = previous
        bar.close()


@contextlib.contextmanager
def stage(log, name: str, min_seconds: float = MIN_LOGGED_SECONDS):
    """Mark a stage: the bar shows its name while it runs and advances when it ends; a log
    line "name: t s" when it took min_seconds or more (and finished without an error)."""
    bar = _active_bar
    if bar is not None:
        bar.set_description_str(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        if bar is not None:
            bar.update(1)
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
        log.info(f"{name}: {elapsed:.1f} s")


def steps(log, name: str, iterable: Iterable, total: Optional[int] = None,
          min_seconds: float = MIN_LOGGED_SECONDS, enabled: Optional[bool] = None):
    """Iterate with a bar of its own on a terminal; a log line with the time taken when the
    loop took min_seconds or more."""
    enabled = terminal() if enabled is None else enabled
    start = time.perf_counter()
    if enabled:
        from tqdm import tqdm

        iterable = tqdm(iterable, total=total, desc=name, file=sys.stderr, leave=False)
    count = 0
    for item in iterable:
        count += 1
        yield item
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
        log.info(f"{name}: {count} in {elapsed:.1f} s")
