"""Claiming runs: which runs a pass leases, in which order, with which statement.

A claim leases up to ``limit`` runs in one ``UPDATE ... RETURNING`` statement, so two relays can
never claim the same run; the leases it hands out are then the business of :mod:`.lease`.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.db.models.functions import Now

from ..db import connection_for_write, db_alias, is_postgresql, table
from ..models import RunEvent, RunOutbox
from . import lease
from .lease import Claim, ClaimedRun, lease_until_sql


class ClaimOrder:
    """Where this process's next claim starts: claims rotate through the runs with pending events.

    Each claim continues after the last run the previous claim of this process took, in run id
    order, and starts again from the lowest id once a claim comes back short: a round robin over
    the runs with work, so each run is served once per sweep whatever another run's backlog, and
    the run served longest ago comes next. A run with pending events waits at most one sweep,
    ``ceil(P / batch)`` passes for ``P`` claimable runs (fewer with several relays), never until
    another run's backlog is gone. The position is per process, not stored: a new relay starts a
    sweep from the lowest id, which only costs that relay's first sweep.

    Why not order by a service time or the oldest pending event: that key has no index (adding
    one takes a migration), so every claim would have to rank every run with pending events;
    a walk of the pending index from a position costs the runs it claims.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # alias -> (run id, inclusive): the next claim takes runs after (or from) that id.
        self._position: dict[str, tuple[str, bool]] = {}

    def start(self, alias: str) -> tuple[str, bool]:
        with self._lock:
            return self._position.get(alias, ("", False))

    def claimed(self, alias: str, run_ids: Sequence[str], *, full: bool) -> None:
        """After a claim: a full claim moves the position to its last run; a short one ends the
        sweep (the next claim starts from the lowest id)."""
        with self._lock:
            self._position[alias] = (max(run_ids) if full and run_ids else "", False)

    def resume_at(self, alias: str, run_id: str) -> None:
        """The read's byte budget stopped inside ``run_id``, and the runs of the claim after it
        were not read: the next claim starts at ``run_id``, so they come first."""
        with self._lock:
            self._position[alias] = (run_id, True)

    def reset(self) -> None:
        """Start every sweep again from the lowest id (tests)."""
        with self._lock:
            self._position.clear()


claim_order = ClaimOrder()


def claim_runs(
    limit: int, *, run_ids: Sequence[str] | None = None, ignore_backoff: bool = False
) -> Claim:
    """Lease up to ``limit`` claimable runs: runs with pending events and an event at or above
    their cursor, not blocked, whose backoff is over (unless ``ignore_backoff``) and whose lease
    is free or expired. Without ``run_ids``, in the rotating order of :class:`ClaimOrder`.

    One short transaction holding one ``UPDATE ... RETURNING`` statement (a second one when the
    rotation wraps around with nothing after its position). On PostgreSQL it walks the pending
    index run by run and locks the outbox rows it picks with ``FOR UPDATE SKIP LOCKED`` (relays
    skip each other's rows; appenders lock run rows and never wait for a relay); on SQLite the
    statement is the only writer while it runs. Nothing else happens inside it. The claimed runs
    come back in run id order.
    """
    alias = db_alias()
    token = uuid.uuid4()
    if run_ids is not None:
        rows = _claim(limit, token, run_ids=run_ids, start=("", False), backoff=not ignore_backoff)
    else:
        start = claim_order.start(alias)
        rows = _claim(limit, token, run_ids=None, start=start, backoff=not ignore_backoff)
        if not rows and start != ("", False):
            rows = _claim(limit, token, run_ids=None, start=("", False), backoff=not ignore_backoff)
        claim_order.claimed(alias, [str(row[0]) for row in rows], full=len(rows) >= limit)
    claimed_at = lease.monotonic()
    runs = sorted(
        (ClaimedRun(str(rid), int(seq), int(att), claimed_at) for rid, seq, att in rows),
        key=lambda run: run.run_id,
    )
    return Claim(token, runs)


def _claim(
    limit: int,
    token: uuid.UUID,
    *,
    run_ids: Sequence[str] | None,
    start: tuple[str, bool],
    backoff: bool,
) -> list[tuple[Any, ...]]:
    connection = connection_for_write()
    holder = f"{socket.gethostname()}:{os.getpid()}"[:200]
    lease_sql, lease_params = lease_until_sql()
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    if is_postgresql():
        # An idle PostgreSQL relay polls with the claim itself: with nothing to claim it locks
        # and writes nothing, so a separate "anything to do?" read would only add a query.
        sql, params = _claim_postgresql(limit, run_ids, start, backoff)
    else:
        candidates = _claimable_sqlite(run_ids, start, backoff=backoff)
        if not candidates.exists():
            # An idle SQLite relay polls with this read alone: no write lock taken from the
            # application when there is nothing to claim.
            return []
        # Compiled for the connection it runs on (``Query.sql_with_params`` compiles for
        # "default", whatever the router says).
        ids = candidates[:limit].values("run_id")
        sql, orm_params = ids.query.get_compiler(using=ids.db).as_sql()
        params = list(orm_params)
    # PostgreSQL: = ANY(ARRAY(...)) runs the candidates first (an InitPlan) and updates their
    # rows by primary key. With IN (...) the planner joins the candidates with the outbox, and
    # on a table of some thousand rows it hashes them and scans the whole outbox every claim.
    target = f"= ANY(ARRAY({sql}))" if is_postgresql() else f"IN ({sql})"
    with transaction.atomic(using=db_alias()), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table(RunOutbox)} SET lease_token = %s, leased_by = %s,"
            f" lease_until = {lease_sql} WHERE run_id {target}"
            " RETURNING run_id, next_seq, attempts",
            [token_value, holder, *lease_params, *params],
        )
        return list(cursor.fetchall())


