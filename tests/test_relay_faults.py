"""Fault injection at every statement of the relay's claim, acknowledgement and failure paths:
no event is lost, and none is marked published without having been handed to the publisher."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence

import pytest
from django.test import override_settings
from django.utils import timezone

from runs_app import relay, services
from runs_app.models import RunEvent, RunOutbox
from runs_app.publishers import Message
from runs_app.testing import MemoryPublisher
from tests.helpers import InjectedFault, assert_atomic_under_faults, failing_statement
from tests.relay_helpers import assert_cursor_invariant

pytestmark = pytest.mark.django_db


class Broker(MemoryPublisher):
    def __init__(self, fail_runs: Sequence[str] = ()) -> None:
        super().__init__()
        self.fail_runs = set(fail_runs)

    def publish(self, messages: Sequence[Message]) -> None:
        if messages[0].run_id in self.fail_runs:
            raise RuntimeError("broker refused")
        super().publish(messages)


def published_ids() -> set[str]:
    return {
        f"{run_id}:{seq}"
        for run_id, seq in RunEvent.objects.filter(published_at__isnull=False).values_list(
            "run_id", "seq"
        )
    }


def all_ids() -> set[str]:
    return {f"{run_id}:{seq}" for run_id, seq in RunEvent.objects.values_list("run_id", "seq")}


def expire_leases_and_backoff() -> None:
    """What time does for a relay that died: its leases expire, backoffs run out."""
    past = timezone.now() - dt.timedelta(seconds=1)
    RunOutbox.objects.filter(lease_token__isnull=False).update(lease_until=past)
    RunOutbox.objects.filter(next_attempt_at__isnull=False).update(next_attempt_at=past)


def assert_faults_lose_nothing(
    drain: Callable[[Broker, int], object], make_runs: Callable[[int], None]
) -> int:
    """For k = 1, 2, ...: fresh runs, fail the k-th statement of ``drain``, check, recover.
    Returns how many statements the drain executes."""
    for k in range(1, 200):
        make_runs(k)
        before = published_ids()
        handed = Broker(fail_runs=[f"bad{k}"])
        with failing_statement(k) as counter:
            try:
                drain(handed, k)
                raised = False
            except InjectedFault:
                raised = True
        # Nothing marked published that was not handed over; the cursor stays consistent.
        assert published_ids() - before <= {message.id for message in handed.messages}, k
        assert_cursor_invariant()
        # Nothing lost: once leases and backoffs run out, a healthy relay delivers the rest.
        expire_leases_and_backoff()
        healthy = Broker()
        while relay.drain_outbox_once(publisher=healthy).runs_touched:
            pass
        assert published_ids() == all_ids(), k
        assert {m.id for m in handed.messages + healthy.messages} >= all_ids() - before, k
        for broker in (handed, healthy):
            seqs: dict[str, list[int]] = {}
            for message in broker.messages:
                seqs.setdefault(message.run_id, []).append(message.seq)
            assert all(run == sorted(run) for run in seqs.values()), k
        assert_cursor_invariant()
        if not raised:
            assert counter.count < k
            return k - 1
    raise AssertionError("the drain never completed without a fault")


@override_settings(RUNS_APP={"MAX_ATTEMPTS": 1000})
def test_faults_in_a_pass() -> None:
    def make_runs(k: int) -> None:
        services.create_run(f"a{k}", run_id=f"a{k}", events=[{"type": "e"}] * 3)
        services.create_run(f"bad{k}", run_id=f"bad{k}", events=[{"type": "e"}])
        services.create_run(f"c{k}", run_id=f"c{k}", events=[{"type": "e"}] * 2)

    statements = assert_faults_lose_nothing(
        lambda broker, k: relay.drain_outbox_once(publisher=broker, batch_size=2), make_runs
    )
    assert statements >= 8  # claim, reads, acks, the failure: each was failed once


@override_settings(RUNS_APP={"MAX_ATTEMPTS": 1000})
def test_faults_while_draining_one_run_in_batches() -> None:
    def make_runs(k: int) -> None:
        services.create_run(f"a{k}", run_id=f"a{k}", events=[{"type": "e"}] * 6)

    def drain(broker: Broker, k: int) -> object:
        return relay.drain_outbox_for_run(f"a{k}", publisher=broker, batch_size=3)

    assert assert_faults_lose_nothing(drain, make_runs) >= 8


@override_settings(RUNS_APP={"MAX_ATTEMPTS": 1})
def test_skip_outbox_event_is_atomic_under_faults() -> None:
    run = services.create_run("a", run_id="a", events=[{"type": "e"}])
    relay.drain_outbox_once(publisher=Broker(fail_runs=["a"]))
    assert RunOutbox.objects.get(run=run).blocked_at is not None

    assert assert_atomic_under_faults(lambda: services.skip_outbox_event(run)) >= 4
    assert RunOutbox.objects.get(run=run).next_seq == 2


def test_retry_outbox_is_atomic_under_faults() -> None:
    run = services.create_run("a", run_id="a")
    RunOutbox.objects.filter(run=run).update(blocked_at=timezone.now(), attempts=3)
    assert assert_atomic_under_faults(lambda: services.retry_outbox(run)) >= 1
    assert RunOutbox.objects.get(run=run).blocked_at is None


def test_prune_outbox_under_faults_deletes_only_published_events() -> None:
    run = services.create_run("a", run_id="a", events=[{"type": "e"}] * 4)
    relay.drain_outbox_once(publisher=Broker(), batch_size=3)
    RunEvent.objects.filter(published_at__isnull=False).update(
        published_at=timezone.now() - dt.timedelta(hours=1)
    )
    for k in range(1, 20):
        with failing_statement(k):
            try:
                services.prune_outbox(60, batch_size=1)
                break
            except InjectedFault:
                pass
        assert set(RunEvent.objects.filter(run=run).values_list("seq", flat=True)) >= {4, 5}
    assert list(RunEvent.objects.filter(run=run).values_list("seq", flat=True)) == [4, 5]


def test_batched_acknowledgement_is_atomic_under_faults() -> None:
    """Both statements of the claim-wide acknowledgement (outbox cursors, then published_at)
    commit together or not at all, whatever the mix of runs it acknowledges or fences off."""
    for name in ("a", "b", "stolen"):
        services.create_run(name, run_id=name, events=[{"type": "e"}] * 2)  # seqs 1..3
    claim = relay.claim_runs(10)
    batches = relay.read_claimed([(run.run_id, run.next_seq) for run in claim.runs], 10)
    RunOutbox.objects.filter(run_id="stolen").update(lease_token=uuid.uuid4())
    acks = [(run_id, messages[0].seq, messages[-1].seq) for run_id, messages in batches.items()]

    assert (
        assert_atomic_under_faults(
            lambda: relay.acknowledge_batches(claim.token, acks, keep_lease=["b"])
        )
        >= 2
    )
    assert set(RunOutbox.objects.filter(next_seq=4).values_list("run_id", flat=True)) == {"a", "b"}
    assert RunOutbox.objects.get(run_id="b").lease_token == claim.token  # kept, renewed
    assert RunOutbox.objects.get(run_id="a").lease_token is None
    assert not RunEvent.objects.filter(run_id="stolen", published_at__isnull=False).exists()
    assert_cursor_invariant()
