"""The lease protocol: claim runs, renew, release, acknowledge, record a failure.

A lease gives one relay the right to publish a run's pending events: a token unique to the
claim, ``leased_by`` and ``lease_until`` computed with the database's clock. Every write here is
one short transaction fenced by the token (and, for an acknowledgement, the cursor), so a relay
whose lease expired and was taken over changes nothing for that run.

Invariant kept by every write here: events with ``seq < next_seq`` have ``published_at`` (or
``skipped_at``) set, written in the transaction that advanced ``next_seq``; events with
``seq >= next_seq`` are pending.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, OuterRef, Q, QuerySet
from django.db.models.functions import Now

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, table
from ..models import RunEvent, RunOutbox
from ..publishers import Message
from ..services.outbox import NO_LEASE
from ..services.validation import error_text

logger = logging.getLogger("runs_app.relay")

# Monotonic clock used to decide when to renew leases; a module attribute so a test can move it.
monotonic = time.monotonic


@dataclass
class ClaimedRun:
    run_id: str
    next_seq: int
    attempts: int
    renewed_at: float  # our monotonic clock when its lease was last set


@dataclass
class Claim:
    """Leases taken by one claim: one token for all its runs (unique to this claim)."""

    token: uuid.UUID
    runs: list[ClaimedRun] = field(default_factory=list)


def claim_runs(
    limit: int, *, run_ids: Sequence[str] | None = None, ignore_backoff: bool = False
) -> Claim:
    """Lease up to ``limit`` claimable runs (see the module docstring), in run id order.

    One short transaction holding one ``UPDATE ... WHERE run_id IN (SELECT ... LIMIT n)
    RETURNING`` statement; on PostgreSQL the subquery locks the outbox rows it picks with
    ``FOR UPDATE OF outbox SKIP LOCKED`` (relays skip each other's rows), on SQLite the statement
    is the only writer while it runs. Nothing else happens inside it.
    """
    alias = db_alias()
    token = uuid.uuid4()
    lease = dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS))
    holder = f"{socket.gethostname()}:{os.getpid()}"[:200]
    candidates = _claimable(run_ids, ignore_backoff=ignore_backoff)
    if is_postgresql():
        # An idle PostgreSQL relay polls with the claim itself: with nothing to claim it locks
        # and writes nothing, so a separate "anything to do?" read would only add a query.
        candidates = candidates.select_for_update(skip_locked=True, of=("self",))
    elif not candidates.exists():
        # An idle SQLite relay polls with this read alone: no write lock taken from the
        # application when there is nothing to claim.
        return Claim(token, [])
    with transaction.atomic(using=alias):
        rows = _claim_returning(candidates[:limit], token, holder, lease)
    claimed_at = monotonic()
    runs = sorted(
        (ClaimedRun(str(rid), int(seq), int(att), claimed_at) for rid, seq, att in rows),
        key=lambda run: run.run_id,
    )
    return Claim(token, runs)


def _claimable(run_ids: Sequence[str] | None, *, ignore_backoff: bool) -> QuerySet[RunOutbox]:
    # Driven by the small partial index of pending events, not by a scan of every outbox: the
    # DISTINCT lets PostgreSQL walk that index in run order (an index-only scan) and look each
    # run's outbox up by key, stopping at the LIMIT; without it the planner prefers a merge join
    # that reads the whole outbox table.
    pending = RunEvent.objects.pending()
    if run_ids is not None:
        pending = pending.filter(run_id__in=run_ids)
    # The EXISTS (one probe of the (run, seq) unique index) keeps the claim exact: a run is
    # claimed only when an event at or above its cursor exists, so a pass that claims a run
    # always has something to publish.
    at_cursor = RunEvent.objects.filter(run_id=OuterRef("run_id"), seq__gte=OuterRef("next_seq"))
    queryset = RunOutbox.objects.using(db_alias()).filter(
        Q(lease_until__isnull=True) | Q(lease_until__lte=Now()),
        Exists(at_cursor),
        run_id__in=pending.order_by().values("run_id").distinct(),
        blocked_at__isnull=True,
    )
    if not ignore_backoff:
        queryset = queryset.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now()))
    return queryset.order_by("run_id")


def _claim_returning(
    candidates: QuerySet[RunOutbox], token: uuid.UUID, holder: str, lease: dt.timedelta
) -> list[tuple[Any, ...]]:
    """One statement, so two relays can never claim the same run. Raw SQL because the ORM has
    no ``UPDATE ... RETURNING``; the candidate subquery (with its row locks on PostgreSQL) is the
    ORM's own SQL."""
    connection = connection_for_write()
    subquery, params = candidates.values("run_id").query.sql_with_params()
    lease_sql, lease_params = compile_expression(db_now_plus(lease))
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table(RunOutbox)} SET lease_token = %s, leased_by = %s,"
            f" lease_until = {lease_sql} WHERE run_id IN ({subquery})"
            " RETURNING run_id, next_seq, attempts",
            [token_value, holder, *lease_params, *params],
        )
        return list(cursor.fetchall())


