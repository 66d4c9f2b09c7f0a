"""Waking the relay at once on PostgreSQL: NOTIFY when events commit, LISTEN in the relay loop.

Sender side. The write paths that make events claimable (``create_run``, every append through
``reserve_seqs``, ``retry_outbox``) call ``pg_notify(NOTIFY_CHANNEL, '')`` inside their own
transaction. PostgreSQL delivers the notification at commit and drops it on rollback, and it
merges identical notifications of one transaction, so a transaction wakes the relays once,
however many events it appends. The payload is empty: a notification only says "look now"; the
claim query decides what there is to do. On an append the call is folded into the
``UPDATE ... RETURNING`` that reserves the seqs (:func:`returning_clause`) rather than sent as a
statement of its own: one round trip less on the hottest path (measured on the local server:
UPDATE+INSERT+NOTIFY at ~0.72 of the raw UPDATE+INSERT rate as three statements, ~0.85 folded).

Listener side (:class:`runs_app.relay.listener.OutboxListener`, part of the relay). The
looping ``drain_outbox`` (never ``--once``) holds one dedicated autocommit connection that
LISTENs on the channel and waits on it between passes: it wakes on a notification or after the
poll interval, whichever comes first. The poll stays: backoffs that end, leases that expire and
NOTIFY being lost with a dropped connection are only seen by polling.

Off on SQLite, and when ``RUNS_APP["NOTIFY"]`` is False (needed behind PgBouncer in transaction
mode, where a LISTEN does not outlive its transaction): the relay then only polls.
"""

from __future__ import annotations

import logging
from typing import Any

from .conf import runs_settings
from .db import connection_for_write, is_postgresql

logger = logging.getLogger("runs_app.notify")


def notify_enabled() -> bool:
    """True when the write database is PostgreSQL and ``RUNS_APP["NOTIFY"]`` is on."""
    return bool(runs_settings.NOTIFY) and is_postgresql()


def notify_outbox() -> None:
    """Wake the listening relays when the current transaction commits (nothing on rollback).

    Call inside the write transaction that makes events claimable. A no-op on SQLite and with
    ``NOTIFY`` False. One ``SELECT pg_notify(...)`` statement.
    """
    if notify_enabled():
        with connection_for_write().cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [runs_settings.NOTIFY_CHANNEL])


def returning_clause() -> tuple[str, list[Any]]:
    """``notify_outbox`` as an extra ``RETURNING`` column: ``(", pg_notify(%s, '')", [channel])``,
    or ``("", [])`` where notifications are off. Evaluated once per returned row, so only when
    the statement changed a row; append it to an ``UPDATE ... RETURNING`` of exactly one row."""
    if notify_enabled():
        return ", pg_notify(%s, '')", [runs_settings.NOTIFY_CHANNEL]
    return "", []
