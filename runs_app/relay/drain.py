"""One pass of the relay: claim, read, publish one run at a time, acknowledge.

How a pass works (``drain_outbox_once``):

1. **Claim** (one short transaction, :mod:`.lease`): lease runs that have pending events, are
   not blocked, whose backoff is over and whose lease is free or expired.
2. **Read** the pending events of all claimed runs in one query (:mod:`.read`).
3. **Publish** one run's messages per ``publish()`` call, outside any transaction; a failure
   belongs to that run alone.
4. **Acknowledge** all runs that published in one short transaction
   (:func:`.lease.acknowledge_batches`).

A failed publish keeps the events pending and sets a backoff (``attempts`` + 1, ``last_error``,
``next_attempt_at``); at ``MAX_ATTEMPTS`` the run is blocked until ``retry_outbox`` or
``skip_outbox_event``. Other runs keep draining.

Called inside a caller's ``atomic()`` (a Django ``TestCase``, the ``runs_outbox`` fixture in a
``django_db`` test) everything still works: claim and ack become savepoints and the publish runs
inside the caller's transaction. That is for tests; a production relay runs in autocommit mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..conf import runs_settings
from ..db import db_alias
from ..exceptions import RunNotFound
from ..models import Run, RunOutbox
from ..publishers import Message, Publisher, close_publisher, load_publisher
from ..services.validation import run_id_of, validate_positive_int, validate_run_id
from . import lease
from .lease import Claim, ClaimedRun, claim_runs, record_failure
from .read import read_claimed

logger = lease.logger


@dataclass(frozen=True)
class DrainResult:
    """What one or more passes did. ``failed_runs``: runs whose publish failed (their events stay
    pending), in the order of the failures; ``runs_touched``: runs claimed."""

    published: int = 0
    failed_runs: tuple[str, ...] = ()
    runs_touched: int = 0

    def __add__(self, other: DrainResult) -> DrainResult:
        return DrainResult(
            self.published + other.published,
            self.failed_runs + other.failed_runs,
            self.runs_touched + other.runs_touched,
        )


def drain_outbox_once(
    *,
    publisher: Publisher | None = None,
    batch_size: int | None = None,
    run_id: str | None = None,
    max_messages: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DrainResult:
    """One pass: claim up to ``batch_size`` runs, publish up to ``batch_size`` pending events of
    each (one ``publish()`` call per run, seq order), acknowledge the runs that succeeded (one
    transaction for all of them).

    Args:
        publisher: the publisher instance; None builds the configured ``PUBLISHER`` (closed again
            at the end of the call).
        batch_size: events per run and runs per claim (default ``DRAIN_BATCH_SIZE``).
        run_id: only this run.
        max_messages: publish at most this many messages in this pass.
        should_stop: checked before each run; when it returns True the pass stops, acknowledges
            the batches in hand and releases the leases it has not used.

    Returns:
        ``DrainResult``; ``runs_touched == 0`` means nothing was claimable right now.

    A database error propagates (the leases this pass holds expire after ``LEASE_SECONDS``).
    """
    size = validate_positive_int("batch_size", batch_size, runs_settings.DRAIN_BATCH_SIZE)
    budget = (
        None if max_messages is None else validate_positive_int("max_messages", max_messages, 1)
    )
    only = None if run_id is None else [validate_run_id(run_id)]
    with _publisher_for_call(publisher) as active:
        claim = claim_runs(size if budget is None else min(size, budget), run_ids=only)
        return _drain_claim(claim, active, size, budget, should_stop, loop=False)


def drain_outbox_for_run(
    run: Run | str, *, publisher: Publisher | None = None, batch_size: int | None = None
) -> DrainResult:
    """Drain one run until nothing is pending or a publish fails, ignoring its backoff (not its
    blocked state, nor another relay's live lease). Batch after batch under one lease, renewed
    by each acknowledgement. For tests and tools.

    Raises ``RunNotFound``.
    """
    run_id = run_id_of(run)
    if not RunOutbox.objects.using(db_alias()).filter(run_id=run_id).exists():
        raise RunNotFound(run_id)
    size = validate_positive_int("batch_size", batch_size, runs_settings.DRAIN_BATCH_SIZE)
    with _publisher_for_call(publisher) as active:
        claim = claim_runs(1, run_ids=[run_id], ignore_backoff=True)
        return _drain_claim(claim, active, size, None, None, loop=True)


def _drain_claim(
    claim: Claim,
    publisher: Publisher,
    size: int,
    budget: int | None,
    should_stop: Callable[[], bool] | None,
    *,
    loop: bool,
) -> DrainResult:
    """Publish and acknowledge what ``claim`` leased: per pass one read of every run's pending
    events, one ``publish()`` per run, then one acknowledgement for all runs that published.
    ``loop`` (one run, ``drain_outbox_for_run``): passes again while a run fills its batch."""

    def stopping() -> bool:
        return budget == 0 or (should_stop is not None and should_stop())

    published = 0
    failed: list[str] = []
    release: list[str] = []  # leased, nothing to publish or never reached: given back at the end
    runs = list(claim.runs)
    while runs:
        limit = size if budget is None else min(size, budget)
        batches = read_claimed([(run.run_id, run.next_seq) for run in runs], limit)
        in_hand: list[tuple[ClaimedRun, list[Message]]] = []  # published, not acknowledged yet
        again: list[ClaimedRun] = []
        for index, run in enumerate(runs):
            if stopping():
                release.extend(other.run_id for other in runs[index:])
                break
            if lease.monotonic() - run.renewed_at >= float(runs_settings.LEASE_SECONDS) / 2:
                # Half-way to expiry: acknowledge what is in hand (clearing those leases), then
                # renew the leases of the runs still to do, so a long pass never outlives them.
                published += _acknowledge_in_hand(claim, in_hand, again, limit, loop, stopping)
                in_hand = []
                if run.run_id not in _renew_rest(claim, runs[index:]):
                    continue  # taken over by another relay: not ours to publish or release
            messages = batches.get(run.run_id, [])
            if budget is not None:
                messages = messages[:budget]
            if not messages:
                release.append(run.run_id)
                continue
            try:
                publisher.publish(messages)
            except Exception as exc:
                record_failure(claim, run, exc)
                failed.append(run.run_id)
                continue
            if budget is not None:
                budget -= len(messages)
            in_hand.append((run, messages))
        published += _acknowledge_in_hand(claim, in_hand, again, limit, loop, stopping)
        runs = again
    if release:
        lease.release_leases(claim, release)
    return DrainResult(published, tuple(failed), len(claim.runs))


def _acknowledge_in_hand(
    claim: Claim,
    in_hand: Sequence[tuple[ClaimedRun, list[Message]]],
    again: list[ClaimedRun],
    limit: int,
    loop: bool,
    stopping: Callable[[], bool],
) -> int:
    """Acknowledge the published batches in hand (one transaction); return how many messages
    that recorded. In ``loop`` mode a run that filled its batch keeps its lease (renewed) and is
    appended to ``again`` for the next pass."""
    if not in_hand:
        return 0
    stop = stopping()
    keep = {run.run_id for run, messages in in_hand if loop and not stop and len(messages) == limit}
    acked = lease.acknowledge_batches(
        claim.token,
        [(run.run_id, messages[0].seq, messages[-1].seq) for run, messages in in_hand],
        keep_lease=keep,
    )
    now = lease.monotonic()
    count = 0
    for run, messages in in_hand:
        if run.run_id not in acked:
            logger.warning(
                "lease of run %s lost before its acknowledgement: %d message(s) will be "
                "published again (LEASE_SECONDS=%s is shorter than the publish took)",
                run.run_id,
                len(messages),
                runs_settings.LEASE_SECONDS,
            )
            continue
        count += len(messages)
        run.next_seq = messages[-1].seq + 1
        run.attempts = 0
        run.renewed_at = now
        if run.run_id in keep:
            again.append(run)
    return count


def _renew_rest(claim: Claim, rest: Sequence[ClaimedRun]) -> set[str]:
    """Renew the leases of ``rest`` (the runs of the pass still to do); return those still ours."""
    held = lease.renew_leases(claim.token, [run.run_id for run in rest])
    now = lease.monotonic()
    for run in rest:
        if run.run_id in held:
            run.renewed_at = now
    return held


@contextmanager
def _publisher_for_call(publisher: Publisher | None) -> Iterator[Publisher]:
    if publisher is not None:
        yield publisher
        return
    built = load_publisher()
    try:
        yield built
    finally:
        close_publisher(built)