def acknowledge_batches(
    token: uuid.UUID,
    batches: Sequence[tuple[str, int, int]],
    *,
    keep_lease: Collection[str] = (),
) -> set[str]:
    """Record published batches ``(run_id, first_seq, last_seq)`` (each contiguous from the run's
    ``next_seq``) as delivered; return the run ids acknowledged.

    One short transaction, two set-based statements whatever the number of runs:

    1. ``UPDATE outbox ... FROM (VALUES ...)``, fenced per run by the lease token and the cursor
       (``next_seq = first_seq``): advance ``next_seq``, reset attempts and backoff, clear the
       lease, or renew it for the runs in ``keep_lease``. ``RETURNING`` says which runs it
       changed: a run whose lease was taken over (or whose cursor moved) changes nothing.
    2. ``UPDATE event SET published_at ... FROM (VALUES ...)`` for exactly the (run, seq range)
       pairs of the runs statement 1 returned; the outbox rows it updated stay locked until
       commit, so no other relay can claim them in between.

    Raw SQL: the ORM has neither ``UPDATE ... FROM`` nor ``RETURNING`` on an update (a ``Case``
    per run would need a third statement to learn which runs matched). PostgreSQL and SQLite
    (3.35+) both speak this SQL and name ``VALUES`` columns ``column1``, ``column2``...
    """
    if not batches:
        return set()
    alias = db_alias()
    connection = connection_for_write()
    outbox, event = table(RunOutbox), table(RunEvent)
    now_sql, now_params = compile_expression(Now())
    lease_sql, lease_params = compile_expression(
        db_now_plus(dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)))
    )
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    keep = set(keep_lease)
    values = ", ".join(["(%s, %s, %s, %s)"] * len(batches))
    params: list[Any] = list(lease_params)
    for run_id, first, last in batches:
        params += [run_id, first, last, int(run_id in keep)]
    params.append(token_value)
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {outbox} SET next_seq = a.column3 + 1, attempts = 0, last_error = '',"
            " next_attempt_at = NULL,"
            f" lease_until = CASE WHEN a.column4 = 1 THEN {lease_sql} ELSE NULL END,"
            " lease_token = CASE WHEN a.column4 = 1 THEN lease_token ELSE NULL END,"
            " leased_by = CASE WHEN a.column4 = 1 THEN leased_by ELSE '' END"
            f" FROM (VALUES {values}) AS a"
            f" WHERE {outbox}.run_id = a.column1 AND {outbox}.lease_token = %s"
            f" AND {outbox}.next_seq = a.column2"
            f" RETURNING {outbox}.run_id",
            params,
        )
        acked = {str(run_id) for (run_id,) in cursor.fetchall()}
        marked = [batch for batch in batches if batch[0] in acked]
        if marked:
            cursor.execute(
                f"UPDATE {event} SET published_at = {now_sql}"
                f" FROM (VALUES {', '.join(['(%s, %s, %s)'] * len(marked))}) AS a"
                f" WHERE {event}.run_id = a.column1"
                f" AND {event}.seq >= a.column2 AND {event}.seq <= a.column3"
                f" AND {event}.published_at IS NULL AND {event}.skipped_at IS NULL",
                [*now_params, *(value for batch in marked for value in batch)],
            )
    return acked


