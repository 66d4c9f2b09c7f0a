"""Publishers used by the benchmarks, for runs_app's relay and the raw relay alike.

A publisher is any object with ``publish(messages)``; runs_app's ``Message`` and the raw relay's
``RawMessage`` both carry an ``id`` (``"<run_id>:<seq>"``), which is all these need.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any


def monotonic_now() -> float:
    """CLOCK_MONOTONIC is one clock for every process of the machine: latencies can be measured
    from a timestamp taken in the appender and one taken in the relay process."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class NoopPublisher:
    """Accepts every batch and does nothing: the drain benchmarks measure the relay alone."""

    def publish(self, messages: Sequence[Any]) -> None:
        return None


class PipePublisher:
    """Writes ``"<message id> <monotonic time>"`` per message to an inherited pipe.

    The latency benchmark reads the pipe in the appending process. runs_app builds it as
    ``PipePublisher(**PUBLISHER_OPTIONS)`` in the ``drain_outbox`` subprocess (see
    bench/settings.py); the raw relay builds it directly.
    """

    def __init__(self, fd: int) -> None:
        self.fd = int(fd)

    def publish(self, messages: Sequence[Any]) -> None:
        now = monotonic_now()
        lines = "".join(f"{message.id} {now!r}\n" for message in messages)
        os.write(self.fd, lines.encode())
