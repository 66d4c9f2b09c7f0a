"""The relay loop and its process life: drain until idle, wait for work, again; survive the
database going away; stop cleanly when asked. No function here runs in the background: the loop
runs in the caller's thread until ``stop`` is set (the passes' lease keeper thread, see
:class:`.lease.LeaseKeeper`, is stopped when the loop returns)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import InterfaceError, OperationalError, connections

from ..conf import runs_settings
from ..publishers import Publisher
from .drain import DrainResult, drain_outbox_once
from .lease import stop_lease_keeper
from .listener import OutboxListener

logger = logging.getLogger("runs_app.relay")

# Reconnection backoff of the loop after a database error (PostgreSQL restarting...).
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0


def drain_until_idle(
    *,
    publisher: Publisher,
    batch_size: int | None = None,
    run_id: str | None = None,
    max_messages: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_pass: Callable[[DrainResult], None] | None = None,
) -> DrainResult:
    """Pass after pass until nothing is claimable right now (or ``max_messages`` is reached,
    or ``should_stop`` says so). Runs whose publish failed wait for their backoff, so they are
    not claimable again at once; a failing run is retried within the call only once its backoff
    is over, and stops being claimable when blocked."""
    total = DrainResult()
    while max_messages is None or total.published < max_messages:
        if should_stop is not None and should_stop():
            break
        result = drain_outbox_once(
            publisher=publisher,
            batch_size=batch_size,
            run_id=run_id,
            max_messages=None if max_messages is None else max_messages - total.published,
            should_stop=should_stop,
        )
        total += result
        if on_pass is not None and result.runs_touched:
            on_pass(result)
        if not result.published and not result.failed_runs:
            break  # nothing claimable (or nothing left to do for what was claimed)
    return total


def run_relay(
    *,
    publisher: Publisher,
    stop: threading.Event,
    batch_size: int | None = None,
    run_id: str | None = None,
    interval: float | None = None,
    max_messages: int | None = None,
    on_pass: Callable[[DrainResult], None] | None = None,
) -> DrainResult:
    """The relay loop: drain until idle, wait for work (``interval`` seconds, default
    ``POLL_INTERVAL``), again, until ``stop`` is set (or ``max_messages`` were published).

    When ``stop`` is set mid-pass, the batch in hand is published and acknowledged, the unused
    leases are released, and the loop returns. A database error (PostgreSQL restarting, a
    dropped connection) closes the connections and retries after a growing wait (0.5 s .. 30 s);
    the leases of the interrupted pass expire and another pass takes them over.

    On PostgreSQL with ``NOTIFY`` on, the wait listens on ``NOTIFY_CHANNEL`` over a connection
    of its own (see :mod:`runs_app.notify`), closed when the loop returns: a committed event
    wakes the loop at once, and the interval is the polling fallback.
    """
    wait = runs_settings.POLL_INTERVAL if interval is None else interval
    total = DrainResult()
    reconnect_delay = RECONNECT_MIN_SECONDS
    # LISTENing before the first pass: what commits after its claim wakes the next wait.
    listener = OutboxListener.for_relay()
    try:
        while not stop.is_set():
            # Drops connections that the database closed or that outlived CONN_MAX_AGE.
            _drop_unusable_connections()
            remaining = None if max_messages is None else max_messages - total.published
            try:
                result = drain_until_idle(
                    publisher=publisher,
                    batch_size=batch_size,
                    run_id=run_id,
                    max_messages=remaining,
                    should_stop=stop.is_set,
                    on_pass=on_pass,
                )
            except (OperationalError, InterfaceError) as exc:
                logger.warning(
                    "database unavailable (%s); retrying in %.1f s", exc, reconnect_delay
                )
                _close_connections()
                stop.wait(reconnect_delay)
                reconnect_delay = min(reconnect_delay * 2, RECONNECT_MAX_SECONDS)
                continue
            reconnect_delay = RECONNECT_MIN_SECONDS
            total += result
            if max_messages is not None and total.published >= max_messages:
                break
            if not stop.is_set():
                wait_for_work(stop, wait, listener)
    finally:
        if listener is not None:
            listener.close()
        stop_lease_keeper()  # idle between passes; not needed once the loop is over
    return total


def wait_for_work(
    stop: threading.Event, timeout: float, listener: OutboxListener | None = None
) -> None:
    """The relay's idle wait: return after ``timeout`` seconds, as soon as ``stop`` is set, or,
    with a ``listener`` (PostgreSQL, ``NOTIFY`` on), as soon as new events are committed."""
    if listener is None:
        stop.wait(timeout)
    else:
        listener.wait(stop, timeout)


def _close_connections() -> None:
    for connection in connections.all(initialized_only=True):
        try:
            connection.close()
        except Exception:  # a connection the server already dropped may fail to close
            logger.debug("closing a broken connection failed", exc_info=True)


def _drop_unusable_connections() -> None:
    """Before each wake-up: close a connection that failed and is no longer usable, and keep
    the others open. Not ``close_old_connections``: under the default ``CONN_MAX_AGE = 0`` it
    closes every connection each time, and a new connection on every wake-up was most of the
    relay's append-to-publish latency (20 ms against the raw listener's 4 ms)."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and connection.errors_occurred:
            if not connection.is_usable():
                connection.close()
            connection.errors_occurred = False
