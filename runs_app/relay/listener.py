"""The LISTEN side of NOTIFY: the relay loop's idle wait on PostgreSQL (the sender side, the
``pg_notify`` calls of the write paths, is :mod:`runs_app.notify`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.db import connections

from ..conf import runs_settings
from ..db import db_alias
from ..notify import notify_enabled

logger = logging.getLogger("runs_app.notify")

# The stop event is set by a signal handler, which Python runs between two waits on the socket
# only: the listener waits in slices this long, so SIGTERM/SIGINT stop the relay this fast.
STOP_CHECK_SECONDS = 0.2
# Reconnection backoff of the listener after its connection failed.
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
# Shown in pg_stat_activity (unless the database OPTIONS set another application_name).
APPLICATION_NAME = "runs_app relay listener"


class OutboxListener:
    """A dedicated autocommit psycopg connection LISTENing on ``NOTIFY_CHANNEL``.

    Built from the write database's Django connection parameters (same server, database,
    credentials and OPTIONS), with TCP keepalives so a silently dead connection is noticed, and
    ``application_name`` "runs_app relay listener". Not thread-safe: one per relay loop.
    """

    def __init__(self, alias: str, channel: str) -> None:
        self.alias = alias
        self.channel = channel
        self._connection: Any = None
        self._backoff = RECONNECT_MIN_SECONDS

    @classmethod
    def for_relay(cls) -> OutboxListener | None:
        """A listening listener for the relay loop, or None where the relay only polls. Starts
        listening before the loop's first pass, so nothing committed after that pass's claim can
        go unnoticed; if the database is unreachable now, it retries in ``wait``."""
        if not notify_enabled():
            return None
        try:
            import psycopg  # noqa: F401
        except ImportError:
            logger.warning("NOTIFY needs psycopg 3.2+; the relay only polls")
            return None
        listener = cls(db_alias(), runs_settings.NOTIFY_CHANNEL)
        listener.connect()
        return listener

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def connect(self) -> bool:
        """Open the connection and LISTEN; True on success, False (logged) on failure."""
        import psycopg
        from psycopg import sql

        params = dict(connections[self.alias].get_connection_params())
        # Django's cursor class and adapters are for its own connections; LISTEN needs neither.
        for key in ("cursor_factory", "context"):
            params.pop(key, None)
        params.setdefault("application_name", APPLICATION_NAME)
        for key, value in (
            ("keepalives", 1),
            ("keepalives_idle", 30),
            ("keepalives_interval", 10),
            ("keepalives_count", 3),
        ):
            params.setdefault(key, value)
        try:
            connection = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            self._failed(exc)
            return False
        try:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.Error as exc:
            self._close_quietly(connection)
            self._failed(exc)
            return False
        self._connection = connection
        self._backoff = RECONNECT_MIN_SECONDS
        return True

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Wait for a notification, at most ``timeout`` seconds; return early when ``stop`` is
        set. Returns True when woken by a notification (the ones queued behind it are consumed
        too: the pass that follows covers them all).

        After a connection error (or while disconnected): wait out the reconnection backoff
        (0.5 s doubling to 30 s, never more than ``timeout``), reconnect, LISTEN again and
        return, so the relay polls once for whatever was committed while nobody listened.
        """
        import psycopg

        if self._connection is None:
            return self._reconnect(stop, timeout)
        deadline = time.monotonic() + timeout
        try:
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                slice_ = min(STOP_CHECK_SECONDS, remaining)
                if any(True for _ in self._connection.notifies(timeout=slice_, stop_after=1)):
                    for _ in self._connection.notifies(timeout=0):
                        pass  # drained: one pass serves every notification queued so far
                    logger.debug("woken by a notification on %s", self.channel)
                    return True
        except psycopg.Error as exc:
            logger.warning("LISTEN connection lost (%s); reconnecting", exc)
            self.close()
            return self._reconnect(stop, max(0.0, deadline - time.monotonic()))
        return False

    def _reconnect(self, stop: threading.Event, timeout: float) -> bool:
        delay, self._backoff = self._backoff, min(self._backoff * 2, RECONNECT_MAX_SECONDS)
        stop.wait(min(delay, timeout))
        if not stop.is_set() and self.connect():
            logger.info("listening on %s again", self.channel)
        return False

    def _failed(self, exc: Exception) -> None:
        logger.warning(
            "cannot LISTEN on %s (%s); polling, next try within %.1f s",
            self.channel,
            exc,
            self._backoff,
        )

    def close(self) -> None:
        """Close the connection (quietly: the server may have dropped it already)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._close_quietly(connection)

    @staticmethod
    def _close_quietly(connection: Any) -> None:
        try:
            connection.close()
        except Exception:
            logger.debug("closing the LISTEN connection failed", exc_info=True)
