"""The lease protocol after the claim (:mod:`.claim`): keep the leases alive while publishing,
renew, release, acknowledge, record a failure or a gap.

A lease gives one relay the right to publish a run's pending events: a token unique to the
claim, ``leased_by`` and ``lease_until`` computed with the database's clock. Every write here is
one short transaction fenced by the token (and, for an acknowledgement or a gap, the cursor), so
a relay whose lease expired and was taken over changes nothing for that run.

Invariant kept by every write here: events with ``seq < next_seq`` have ``published_at`` (or
``skipped_at``) set, written in the transaction that advanced ``next_seq``; events with
``seq >= next_seq`` are pending.
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, pg_array, table
from ..models import RunEvent, RunOutbox
from ..publishers import Message
from ..services.outbox import NO_LEASE
from ..services.validation import internal_error_text

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


def acknowledge_batches(
    token: uuid.UUID,
    batches: Sequence[tuple[str, int, int]],
    *,
    keep_lease: Collection[str] = (),
) -> set[str]:
    """Record published batches ``(run_id, first_seq, last_seq)`` (each contiguous from the run's
    ``next_seq``) as delivered; return the run ids acknowledged.

    One short transaction, two set-based statements whatever the number of runs (on
    PostgreSQL sent as one, the first a data-modifying CTE of the second):

    1. ``UPDATE outbox``, fenced per run by the lease token and the cursor
       (``next_seq = first_seq``): advance ``next_seq``, reset attempts and backoff, clear the
       lease, or renew it for the runs in ``keep_lease``. ``RETURNING`` says which runs it
       changed: a run whose lease was taken over (or whose cursor moved) changes nothing.
    2. ``UPDATE event SET published_at`` for exactly the (run, seq range) pairs of the runs
       statement 1 returned; the outbox rows it updated stay locked until commit, so no other
       relay can claim them in between.

    Raw SQL: the ORM has neither ``UPDATE ... FROM`` nor ``RETURNING`` on an update (a ``Case``
    per run would need a third statement to learn which runs matched).
    """
    if not batches:
        return set()
    alias = db_alias()
    connection = connection_for_write()
    token_value = RunOutbox._meta.get_field("lease_token").get_db_prep_value(token, connection)
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        if is_postgresql():
            sql, params = _acknowledge_postgresql(batches, set(keep_lease), token_value)
            cursor.execute(sql, params)
            return {str(run_id) for (run_id,) in cursor.fetchall()}
        return _acknowledge_sqlite(cursor, batches, set(keep_lease), token_value)


# PostgreSQL: the runs' values travel as arrays (each sent once, in the one-row ``v``, which the
# planner folds into constants: the ARRAY(...) below stays an InitPlan, run once), and each
# outbox row finds its own at its run id's position (``array_position``), so the statement joins
# no per-run rows. A join with them (``FROM (VALUES ...)``) is planned from the statistics of
# ``lease_token``: nearly all NULL, so the planner expects one row for the claim's token, scans
# the outbox and rescans the per-run rows for each row it finds (100 x 100 comparisons, 8 ms a
# pass at 10,000 runs). Here the rows are found by primary key: ``= ANY(ARRAY(SELECT ...))``
# hides the array's length from the planner, which then expects a few keys of a unique index
# and walks it whatever the table's size or statistics. The events are marked for exactly the
# runs the fenced outbox UPDATE changed (a data-modifying CTE: one round trip a pass), found
# the same way: per acknowledged run, its seq range in the (run, seq) index (LATERAL: a nested
# loop by construction), the ids then updated by primary key. A join of the events with the
# acknowledged runs was planned from statistics: on a fresh database it walked the whole
# pending index once per run (about a million comparisons for 100 runs of 10,000 pending).
# "Still pending" is said as COALESCE(...) IS NULL, not as the partial index's own condition:
# with that, the planner (no statistics: it believes the pending index tiny) scanned the whole
# pending index and filtered it by id, instead of looking the ids up by primary key.
_ACKNOWLEDGE_POSTGRESQL = """
WITH acked AS (
    UPDATE {outbox} o SET
        next_seq = v.last_seqs[{at}] + 1,
        attempts = 0, last_error = '', next_attempt_at = NULL,
        lease_until = CASE WHEN v.keep[{at}] THEN {lease} END,
        lease_token = CASE WHEN v.keep[{at}] THEN o.lease_token END,
        leased_by = CASE WHEN v.keep[{at}] THEN o.leased_by ELSE '' END
    FROM (
        SELECT %(runs)s::text[] AS runs, %(first)s::bigint[] AS first_seqs,
            %(last)s::bigint[] AS last_seqs, %(keep)s::boolean[] AS keep
    ) v
    WHERE o.run_id = ANY(ARRAY(SELECT unnest(v.runs)))
    AND o.lease_token = %(token)s AND o.next_seq = v.first_seqs[{at}]
    RETURNING o.run_id, v.first_seqs[{at}] AS first_seq, o.next_seq - 1 AS last_seq
), marked AS (
    UPDATE {event} e SET published_at = {now}
    WHERE e.id = ANY(ARRAY(
        SELECT x.id FROM acked CROSS JOIN LATERAL (
            SELECT id FROM {event} WHERE run_id = acked.run_id
            AND seq >= acked.first_seq AND seq <= acked.last_seq ORDER BY seq
        ) x
    ))
    AND COALESCE(e.published_at, e.skipped_at) IS NULL
)
SELECT run_id FROM acked
"""


def _acknowledge_postgresql(
    batches: Sequence[tuple[str, int, int]], keep: set[str], token_value: Any
) -> tuple[str, dict[str, Any]]:
    return _acknowledge_postgresql_sql(db_alias()), {
        "runs": pg_array([run_id for run_id, _, _ in batches]),
        "first": pg_array([first for _, first, _ in batches]),
        "last": pg_array([last for _, _, last in batches]),
        "keep": pg_array([run_id in keep for run_id, _, _ in batches]),
        "token": token_value,
        "lease": dt.timedelta(seconds=float(runs_settings.LEASE_SECONDS)),
    }


@functools.lru_cache(maxsize=16)
def _acknowledge_postgresql_sql(alias: str) -> str:
    # The same text every pass: compiled once per alias (0.1 ms a pass).
    now_sql = compiled_now(alias)
    return _ACKNOWLEDGE_POSTGRESQL.format(
        outbox=table(RunOutbox),
        event=table(RunEvent),
        at="array_position(v.runs, o.run_id::text)",
        lease=f"({now_sql} + %(lease)s)",  # db_now_plus, with a named parameter
        now=now_sql,
    )


def _acknowledge_sqlite(
    cursor: Any, batches: Sequence[tuple[str, int, int]], keep: set[str], token_value: Any
) -> set[str]:
    # SQLite (3.35+) speaks UPDATE ... FROM (VALUES ...) ... RETURNING, naming the VALUES
    # columns column1, column2...; its planner looks each outbox row up by key.
    outbox, event = table(RunOutbox), table(RunEvent)
    now_sql, now_params = compile_expression(Now())
    lease_sql, lease_params = lease_until_sql()
    values = ", ".join(["(%s, %s, %s, %s)"] * len(batches))
    params: list[Any] = list(lease_params)
    for run_id, first, last in batches:
        params += [run_id, first, last, int(run_id in keep)]
    params.append(token_value)
    set_outbox = (
        "next_seq = a.column3 + 1, attempts = 0, last_error = '', next_attempt_at = NULL,"
        f" lease_until = CASE WHEN a.column4 = 1 THEN {lease_sql} ELSE NULL END,"
        " lease_token = CASE WHEN a.column4 = 1 THEN lease_token ELSE NULL END,"
        " leased_by = CASE WHEN a.column4 = 1 THEN leased_by ELSE '' END"
    )
    fence = (
        f" WHERE {outbox}.run_id = a.column1 AND {outbox}.lease_token = %s"
        f" AND {outbox}.next_seq = a.column2"
    )
    pending = f"{event}.published_at IS NULL AND {event}.skipped_at IS NULL"
    cursor.execute(
        f"UPDATE {outbox} SET {set_outbox} FROM (VALUES {values}) AS a{fence}"
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
            f" AND {event}.seq >= a.column2 AND {event}.seq <= a.column3 AND {pending}",
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
                last_error=internal_error_text(f"{type(error).__name__}: {error}"),
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


def record_gap(claim: Claim, run: ClaimedRun, missing: int) -> bool:
    """The run's pending range does not start at its cursor: event ``missing`` (``next_seq``) is
    gone (deleted behind the services' back). Publishing what follows would break the run's
    order and the acknowledgement could never advance the cursor (it is fenced on ``next_seq``),
    so the run is blocked, with an error naming the missing seq, until an operator skips the gap
    (``skip_outbox_event`` moves the cursor to the next existing event) or retries. One
    statement, fenced by the lease and the cursor. Returns whether it was recorded."""
    alias = db_alias()
    error = f"gap: event seq {missing} is missing"
    with transaction.atomic(using=alias):
        recorded = (
            RunOutbox.objects.using(alias)
            .filter(run_id=run.run_id, lease_token=claim.token, next_seq=missing)
            .update(blocked_at=Now(), last_error=error, next_attempt_at=None, **NO_LEASE)
        )
    if recorded:
        logger.error(
            "outbox of run %s blocked: %s (skip_outbox_event moves past it)", run.run_id, error
        )
    return bool(recorded)


class LeaseKeeper:
    """Keeps a claim's leases alive while the relay publishes, from the process's keeper thread.

    A publish that outlasts ``LEASE_SECONDS`` would otherwise let another relay take the run
    over, publish it again, and have its own acknowledgement fenced off in turn: two relays can
    then deliver a run's batch again and again and never advance it. Every ``LEASE_SECONDS / 3``
    after the claim, the keeper thread renews (one fenced ``UPDATE``, on the thread's own
    connection) the leases the pass still holds; a run it finds taken over is marked lost and the
    pass neither publishes nor releases it.

    One keeper thread per process (:class:`_KeeperThread`), started on the first pass that needs
    it and idle between passes, serves every pass: starting and joining a thread per pass cost
    about 1 ms, some 5% of a pass. The thread opens its connection only when it first renews (a
    pass shorter than a third of the lease never does) and closes it as soon as no pass is
    registered; ``stop`` returns once that is done, so a pass leaves no connection open.

    Used in autocommit mode only: inside a caller's transaction (tests) another connection
    could not see the claim; the pass then renews between publishes instead.
    """

    def __init__(self, claim: Claim, interval: float) -> None:
        self.token = claim.token
        self.interval = interval
        self._held = {run.run_id for run in claim.runs}
        self._lost: set[str] = set()
        self._due = time.monotonic() + interval  # when the keeper thread renews next
        self._thread = _keeper_thread

    @classmethod
    def start(cls, claim: Claim) -> LeaseKeeper | None:
        """A keeper for ``claim``, registered with the keeper thread, or None where one cannot
        work (inside a transaction, an in-memory SQLite database)."""
        connection = connection_for_write()
        if not claim.runs or connection.in_atomic_block:
            return None
        if connection.vendor == "sqlite" and getattr(connection, "is_in_memory_db", bool)():
            return None
        keeper = cls(claim, float(runs_settings.LEASE_SECONDS) / 3)
        keeper._thread.add(keeper)
        return keeper

    def lost(self, run_id: str) -> bool:
        with self._thread.lock:
            return run_id in self._lost

    def let_go(self, run_ids: Collection[str]) -> None:
        """Stop renewing these (acknowledged, failed, released): call before the write that
        clears their lease."""
        with self._thread.lock:
            self._held.difference_update(run_ids)

    def stop(self) -> None:
        """No renewal for this claim from now on: returns when none is under way and, if no
        other pass is registered, the keeper thread's connection is closed."""
        if not self._thread.remove(
            keeper=self, timeout=max(float(runs_settings.LEASE_SECONDS), 1.0)
        ):
            logger.warning("lease keeper %s did not stop in time", self.token)


class _KeeperThread:
    """The thread that renews the leases of every registered :class:`LeaseKeeper` of this
    process, each on its own schedule. Started by the first ``add``, stopped by
    :func:`stop_lease_keeper` (the relay loop's end) and at process exit; a daemon, so a process
    that never stops it does not hang at exit (it holds no connection while idle)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()  # guards everything here and the keepers' run sets
        self._keepers: set[LeaseKeeper] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._renewing: LeaseKeeper | None = None  # whose renewal is under way
        self._connected = False  # the thread may have a connection open

    def add(self, keeper: LeaseKeeper) -> None:
        with self.lock:
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._connected = False
                self._thread = threading.Thread(
                    target=self._run, name="runs_app lease keeper", daemon=True
                )
                self._thread.start()
            self._keepers.add(keeper)
            self.lock.notify_all()

    def remove(self, *, keeper: LeaseKeeper, timeout: float) -> bool:
        """Unregister ``keeper``; wait (up to ``timeout``) until no renewal of its is under way
        and, when it was the last, the thread's connection is closed. False on timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self._keepers.discard(keeper)
            self.lock.notify_all()
            while self._alive() and (
                self._renewing is keeper or (self._connected and not self._keepers)
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(remaining)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Let the thread end once no keeper is registered (joined if none is now)."""
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
            thread, idle = self._thread, not self._keepers
        if thread is not None and idle and thread is not threading.current_thread():
            thread.join(timeout)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    keeper = self._wait_for_work()
                    if keeper is None:
                        if not self._connected:
                            self._thread = None  # stopping, nothing registered: the next add
                            return  # starts a new thread
                        held: list[str] = []
                    else:
                        held = sorted(keeper._held)
                        self._renewing = keeper
                        self._connected = True
                if keeper is None:
                    # The last pass left: close the connection now, not at the next renewal.
                    connections.close_all()  # this thread's connections only
                    with self.lock:
                        self._connected = False
                        self.lock.notify_all()
                    continue
                try:
                    self._renew(keeper, held)
                finally:
                    with self.lock:
                        self._renewing = None
                        self.lock.notify_all()
        finally:
            connections.close_all()  # this thread's connections only
            with self.lock:
                if self._thread is threading.current_thread():  # ended by an error
                    self._thread = None
                    self._connected = False
                self.lock.notify_all()

    def _wait_for_work(self) -> LeaseKeeper | None:
        """With the lock held: the keeper whose renewal is due (its next one scheduled), or None
        when no keeper is registered and the connection should be closed or the thread end."""
        while True:
            if not self._keepers:
                if self._connected or self._stopping:
                    return None
                self.lock.wait()
                continue
            now = time.monotonic()
            keeper = min(self._keepers, key=lambda k: k._due)
            if keeper._due <= now:
                keeper._due = now + keeper.interval
                if keeper._held:
                    return keeper
                continue
            self.lock.wait(keeper._due - now)

    def _renew(self, keeper: LeaseKeeper, held: list[str]) -> None:
        try:
            renewed = renew_leases(keeper.token, held)
        except Exception:  # the pass's own statements will meet the same error
            logger.warning("renewing leases failed", exc_info=True)
            return
        with self.lock:
            taken = (set(held) - renewed) & keeper._held
            keeper._lost |= taken
            keeper._held -= taken
        for run_id in sorted(taken):
            logger.warning("lease of run %s was taken over by another relay", run_id)


_keeper_thread = _KeeperThread()


def stop_lease_keeper() -> None:
    """End this process's lease keeper thread (the relay loop's end, process exit); the next
    pass that needs one starts it again."""
    _keeper_thread.stop()


def _new_keeper_thread_after_fork() -> None:
    # A forked child has no keeper thread, and the parent's lock may have been held at the fork.
    global _keeper_thread
    _keeper_thread = _KeeperThread()


os.register_at_fork(after_in_child=_new_keeper_thread_after_fork)
atexit.register(stop_lease_keeper)


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


def lease_until_sql() -> tuple[str, list[Any]]:
    """The SQL of a new lease's end, ``db_now_plus(LEASE_SECONDS)``, and its parameters:
    compiled once per alias and lease length (0.2 ms a claim otherwise)."""
    sql, params = _compiled_lease_until(db_alias(), float(runs_settings.LEASE_SECONDS))
    return sql, list(params)


@functools.lru_cache(maxsize=64)
def _compiled_lease_until(alias: str, seconds: float) -> tuple[str, tuple[Any, ...]]:
    sql, params = compile_expression(db_now_plus(dt.timedelta(seconds=seconds)))
    return sql, tuple(params)


@functools.lru_cache(maxsize=16)
def compiled_now(alias: str) -> str:
    """The SQL of Django's ``Now()`` on ``alias`` (``STATEMENT_TIMESTAMP()`` on PostgreSQL),
    which takes no parameter there."""
    sql, params = compile_expression(Now())
    if params:
        raise NotImplementedError(f"unexpected parameters for Now(): {params}")
    return sql


def compile_expression(expression: Any) -> tuple[str, list[Any]]:
    query = RunOutbox.objects.using(db_alias()).all().query
    compiler = query.get_compiler(db_alias())
    sql, params = compiler.compile(expression.resolve_expression(query))
    return sql, list(params)
