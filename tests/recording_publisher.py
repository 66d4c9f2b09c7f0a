"""A publisher for relay tests in subprocesses: records every delivery durably.

Each process appends to its own file ``<directory>/deliveries-<pid>.log``:
``B <count>`` when a publish call starts, then ``M <monotonic_ns> <run_id> <seq>`` per message
(flushed at once, so a test can see a relay that is mid-batch), and an fsync before ``publish``
returns, i.e. before the relay acknowledges. ``CLOCK_MONOTONIC`` is system-wide on Linux, so
lines of several processes merge into one timeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from runs_app.publishers import Message


class RecordingPublisher:
    def __init__(self, directory: str, delay: float = 0.0, fail_runs: Sequence[str] = ()) -> None:
        # No file is opened here: the system check builds publishers too.
        self.directory = Path(directory)
        self.delay = delay
        self.fail_runs = frozenset(fail_runs)
        self._file: IO[str] | None = None

    def _out(self) -> IO[str]:
        if self._file is None:
            path = self.directory / f"deliveries-{os.getpid()}.log"
            self._file = path.open("a", encoding="utf-8")
        return self._file

    def publish(self, messages: Sequence[Message]) -> None:
        out = self._out()
        out.write(f"B {len(messages)}\n")
        out.flush()
        for message in messages:
            if message.run_id in self.fail_runs:
                raise RuntimeError(f"broker refused {message.id}")
            if self.delay:
                time.sleep(self.delay)  # a slow broker (not synchronisation): kills land mid-batch
            out.write(f"M {time.monotonic_ns()} {message.run_id} {message.seq}\n")
            out.flush()
        os.fsync(out.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
