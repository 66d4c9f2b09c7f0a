"""Gaps: events deleted behind the services' back (an operator's ORM delete). The relay blocks
the run with an error naming the missing seq, the read model shows it blocked, and
``skip_outbox_event`` moves the cursor past the gap."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from runs_app import inspection, relay, services
from runs_app.exceptions import OutboxNotBlocked
from runs_app.models import Run, RunEvent, RunOutbox
from runs_app.testing import MemoryPublisher
from tests.helpers import InjectedFault, assert_atomic_under_faults, failing_statement
from tests.relay_helpers import assert_cursor_invariant
from tests.scenarios import make_staff

pytestmark = pytest.mark.django_db


def make_run(name: str, events: int) -> Run:
    return services.create_run(name, run_id=name, events=[{"type": "step"}] * events)


def outbox(run_id: str) -> RunOutbox:
    return RunOutbox.objects.get(run_id=run_id)


def seqs(publisher: MemoryPublisher, run_id: str) -> list[int]:
    return [m.seq for m in publisher.messages if m.run_id == run_id]


def gapped_run() -> Run:
    """Run "a": seqs 1..3 delivered, 4..6 pending, the pending head (4) deleted."""
    run = make_run("a", 2)
    relay.drain_outbox_once(publisher=MemoryPublisher())
    services.append_events(run, [{"type": "late"}] * 3)
    RunEvent.objects.filter(run=run, seq=4).delete()
    return run


def test_a_missing_head_blocks_the_run_with_an_error_naming_the_seq() -> None:
    gapped_run()
    make_run("b", 1)
    publisher = MemoryPublisher()

    result = relay.drain_outbox_once(publisher=publisher)

    assert result.failed_runs == ("a",)
    assert seqs(publisher, "a") == []  # nothing out of order, nothing republished
    assert seqs(publisher, "b") == [1, 2]  # other runs drain
    box = outbox("a")
    assert box.blocked_at is not None and box.lease_token is None
    assert box.last_error == "gap: event seq 4 is missing"
    assert box.next_seq == 4
    assert relay.drain_outbox_once(publisher=publisher).runs_touched == 0  # stays blocked
    assert_cursor_invariant()


def test_the_gap_shows_as_blocked_in_inspection_runs_status_and_the_admin(client: Client) -> None:
    gapped_run()
    relay.drain_outbox_once(publisher=MemoryPublisher())

    assert inspection.health().outbox.blocked_runs == 1
    out = StringIO()
    call_command("runs_status", stdout=out)
    assert "  blocked runs        1" in out.getvalue().splitlines()
    client.force_login(make_staff("viewer", "view_run", "view_runoutbox"))
    page = client.get(reverse("admin:runs_app_runoutbox_change", args=["a"]))
    assert page.status_code == 200
    assert "gap: event seq 4 is missing" in page.content.decode()
    listing = client.get(reverse("admin:runs_app_run_changelist") + "?outbox_blocked=yes")
    assert listing.status_code == 200


def test_skip_outbox_event_moves_the_cursor_past_the_gap() -> None:
    run = gapped_run()
    RunEvent.objects.filter(run=run, seq=5).delete()  # a gap of two: 4 and 5
    publisher = MemoryPublisher()
    relay.drain_outbox_once(publisher=publisher)
    assert outbox("a").last_error == "gap: event seq 4 is missing"

    assert services.skip_outbox_event(run) is None  # no event to skip: the gap

    box = outbox("a")
    assert (box.next_seq, box.blocked_at, box.attempts) == (6, None, 0)
    record = RunEvent.objects.get(run=run, type="outbox.skipped")
    assert record.seq == 7
    assert record.payload["gap"] == [4, 5]
    assert record.payload["last_error"] == "gap: event seq 4 is missing"
    relay.drain_outbox_once(publisher=publisher)
    assert seqs(publisher, "a") == [6, 7]
    assert_cursor_invariant()
    with pytest.raises(OutboxNotBlocked):
        services.skip_outbox_event(run)


def test_skipping_a_gap_at_the_tail_moves_the_cursor_to_the_skip_record() -> None:
    run = gapped_run()
    RunEvent.objects.filter(run=run, seq__gte=5).delete()  # 4..6 all gone
    services.append_events(run, [{"type": "after"}])  # seq 7: the gap is seen
    relay.drain_outbox_once(publisher=MemoryPublisher())
    assert outbox("a").blocked_at is not None

    RunEvent.objects.filter(run=run, seq=7).delete()  # nothing left after the gap
    assert services.skip_outbox_event(run) is None
    assert outbox("a").next_seq == 8  # the outbox.skipped record
    publisher = MemoryPublisher()
    relay.drain_outbox_once(publisher=publisher)
    assert [(m.seq, m.type) for m in publisher.messages] == [(8, "outbox.skipped")]
    assert_cursor_invariant()


def test_a_hole_inside_a_batch_is_published_up_to_the_hole_then_blocks() -> None:
    run = make_run("a", 4)  # seqs 1..5
    RunEvent.objects.filter(run=run, seq=3).delete()
    publisher = MemoryPublisher()

    relay.drain_until_idle(publisher=publisher)

    assert seqs(publisher, "a") == [1, 2]
    box = outbox("a")
    assert box.next_seq == 3 and box.last_error == "gap: event seq 3 is missing"
    assert RunEvent.objects.filter(run=run, seq__gte=4, published_at__isnull=True).count() == 2
    assert_cursor_invariant()


def test_drain_outbox_for_run_stops_at_a_gap() -> None:
    run = make_run("a", 4)
    RunEvent.objects.filter(run=run, seq=3).delete()
    publisher = MemoryPublisher()
    result = relay.drain_outbox_for_run(run, publisher=publisher, batch_size=2)
    assert result.failed_runs == ("a",) and seqs(publisher, "a") == [1, 2]
    assert outbox("a").blocked_at is not None


def test_skipping_a_gap_is_atomic_under_faults() -> None:
    run = gapped_run()
    relay.drain_outbox_once(publisher=MemoryPublisher())
    assert assert_atomic_under_faults(lambda: services.skip_outbox_event(run)) >= 4
    assert outbox("a").next_seq == 5


def test_recording_a_gap_under_faults_publishes_nothing_and_keeps_the_cursor() -> None:
    run = gapped_run()
    for k in range(1, 50):
        RunOutbox.objects.filter(run=run).update(
            blocked_at=None, last_error="", lease_token=None, lease_until=None
        )
        publisher = MemoryPublisher()
        with failing_statement(k) as counter:
            try:
                relay.drain_outbox_once(publisher=publisher)
                raised = False
            except InjectedFault:
                raised = True
        box = outbox("a")
        assert publisher.messages == [] and box.next_seq == 4, k
        assert box.blocked_at is None or box.last_error == "gap: event seq 4 is missing", k
        assert_cursor_invariant()
        if not raised:
            assert counter.count < k and box.blocked_at is not None
            return
    raise AssertionError("the drain never completed without a fault")


def test_deleting_a_run_cascades_to_its_undelivered_events_and_the_relay_goes_on() -> None:
    make_run("a", 2)
    make_run("b", 1)
    claim = relay.claim_runs(10)
    batches = relay.read_claimed([(run.run_id, run.next_seq) for run in claim.runs], 10)
    Run.objects.filter(id="a").delete()  # documented: its events go with it, undelivered

    acked = relay.acknowledge_batches(
        claim.token, [(run_id, ms[0].seq, ms[-1].seq) for run_id, ms in batches.items()]
    )

    assert acked == {"b"}
    assert not RunEvent.objects.filter(run_id="a").exists()
    assert relay.drain_outbox_once(publisher=MemoryPublisher()).runs_touched == 0
    assert_cursor_invariant()


def test_the_admin_skip_confirmation_lists_a_gap_and_the_skip_moves_past_it(
    admin_client: Client,
) -> None:
    gapped_run()
    relay.drain_outbox_once(publisher=MemoryPublisher())
    url = reverse("admin:runs_app_run_changelist")
    data = {"action": "skip_blocked_event", "_selected_action": ["a"]}

    html = admin_client.post(url, data).content.decode()
    assert 'id="runs-skip-gaps"' in html and "gap: event seq 4 is missing" in html

    admin_client.post(url, {**data, "post": "yes"}, follow=True)
    assert outbox("a").next_seq == 5 and outbox("a").blocked_at is None
