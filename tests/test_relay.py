"""The relay, deterministically, in one process: what is claimed, published, acknowledged."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs_app import relay, services
from runs_app.exceptions import InvalidInput, OutboxNotBlocked, RunNotFound
from runs_app.models import Run, RunEvent, RunOutbox
from runs_app.publishers import Message
from runs_app.testing import MemoryPublisher
from tests.helpers import snapshot
from tests.relay_helpers import ROOT, assert_cursor_invariant

pytestmark = pytest.mark.django_db


def make_run(name: str, events: int = 0) -> Run:
    return services.create_run(
        name, run_id=name, events=[{"type": "step", "payload": {"n": n}} for n in range(events)]
    )


class RecordingCalls(MemoryPublisher):
    """Keeps each publish() call separately, and can fail for chosen runs."""

    def __init__(self, fail_runs: Sequence[str] = ()) -> None:
        super().__init__()
        self.calls: list[list[Message]] = []
        self.fail_runs = set(fail_runs)

    def publish(self, messages: Sequence[Message]) -> None:
        self.calls.append(list(messages))
        if messages[0].run_id in self.fail_runs:
            raise RuntimeError(f"broker down for {messages[0].run_id}")
        super().publish(messages)


def delivered(publisher: MemoryPublisher) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for message in publisher.messages:
        seqs.setdefault(message.run_id, []).append(message.seq)
    return seqs


def outbox(run_id: str) -> RunOutbox:
    return RunOutbox.objects.get(run_id=run_id)


def no_lease_held() -> bool:
    return not RunOutbox.objects.filter(lease_token__isnull=False).exists()


def test_drain_once_publishes_exactly_the_pending_events_per_run_in_order() -> None:
    make_run("a", 3)
    make_run("b", 0)
    make_run("c", 5)
    publisher = RecordingCalls()

    result = relay.drain_outbox_once(publisher=publisher)

    assert result == relay.DrainResult(published=11, failed_runs=(), runs_touched=3)
    assert delivered(publisher) == {"a": [1, 2, 3, 4], "b": [1], "c": [1, 2, 3, 4, 5, 6]}
    # One publish() call per run: a failure belongs to that run alone.
    assert [{m.run_id for m in call} for call in publisher.calls] == [{"a"}, {"b"}, {"c"}]
    assert [outbox(run).next_seq for run in "abc"] == [5, 2, 7]
    assert not RunEvent.objects.filter(published_at__isnull=True).exists()
    assert no_lease_held()
    assert_cursor_invariant()

    assert relay.drain_outbox_once(publisher=publisher) == relay.DrainResult()
    assert len(publisher.messages) == 11


def test_message_carries_the_event() -> None:
    run = services.create_run("billing", run_id="r1", events=[{"type": "x.y", "payload": {"k": 1}}])
    publisher = MemoryPublisher()
    relay.drain_outbox_once(publisher=publisher)

    event = RunEvent.objects.get(run=run, seq=2)
    message = publisher.messages[1]
    assert message == Message(
        id="r1:2",
        run_id="r1",
        scope="billing",
        seq=2,
        type="x.y",
        payload={"k": 1},
        occurred_at=event.created_at,
    )
    # The same instant and the same label as the ORM gives it (PostgreSQL's read loads the
    # timestamp with psycopg's loader, not Django's, and must label it as Django does).
    assert message.occurred_at.tzinfo == event.created_at.tzinfo
    assert message.occurred_at.isoformat() == event.created_at.isoformat()


def test_only_new_events_after_a_drain() -> None:
    run = make_run("a", 1)
    publisher = MemoryPublisher()
    relay.drain_outbox_once(publisher=publisher)
    services.append_events(run, [{"type": "late"}])
    services.complete_run(run)

    relay.drain_outbox_once(publisher=publisher)

    assert [(m.seq, m.type) for m in publisher.messages[2:]] == [(3, "late"), (4, "run.completed")]


def test_nothing_drains_unless_asked() -> None:
    threads_before = set(threading.enumerate())
    make_run("a", 2)
    assert set(threading.enumerate()) == threads_before
    assert RunEvent.objects.filter(published_at__isnull=True).count() == 3
    assert outbox("a").next_seq == 1


def test_batch_size_bounds_events_per_publish_and_runs_per_claim() -> None:
    for name in ("a", "b", "c"):
        make_run(name, 4)  # seqs 1..5
    publisher = RecordingCalls()

    first = relay.drain_outbox_once(publisher=publisher, batch_size=2)

    assert first == relay.DrainResult(published=4, failed_runs=(), runs_touched=2)
    assert delivered(publisher) == {"a": [1, 2], "b": [1, 2]}
    while relay.drain_outbox_once(publisher=publisher, batch_size=2).runs_touched:
        pass
    assert delivered(publisher) == {run: [1, 2, 3, 4, 5] for run in "abc"}
    assert max(len(call) for call in publisher.calls) == 2
    assert_cursor_invariant()


def test_run_filter_and_max_messages() -> None:
    make_run("a", 3)
    make_run("b", 3)
    publisher = MemoryPublisher()

    assert relay.drain_outbox_once(publisher=publisher, run_id="b").published == 4
    assert set(delivered(publisher)) == {"b"}

    make_run("c", 3)
    result = relay.drain_outbox_once(publisher=publisher, max_messages=3)
    assert result.published == 3
    assert delivered(publisher)["a"] == [1, 2, 3]
    assert outbox("a").next_seq == 4
    assert outbox("c").next_seq == 1
    assert no_lease_held()  # the unused lease of "c" was given back
    assert_cursor_invariant()


def test_should_stop_finishes_the_batch_in_hand_and_releases_the_rest() -> None:
    for name in ("a", "b", "c"):
        make_run(name, 2)
    publisher = MemoryPublisher()
    stop = threading.Event()

    class StopAfterFirst(MemoryPublisher):
        def publish(self, messages: Sequence[Message]) -> None:
            publisher.publish(messages)
            stop.set()  # as a SIGTERM handler would, while this batch is in hand

    result = relay.drain_outbox_once(publisher=StopAfterFirst(), should_stop=stop.is_set)

    assert result.published == 3
    assert delivered(publisher) == {"a": [1, 2, 3]}
    assert outbox("a").next_seq == 4
    assert no_lease_held()
    assert_cursor_invariant()


def test_invalid_arguments_write_nothing() -> None:
    make_run("a", 1)
    before = snapshot()
    publisher = MemoryPublisher()
    for kwargs, field in (
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"max_messages": -1}, "max_messages"),
        ({"run_id": "has space"}, "run_id"),
    ):
        with pytest.raises(InvalidInput) as raised:
            relay.drain_outbox_once(publisher=publisher, **kwargs)
        assert raised.value.field == field
    assert snapshot() == before
    assert publisher.messages == []
    with pytest.raises(RunNotFound):
        relay.drain_outbox_for_run("missing", publisher=publisher)


@override_settings(
    RUNS_APP={"MAX_ATTEMPTS": 3, "RETRY_BASE_SECONDS": 5.0, "RETRY_MAX_SECONDS": 50.0}
)
def test_failing_run_backs_off_then_blocks_while_others_drain() -> None:
    make_run("bad", 1)
    make_run("good", 1)
    publisher = RecordingCalls(fail_runs=["bad"])

    before = timezone.now()
    result = relay.drain_outbox_once(publisher=publisher)
    after = timezone.now()

    assert result == relay.DrainResult(published=2, failed_runs=("bad",), runs_touched=2)
    assert delivered(publisher) == {"good": [1, 2]}
    bad = outbox("bad")
    assert (bad.attempts, bad.next_seq, bad.blocked_at) == (1, 1, None)
    assert bad.last_error == "RuntimeError: broker down for bad"
    assert bad.lease_token is None and bad.lease_until is None and bad.leased_by == ""
    assert bad.next_attempt_at is not None
    # Database clock; first retry after RETRY_BASE_SECONDS (SQLite keeps milliseconds).
    tolerance = dt.timedelta(seconds=1)
    assert before + dt.timedelta(seconds=5) - tolerance <= bad.next_attempt_at
    assert bad.next_attempt_at <= after + dt.timedelta(seconds=5) + tolerance
    assert not RunEvent.objects.filter(run_id="bad", published_at__isnull=False).exists()

    # Backing off: not claimable until next_attempt_at has come.
    assert relay.drain_outbox_once(publisher=publisher) == relay.DrainResult()
    for attempts in (2, 3):
        RunOutbox.objects.filter(run_id="bad").update(
            next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
        )
        assert relay.drain_outbox_once(publisher=publisher).failed_runs == ("bad",)
        assert outbox("bad").attempts == attempts

    bad = outbox("bad")
    assert bad.blocked_at is not None and bad.next_attempt_at is None
    assert relay.drain_outbox_once(publisher=publisher) == relay.DrainResult()
    assert relay.drain_outbox_for_run("bad", publisher=publisher) == relay.DrainResult()
    assert_cursor_invariant()

    publisher.fail_runs.clear()
    services.retry_outbox("bad")
    bad = outbox("bad")
    assert (bad.blocked_at, bad.attempts, bad.next_attempt_at) == (None, 0, None)
    assert relay.drain_outbox_once(publisher=publisher).published == 2
    assert delivered(publisher)["bad"] == [1, 2]
    assert outbox("bad").last_error == ""
    assert_cursor_invariant()


@override_settings(RUNS_APP={"MAX_ATTEMPTS": 1})
def test_skip_outbox_event_skips_the_head_of_a_blocked_run() -> None:
    run = make_run("a", 3)  # seqs 1..4
    RunOutbox.objects.filter(run=run).update(next_seq=2)
    RunEvent.objects.filter(run=run, seq=1).update(published_at=timezone.now())

    class PoisonSeq2(MemoryPublisher):
        def publish(self, messages: Sequence[Message]) -> None:
            if any(m.seq == 2 for m in messages):
                raise ValueError("cannot encode seq 2")
            super().publish(messages)

    publisher = PoisonSeq2()
    assert relay.drain_outbox_once(publisher=publisher).failed_runs == ("a",)
    assert outbox("a").blocked_at is not None
    with pytest.raises(OutboxNotBlocked):
        services.skip_outbox_event(make_run("other"))

    skipped = services.skip_outbox_event(run)

    assert skipped is not None
    assert (skipped.seq, skipped.type) == (2, "step")
    assert skipped.skipped_at is not None and skipped.published_at is None
    box = outbox("a")
    assert (box.next_seq, box.blocked_at, box.attempts, box.next_attempt_at) == (3, None, 0, None)
    record = RunEvent.objects.get(run=run, type="outbox.skipped")
    assert record.seq == 5
    assert record.payload == {
        "seq": 2,
        "type": "step",
        "attempts": 1,
        "last_error": "ValueError: cannot encode seq 2",
    }
    assert_cursor_invariant()

    relay.drain_outbox_once(publisher=publisher)
    assert [(m.seq, m.type) for m in publisher.messages if m.run_id == "a"] == [
        (3, "step"),
        (4, "step"),
        (5, "outbox.skipped"),
    ]
    assert RunEvent.objects.get(run=run, seq=2).published_at is None
    assert_cursor_invariant()
    with pytest.raises(OutboxNotBlocked):
        services.skip_outbox_event(run)  # not blocked (and nothing pending)
    with pytest.raises(RunNotFound):
        services.skip_outbox_event("missing")
    with pytest.raises(RunNotFound):
        services.retry_outbox("missing")


def test_skip_works_on_a_closed_run() -> None:
    run = make_run("a", 1)
    services.complete_run(run)
    RunOutbox.objects.filter(run=run).update(blocked_at=timezone.now(), attempts=10)
    services.skip_outbox_event(run)
    assert RunEvent.objects.filter(run=run).order_by("-seq").first().type == "outbox.skipped"  # type: ignore[union-attr]


@override_settings(RUNS_APP={"RETRY_BASE_SECONDS": 2.0, "RETRY_MAX_SECONDS": 60.0})
def test_backoff_is_exponential_with_jitter_within_bounds() -> None:
    for attempts in range(1, 40):
        delays = [relay.backoff_seconds(attempts) for _ in range(50)]
        top = min(60.0, 2.0 * 2 ** (attempts - 1))
        assert all(max(2.0, top / 2) <= delay <= top for delay in delays), attempts
        assert all(2.0 <= delay <= 60.0 for delay in delays)
    assert len({relay.backoff_seconds(5) for _ in range(20)}) > 1  # jitter


def test_a_live_lease_is_respected_and_an_expired_one_taken_over() -> None:
    make_run("a", 1)
    other = uuid.uuid4()
    RunOutbox.objects.filter(run_id="a").update(
        lease_token=other,
        leased_by="elsewhere:1",
        lease_until=timezone.now() + dt.timedelta(minutes=5),
    )
    publisher = MemoryPublisher()
    assert relay.drain_outbox_once(publisher=publisher) == relay.DrainResult()
    assert relay.drain_outbox_for_run("a", publisher=publisher) == relay.DrainResult()

    RunOutbox.objects.filter(run_id="a").update(
        lease_until=timezone.now() - dt.timedelta(seconds=1)
    )
    assert relay.drain_outbox_once(publisher=publisher).published == 2
    assert no_lease_held()


def test_claim_sets_lease_from_the_database_clock() -> None:
    make_run("a", 1)
    with override_settings(RUNS_APP={"LEASE_SECONDS": 30}):
        before = timezone.now()
        claim = relay.claim_runs(10)
        after = timezone.now()
    box = outbox("a")
    assert [run.run_id for run in claim.runs] == ["a"]
    assert box.lease_token == claim.token
    assert box.leased_by.endswith(f":{os.getpid()}")
    assert box.lease_until is not None
    tolerance = dt.timedelta(seconds=1)
    assert before + dt.timedelta(seconds=30) - tolerance <= box.lease_until
    assert box.lease_until <= after + dt.timedelta(seconds=30) + tolerance
    assert relay.claim_runs(10).runs == []  # leased: not claimable twice


def test_stale_acknowledgement_changes_nothing() -> None:
    make_run("a", 2)
    stale = relay.claim_runs(10)
    stale_messages = relay.read_pending("a", 1, 100)
    # Relay A stalls past its lease; relay B takes the run over.
    RunOutbox.objects.filter(run_id="a").update(
        lease_until=timezone.now() - dt.timedelta(seconds=1)
    )
    fresh = relay.claim_runs(10)
    assert fresh.token != stale.token and [r.run_id for r in fresh.runs] == ["a"]

    before = snapshot()
    assert relay.acknowledge(stale.token, "a", stale_messages) is False
    assert snapshot() == before  # 0 rows changed

    assert relay.acknowledge(fresh.token, "a", stale_messages) is True
    after_b = snapshot()
    # Late again, after B acknowledged: still nothing.
    assert relay.acknowledge(stale.token, "a", stale_messages) is False
    assert snapshot() == after_b
    assert outbox("a").next_seq == 4
    assert_cursor_invariant()


def test_stale_failure_and_release_change_nothing() -> None:
    make_run("a", 1)
    stale = relay.claim_runs(10)
    RunOutbox.objects.filter(run_id="a").update(
        lease_until=timezone.now() - dt.timedelta(seconds=1)
    )
    relay.claim_runs(10)
    before = snapshot()
    # Not recorded, so not reported as blocked, whatever MAX_ATTEMPTS says.
    with override_settings(RUNS_APP={"MAX_ATTEMPTS": 1}):
        assert relay.record_failure(stale, stale.runs[0], RuntimeError("late")) is False
    relay.release_leases(stale, ["a"])
    assert relay.renew_leases(stale.token, ["a"]) == set()
    assert snapshot() == before


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@override_settings(RUNS_APP={"LEASE_SECONDS": 60})
def test_leases_are_renewed_during_a_long_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b", "c"):
        make_run(name, 1)
    clock = FakeClock()
    monkeypatch.setattr(relay.lease, "monotonic", clock)
    leases: dict[str, Any] = {}

    class SlowBroker(MemoryPublisher):
        def publish(self, messages: Sequence[Message]) -> None:
            box = outbox(messages[0].run_id)
            leases[messages[0].run_id] = (box.lease_token, box.lease_until)
            clock.now += 40  # each publish takes 40 s: past half the lease
            super().publish(messages)

    with CaptureQueriesContext(connection) as queries:
        result = relay.drain_outbox_once(publisher=SlowBroker())

    assert result.published == 6
    renewals = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith(f'UPDATE "{RunOutbox._meta.db_table}" SET "lease_until"')
    ]
    assert len(renewals) == 2  # before "b" and before "c"
    assert leases["a"][1] <= leases["b"][1] <= leases["c"][1]
    assert len({token for token, _ in leases.values()}) == 1
    assert no_lease_held()


def test_a_run_whose_lease_was_lost_is_not_published(monkeypatch: pytest.MonkeyPatch) -> None:
    make_run("a", 0)
    make_run("b", 0)
    clock = FakeClock()
    monkeypatch.setattr(relay.lease, "monotonic", clock)
    thief = uuid.uuid4()

    class StallingBroker(MemoryPublisher):
        def publish(self, messages: Sequence[Message]) -> None:
            # While "a" is published, our lease on "b" expires and another relay takes it.
            clock.now += 3600
            RunOutbox.objects.filter(run_id="b").update(
                lease_token=thief, lease_until=timezone.now() + dt.timedelta(minutes=1)
            )
            super().publish(messages)

    publisher = StallingBroker()
    result = relay.drain_outbox_once(publisher=publisher)

    assert result == relay.DrainResult(published=1, failed_runs=(), runs_touched=2)
    assert delivered(publisher) == {"a": [1]}
    assert outbox("b").lease_token == thief  # untouched: not ours to release


def test_drain_outbox_for_run_loops_under_one_renewed_lease() -> None:
    run = make_run("a", 6)  # seqs 1..7
    make_run("other", 1)
    RunOutbox.objects.filter(run=run).update(
        next_attempt_at=timezone.now() + dt.timedelta(hours=1), attempts=2
    )
    seen: list[tuple[Any, Any, int]] = []

    class Observing(MemoryPublisher):
        def publish(self, messages: Sequence[Message]) -> None:
            box = outbox("a")
            seen.append((box.lease_token, box.lease_until, len(messages)))
            super().publish(messages)

    publisher = Observing()
    result = relay.drain_outbox_for_run(run, publisher=publisher, batch_size=3)

    assert result == relay.DrainResult(published=7, failed_runs=(), runs_touched=1)
    assert [size for _, _, size in seen] == [3, 3, 1]
    assert [m.seq for m in publisher.messages] == [1, 2, 3, 4, 5, 6, 7]
    assert len({token for token, _, _ in seen}) == 1 and seen[0][0] is not None
    assert all(until is not None for _, until, _ in seen)
    assert no_lease_held()
    assert outbox("other").next_seq == 1  # only that run
    assert_cursor_invariant()


def test_drain_outbox_for_run_stops_at_a_failure() -> None:
    make_run("a", 4)
    publisher = RecordingCalls(fail_runs=["a"])
    result = relay.drain_outbox_for_run("a", publisher=publisher, batch_size=2)
    assert result == relay.DrainResult(published=0, failed_runs=("a",), runs_touched=1)
    assert len(publisher.calls) == 1
    assert outbox("a").attempts == 1


def test_works_inside_a_callers_transaction() -> None:
    from django.db import transaction

    make_run("a", 1)
    publisher = MemoryPublisher()
    with transaction.atomic():
        assert relay.drain_outbox_once(publisher=publisher).published == 2
    assert outbox("a").next_seq == 3


def test_configured_publisher_is_built_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    make_run("a", 1)
    with caplog.at_level("INFO", logger="runs_app.publishers"):
        assert relay.drain_outbox_once().published == 2
    assert [r.getMessage().split()[1] for r in caplog.records] == ["a:1", "a:2"]


def test_query_count_is_constant_per_claim_not_per_run_or_event() -> None:
    def queries_for(runs: int, events: int, tag: str) -> int:
        for index in range(runs):
            make_run(f"{tag}{index}", events)
        with CaptureQueriesContext(connection) as captured:
            assert relay.drain_outbox_once(publisher=MemoryPublisher()).runs_touched == runs
        return len(captured)

    small = queries_for(2, 1, "s")
    bigger = queries_for(4, 1, "m")
    many_events = queries_for(4, 50, "l")
    # One read and one acknowledgement (two statements, its savepoints) per claim.
    assert small == bigger == many_events


# --- retention ----------------------------------------------------------------------------


def test_prune_outbox_deletes_only_old_published_events_in_batches() -> None:
    old = timezone.now() - dt.timedelta(hours=2)
    run = make_run("a", 6)  # seqs 1..7
    RunOutbox.objects.filter(run=run).update(next_seq=6)
    RunEvent.objects.filter(run=run, seq__lte=5).update(published_at=old)
    RunEvent.objects.filter(run=run, seq=5).update(published_at=timezone.now())  # recent
    RunEvent.objects.filter(run=run, seq=4).update(published_at=None, skipped_at=old)
    # Inconsistent on purpose: published but at next_seq. Never pruned.
    RunEvent.objects.filter(run=run, seq=6).update(published_at=old)

    with CaptureQueriesContext(connection) as queries:
        assert services.prune_outbox(3600, batch_size=2) == 3
    deletes = [q for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 2

    assert list(RunEvent.objects.filter(run=run).values_list("seq", flat=True)) == [4, 5, 6, 7]
    assert services.prune_outbox(dt.timedelta(hours=1)) == 0
    assert services.prune_outbox(0) == 1  # seq 5, published just now
    assert list(RunEvent.objects.filter(run=run).values_list("seq", flat=True)) == [4, 6, 7]


def test_prune_outbox_refuses_bad_input() -> None:
    for value in (-1, "10", None, True):
        with pytest.raises(InvalidInput) as raised:
            services.prune_outbox(value)  # type: ignore[arg-type]
        assert raised.value.field == "older_than"
    with pytest.raises(InvalidInput):
        services.prune_outbox(10, batch_size=0)


def test_relay_imports_on_its_own_and_the_services_never_import_it() -> None:
    assert relay.skip_outbox_event is services.skip_outbox_event  # kept for compatibility
    assert not hasattr(services, "drain_outbox_once")  # the relay is not a service
    code = (
        "import sys, django; django.setup(); "
        "from runs_app import services; "
        "from runs_app.services import prune_outbox, skip_outbox_event, retry_outbox; "
        "assert not [m for m in sys.modules if m.startswith('runs_app.relay')], 'relay loaded'; "
        "import runs_app.relay"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "example_project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_run_with_nothing_at_its_cursor_is_never_claimed() -> None:
    # A broken invariant (an unpublished event below next_seq, e.g. edited by hand) must not
    # make a relay claim the run pass after pass with nothing to publish.
    make_run("a", 1)
    RunOutbox.objects.filter(run_id="a").update(next_seq=3)
    assert relay.claim_runs(10).runs == []
    assert relay.drain_until_idle(publisher=MemoryPublisher()) == relay.DrainResult()


def test_batched_acknowledgement_fences_each_run_by_lease_and_cursor() -> None:
    for name in ("a", "moved", "stolen"):
        make_run(name, 2)  # seqs 1..3
    claim = relay.claim_runs(10)
    batches = relay.read_claimed([(run.run_id, run.next_seq) for run in claim.runs], 10)
    assert {run_id: [m.seq for m in ms] for run_id, ms in batches.items()} == {
        run: [1, 2, 3] for run in ("a", "moved", "stolen")
    }
    RunOutbox.objects.filter(run_id="stolen").update(lease_token=uuid.uuid4())
    RunOutbox.objects.filter(run_id="moved").update(next_seq=2)  # another writer moved it
    stolen_before, moved_before = outbox("stolen"), outbox("moved")

    acked = relay.acknowledge_batches(
        claim.token, [(run_id, ms[0].seq, ms[-1].seq) for run_id, ms in batches.items()]
    )

    assert acked == {"a"}
    assert outbox("a").next_seq == 4 and outbox("a").lease_token is None
    for before in (stolen_before, moved_before):  # 0 rows changed for the fenced runs
        after = outbox(before.run_id)
        assert (after.next_seq, after.lease_token, after.lease_until) == (
            before.next_seq,
            before.lease_token,
            before.lease_until,
        )
    assert set(
        RunEvent.objects.filter(published_at__isnull=False).values_list("run_id", flat=True)
    ) == {"a"}


def test_the_pending_predicate_is_defined_once_and_is_the_index_condition() -> None:
    from runs_app.models import PENDING_EVENT

    (index,) = [i for i in RunEvent._meta.indexes if i.name == "runs_app_event_pending"]
    assert index.condition == PENDING_EVENT
    make_run("a", 2)  # seqs 1..3
    RunEvent.objects.filter(run_id="a", seq=1).update(published_at=timezone.now())
    RunEvent.objects.filter(run_id="a", seq=2).update(skipped_at=timezone.now())
    assert list(RunEvent.objects.pending().values_list("seq", flat=True)) == [3]


def test_run_ids_with_quotes_backslashes_commas_and_braces_drain_and_acknowledge() -> None:
    # On PostgreSQL the pass's run ids travel as array literals (runs_app.db.pg_array): a wrong
    # escape would read another run's events or fence off the acknowledgement.
    names = ['q"uote', "back\\slash", "com,ma", "{brace}", "NULL", "é-ü"]
    for name in names:
        make_run(name, events=2)
    publisher = MemoryPublisher()
    result = relay.drain_outbox_once(publisher=publisher)
    assert result.published == 3 * len(names)  # the run's creation event, then its two
    assert delivered(publisher) == {name: [1, 2, 3] for name in names}
    assert {row.run_id: row.next_seq for row in RunOutbox.objects.all()} == dict.fromkeys(names, 4)
    assert not RunEvent.objects.filter(published_at__isnull=True).exists()
    assert_cursor_invariant()


def test_the_read_decodes_payloads_as_json_loads_does() -> None:
    from runs_app.relay.read import _decode_json

    for text in ('{"k": [1, 2.5, "x", null, true]}', "{}", "[]", '"s"', "3"):
        assert _decode_json(text) == json.loads(text)
    assert _decode_json(' {"k": 1} ') == {"k": 1}  # not jsonb's output, still decoded
    for bad in ("", "{", '{"k": 1} x', "nope"):
        with pytest.raises(json.JSONDecodeError):
            _decode_json(bad)


@pytest.mark.postgresql
def test_a_session_in_another_zone_still_gives_the_instant_in_the_connection_zone() -> None:
    run = services.create_run("billing", run_id="r1")
    stored = RunEvent.objects.get(run=run, seq=1).created_at
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
    try:
        message = relay.read_pending("r1", 1, 10)[0]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE %s", [connection.timezone_name])
    assert message.occurred_at == stored
    assert message.occurred_at.tzinfo == connection.timezone