# The PostgreSQL candidates, written so that their plan does not depend on statistics (a fresh
# database has none; the ORM's IN (SELECT DISTINCT ...) let the planner pick a merge join that
# read the whole outbox there). Raw SQL: the ORM says neither WITH RECURSIVE nor LATERAL.
# - ``pending``: the run ids with pending events after the rotation's position, one at a time
#   (a "loose index scan" of the partial index runs_app_event_pending: one descent per run,
#   however many events the run has waiting; ORDER BY run_id LIMIT 1 on that index is the only
#   sensible plan, and the recursion is evaluated only as far as the LIMIT pulls it);
# - per run, LATERAL (a nested loop by construction): its outbox row by primary key, with the
#   claim conditions and the EXISTS probe of the (run, seq) unique index that keeps the claim
#   exact (an event at or above the cursor exists), locked FOR UPDATE SKIP LOCKED.
_CANDIDATES_POSTGRESQL = """
WITH RECURSIVE pending(run_id) AS (
    (SELECT run_id FROM {event} WHERE {pending} AND run_id {start} %s ORDER BY run_id LIMIT 1)
    UNION ALL
    SELECT (
        SELECT e.run_id FROM {event} e WHERE {pending_e} AND e.run_id > p.run_id
        ORDER BY e.run_id LIMIT 1
    )
    FROM pending p WHERE p.run_id IS NOT NULL
)
SELECT o.run_id FROM pending p CROSS JOIN LATERAL ({outbox_row}) o
WHERE p.run_id IS NOT NULL
LIMIT %s
"""
# With run ids given (one run, ``--run``): those runs only, each with a pending event.
_CANDIDATES_POSTGRESQL_FOR_RUNS = """
SELECT o.run_id FROM unnest(%s::text[]) AS p(run_id) CROSS JOIN LATERAL ({outbox_row}) o
WHERE EXISTS (SELECT 1 FROM {event} e WHERE e.run_id = p.run_id AND {pending_e})
ORDER BY o.run_id
LIMIT %s
"""
_OUTBOX_ROW_POSTGRESQL = """
    SELECT b.run_id FROM {outbox} b
    WHERE b.run_id = p.run_id AND b.blocked_at IS NULL
    AND (b.lease_until IS NULL OR b.lease_until <= statement_timestamp())
    {backoff}
    AND EXISTS (SELECT 1 FROM {event} c WHERE c.run_id = b.run_id AND c.seq >= b.next_seq)
    FOR UPDATE OF b SKIP LOCKED
"""
# statement_timestamp(), not now(): the leases and backoffs are written with Django's Now(),
# which is STATEMENT_TIMESTAMP() on PostgreSQL; now() is the transaction's start, which inside a
# caller's long transaction (a test's) lags behind the times written since.
_NO_BACKOFF_POSTGRESQL = (
    "AND (b.next_attempt_at IS NULL OR b.next_attempt_at <= statement_timestamp())"
)


def _claim_postgresql(
    limit: int, run_ids: Sequence[str] | None, start: tuple[str, bool], backoff: bool
) -> tuple[str, list[Any]]:
    event = table(RunEvent)
    pending = "published_at IS NULL AND skipped_at IS NULL"  # PENDING_EVENT, the index condition
    outbox_row = _OUTBOX_ROW_POSTGRESQL.format(
        outbox=table(RunOutbox),
        event=event,
        backoff=_NO_BACKOFF_POSTGRESQL if backoff else "",
    )
    pending_e = "e.published_at IS NULL AND e.skipped_at IS NULL"
    if run_ids is not None:
        sql = _CANDIDATES_POSTGRESQL_FOR_RUNS.format(
            outbox_row=outbox_row, event=event, pending_e=pending_e
        )
        return sql, [list(run_ids), limit]
    after, inclusive = start
    sql = _CANDIDATES_POSTGRESQL.format(
        event=event,
        pending=pending,
        pending_e=pending_e,
        outbox_row=outbox_row,
        start=">=" if inclusive else ">",
    )
    return sql, [after, limit]


def _claimable_sqlite(
    run_ids: Sequence[str] | None, start: tuple[str, bool], *, backoff: bool
) -> QuerySet[RunOutbox]:
    # The ORM says it on SQLite (no statistics there unless ANALYZE is run; its planner walks
    # the partial index of pending events in run order and looks each outbox up by key).
    pending = RunEvent.objects.pending()
    if run_ids is not None:
        pending = pending.filter(run_id__in=run_ids)
    elif start[1]:
        pending = pending.filter(run_id__gte=start[0])
    else:
        pending = pending.filter(run_id__gt=start[0])
    # The EXISTS (one probe of the (run, seq) unique index) keeps the claim exact: a run is
    # claimed only when an event at or above its cursor exists.
    at_cursor = RunEvent.objects.filter(run_id=OuterRef("run_id"), seq__gte=OuterRef("next_seq"))
    queryset = RunOutbox.objects.using(db_alias()).filter(
        Q(lease_until__isnull=True) | Q(lease_until__lte=Now()),
        Exists(at_cursor),
        run_id__in=pending.order_by().values("run_id").distinct(),
        blocked_at__isnull=True,
    )
    if backoff:
        queryset = queryset.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now()))
    return queryset.order_by("run_id")
