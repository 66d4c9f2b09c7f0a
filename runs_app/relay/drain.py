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
from .claim import claim_order, claim_runs
from .lease import Claim, ClaimedRun, record_failure
from .read import read_batches

logger = lease.logger


@dataclass(frozen=True)
class DrainResult:
    """What one or more passes did. ``failed_runs``: runs whose publish failed or that a gap
    blocked (their events stay pending), in the order of the failures; ``runs_touched``: runs
    claimed."""

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
        return _drain_claim(
            claim, active, size, budget, should_stop, loop=False, rotating=only is None
        )


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
    rotating: bool = False,
) -> DrainResult:
    """Publish and acknowledge what ``claim`` leased: per pass one read of every run's pending
    events (bounded by ``DRAIN_MAX_BYTES``), one ``publish()`` per run, then one acknowledgement
    for all runs that published. ``loop`` (one run, ``drain_outbox_for_run``): passes again
    while a run has more. ``rotating``: the claim came from the rotation, which resumes at the
    runs the byte budget left unread.

    The leases are kept alive while the pass publishes (:class:`.lease.LeaseKeeper`, served by
    the process's keeper thread; inside a caller's transaction, renewed between publishes once
    half-way to expiry instead)."""

    def stopping() -> bool:
        return budget == 0 or (should_stop is not None and should_stop())

    published = 0
    failed: list[str] = []
    release: list[str] = []  # leased, nothing to publish or never reached: given back at the end
    keeper = lease.LeaseKeeper.start(claim)
    try:
        runs = list(claim.runs)
        while runs:
            limit = size if budget is None else min(size, budget)
            read = read_batches([(run.run_id, run.next_seq) for run in runs], limit)
            if rotating and read.cut and read.batches:
                claim_order.resume_at(db_alias(), max(read.batches))
            in_hand: list[tuple[ClaimedRun, list[Message]]] = []  # published, not acked yet
            more: set[str] = set()  # runs that have events beyond the batch in hand
            again: list[ClaimedRun] = []
            for index, run in enumerate(runs):
                if stopping():
                    release.extend(other.run_id for other in runs[index:])
                    break
                if keeper is not None:
                    if keeper.lost(run.run_id):
                        continue  # taken over by another relay: not ours to publish or release
                elif lease.monotonic() - run.renewed_at >= float(runs_settings.LEASE_SECONDS) / 2:
                    # Half-way to expiry: acknowledge what is in hand (clearing those leases),
                    # then renew the leases of the runs still to do.
                    published += _acknowledge_in_hand(claim, in_hand, more, again, loop, stopping)
                    in_hand = []
                    if run.run_id not in _renew_rest(claim, runs[index:]):
                        continue  # taken over by another relay: not ours to publish or release
                messages = read.batches.get(run.run_id, [])
                if messages and messages[0].seq != run.next_seq:
                    _let_go(keeper, [run.run_id])
                    if lease.record_gap(claim, run, run.next_seq):
                        failed.append(run.run_id)
                    continue
                contiguous = _contiguous(messages)
                if budget is not None:
                    contiguous = contiguous[:budget]
                if not contiguous:
                    release.append(run.run_id)
                    continue
                if len(contiguous) < len(messages) or len(messages) == limit:
                    more.add(run.run_id)
                elif read.cut and run.run_id == max(read.batches):
                    more.add(run.run_id)  # the byte budget stopped the read inside this run
                try:
                    publisher.publish(contiguous)
                except Exception as exc:
                    _let_go(keeper, [run.run_id])
                    record_failure(claim, run, exc)
                    failed.append(run.run_id)
                    continue
                if budget is not None:
                    budget -= len(contiguous)
                in_hand.append((run, contiguous))
            if keeper is not None:
                keeper.let_go([r.run_id for r, _ in in_hand if not (loop and r.run_id in more)])
            published += _acknowledge_in_hand(claim, in_hand, more, again, loop, stopping)
            runs = again
        if release:
            _let_go(keeper, release)
            lease.release_leases(claim, release)
    finally:
        if keeper is not None:
            keeper.stop()
    return DrainResult(published, tuple(failed), len(claim.runs))


def _contiguous(messages: list[Message]) -> list[Message]:
    """The leading run of consecutive seqs: a hole inside a batch (an event deleted behind the
    services' back) is published up to the hole; the next read finds the hole at the cursor."""
    for index in range(1, len(messages)):
        if messages[index].seq != messages[index - 1].seq + 1:
            return messages[:index]
    return messages


def _let_go(keeper: lease.LeaseKeeper | None, run_ids: list[str]) -> None:
    if keeper is not None:
        keeper.let_go(run_ids)


def _acknowledge_in_hand(
    claim: Claim,
    in_hand: Sequence[tuple[ClaimedRun, list[Message]]],
    more: set[str],
    again: list[ClaimedRun],
    loop: bool,
    stopping: Callable[[], bool],
) -> int:
    """Acknowledge the published batches in hand (one transaction); return how many messages
    that recorded. In ``loop`` mode a run with more to do keeps its lease (renewed) and is
    appended to ``again`` for the next pass."""
    if not in_hand:
        return 0
    stop = stopping()
    keep = {run.run_id for run, _ in in_hand if loop and not stop and run.run_id in more}
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
                "published again (its lease expired while the relay could not renew it)",
                run.run_id,
                len(messages),
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
