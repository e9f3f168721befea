"""Runs a function over many items in worker processes, with a progress bar or periodic log lines.

On a terminal the progress is a tqdm bar with rate and ETA; otherwise (logs, CI, pipes) a log line
every LOG_EVERY_SECONDS. Workers report progress through one shared counter, so the parent sees it
while a long item (a whole shard) is still running.
"""

import multiprocessing
import os
import signal
import sys
import time

from absl import logging
import tqdm

LOG_EVERY_SECONDS = 10.0
POLL_SECONDS = 0.2

# In a worker: the shared counter set by _initialize_worker; in the parent (one worker): a callback.
_report = None


def default_num_workers() -> int:
    """Returns the number of cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def report(count: int = 1) -> None:
    """Adds count finished units (images, files) to the progress of the current map()."""
    if _report is not None:
        _report(count)


def map_items(function, items: list, *, num_workers: int, description: str, unit: str, total: int) -> list:
    """Returns [function(item) for item in items], computed by num_workers processes.

    Args:
        function: a module-level function (it is pickled by name); it calls report() as it goes.
        items: the inputs, picklable.
        num_workers: processes to use; 1 runs in this process.
        description: what is being done, for the bar and the log lines.
        unit: what report() counts ("images", "files").
        total: the number of units expected, for the rate and ETA.

    Returns:
        The results, in the order of items whatever the number of workers.
    """
    global _report
    display = _Display(description=description, unit=unit, total=total)
    try:
        if num_workers <= 1 or len(items) <= 1:
            _report = display.add
            return [function(item) for item in items]
        # fork: the workers inherit the imported modules instead of importing TensorFlow again (about
        # 3 s each). The parent has run no TensorFlow op, only file-system calls, so this is safe.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        counter = context.Value("q", 0)
        with context.Pool(min(num_workers, len(items)), _initialize_worker, (counter,)) as pool:
            pending = pool.map_async(function, items, chunksize=max(1, len(items) // (num_workers * 64)))
            while not pending.ready():
                pending.wait(POLL_SECONDS)
                display.set(counter.value)
            # Again after the loop: short jobs can finish before the loop's first check.
            display.set(counter.value)
            return pending.get()
    finally:
        _report = None
        display.close()


def _initialize_worker(counter) -> None:
    global _report
    # A forked worker inherits the parent's signal handlers; one that only sets a flag on SIGTERM (as the
    # trainer's preemption watcher does) would make the pool's terminate() wait for the worker forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def add(count: int) -> None:
        with counter.get_lock():
            counter.value += count

    _report = add


class _Display:
    """A tqdm bar on a terminal, else log lines with rate and ETA every LOG_EVERY_SECONDS."""

    def __init__(self, *, description: str, unit: str, total: int):
        self.description = description
        self.unit = unit
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.last_log = self.start
        self.bar = tqdm.tqdm(total=total, desc=description, unit=f" {unit}") if sys.stderr.isatty() else None

    def add(self, count: int) -> None:
        self.set(self.done + count)

    def set(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if self.bar is None and now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info(
            "%s: %d of %d %s, %.0f %s/s, ETA %.0f s",
            self.description, self.done, self.total, self.unit, rate, self.unit, remaining,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._log(time.monotonic())