def acknowledge(
    token: uuid.UUID, run_id: str, messages: Sequence[Message], *, keep_lease: bool = False
) -> bool:
    """``acknowledge_batches`` for one run's ``messages``: True if acknowledged."""
    batch = (run_id, messages[0].seq, messages[-1].seq)
    return bool(acknowledge_batches(token, [batch], keep_lease=[run_id] if keep_lease else ()))


def record_failure(claim: Claim, run: ClaimedRun, error: BaseException) -> bool:
    """After a failed publish: ``attempts`` + 1, ``last_error``, a backoff from the database's
    clock, the lease cleared; blocked at ``MAX_ATTEMPTS``. One statement, fenced by the lease.
    Returns whether the run is now blocked."""
    attempts = run.attempts + 1
    blocked = attempts >= runs_settings.MAX_ATTEMPTS
    delay = dt.timedelta(seconds=backoff_seconds(attempts))
    alias = db_alias()
    with transaction.atomic(using=alias):
        recorded = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run.run_id, lease_token=claim.token)
            .update(
                attempts=attempts,
                last_error=error_text(f"{type(error).__name__}: {error}"),
                next_attempt_at=None if blocked else db_now_plus(delay),
                blocked_at=Now() if blocked else None,
                **NO_LEASE,
            )
        )
    if not recorded:
        logger.warning(
            "publish failed for run %s, but its lease was taken over: the relay that holds it "
            "now retries (failure not recorded): %s",
            run.run_id,
            error,
        )
        return False
    if blocked:
        logger.error(
            "outbox of run %s blocked after %d failed attempts: %s", run.run_id, attempts, error
        )
    else:
        logger.warning(
            "publish failed for run %s (attempt %d, retry in %.1f s): %s",
            run.run_id,
            attempts,
            delay.total_seconds(),
            error,
        )
    return blocked


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential (base, 2 base, 4 base...) capped at
    ``RETRY_MAX_SECONDS``, with jitter in the upper half so relays do not retry in lockstep.
    Always within ``[RETRY_BASE_SECONDS, RETRY_MAX_SECONDS]``."""
    base = float(runs_settings.RETRY_BASE_SECONDS)
    ceiling = float(runs_settings.RETRY_MAX_SECONDS)
    top = min(ceiling, base * 2.0 ** min(max(attempts - 1, 0), 64))
    return random.uniform(max(base, top / 2), top)


def renew_leases(token: uuid.UUID, run_ids: Sequence[str]) -> set[str]:
    """Extend the leases still held under ``token``; return the run ids still ours."""
    alias = db_alias()
    held = RunOutbox.objects.using(alias).filter(run_id__in=run_ids, lease_token=token)
    with transaction.atomic(using=alias):
        renewed = held.update(
            lease_until=db_now_plus(dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)))
        )
    if renewed == len(run_ids):
        return set(run_ids)
    return set(held.values_list("run_id", flat=True))


def release_leases(claim: Claim, run_ids: Sequence[str]) -> int:
    """Give back leases we did not use (fenced: never someone else's)."""
    alias = db_alias()
    with transaction.atomic(using=alias):
        return (
            RunOutbox.objects.using(alias)
            .filter(run_id__in=run_ids, lease_token=claim.token)
            .update(**NO_LEASE)
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def db_now_plus(delta: dt.timedelta) -> ExpressionWrapper[Any]:
    """The database's clock plus ``delta``: leases and backoffs never depend on this host's."""
    return ExpressionWrapper(Now() + delta, output_field=DateTimeField())


def compile_expression(expression: Any) -> tuple[str, list[Any]]:
    query = RunOutbox.objects.using(db_alias()).all().query
    compiler = query.get_compiler(db_alias())
    sql, params = compiler.compile(expression.resolve_expression(query))
    return sql, list(params)
