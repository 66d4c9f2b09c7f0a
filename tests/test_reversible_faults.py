"""Fault injection on the write paths of reversible cleanup (issue 12), and attacks on its
guarantees: fail the k-th statement of each path, for every k, on SQLite and PostgreSQL.

One transaction (``restore_cleanup``, in delete and soft mode, its dry run; recording a refusal
with its withheld plan) must leave every table as it was (``assert_atomic_under_faults``).
Several transactions (a soft cleanup's batches, an approved cleanup's approval then batches, a
flush that revives) may have committed their earlier ones, so each check proves the invariants
after every fault (``check_under_faults``): never a tombstone without its audit record, ledgers
equal to the rows, never ``done`` while rows remain, never more removed than approved.

The attacks then try to reach a success state with partial work or a row lost: pruned audits,
a cleanup cut off half-way, settings changed between a cut-off and its rerun, rows moved to
another scope, deleted foreign key targets, typed values through the audit and back.

Transactional tests (real commits): "nothing changed" is what another connection would see.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.db import models
from django.db.models import Model
from django.test import override_settings
from django.utils import timezone

from runs_app import services
from runs_app.exceptions import CleanupRefused, RestoreRefused
from runs_app.models import (
    CleanupStatus,
    Run,
    RunEvent,
    RunModelState,
    RunOutbox,
    RunState,
)
from runs_app.tracking import sync_spec
from tests.helpers import (
    InjectedFault,
    assert_atomic_under_faults,
    check_under_faults,
    failing_statement,
    snapshot,
    temporary_tracked_model,
)
from tests.test_reversible_cleanup import asset, device, line, sync
from tests.tracked_app.models import Asset, Device, Membership, Site

pytestmark = pytest.mark.django_db(transaction=True)

UIDS = [uuid.UUID(int=index + 1) for index in range(60)]
SOFT_BATCHES = {"CLEANUP_BATCH_SIZE": 3, "CLEANUP_MAX_DELETE_FRACTION": 1.0}


def ensure_site() -> Site:
    return Site.objects.get_or_create(id=7, defaults={"name": "Paris"})[0]


def audit(run: Run, model: type[Model], suffix: str = "removed") -> list[dict[str, Any]]:
    """The records of the run's ``<sync_name>.<suffix>`` events, in order."""
    kind = f"{sync_spec(model).event_prefix}.{suffix}"
    return [
        record
        for event in RunEvent.objects.filter(run=run, type=kind).order_by("seq")
        for record in event.payload["rows"]
    ]


def columns(model: type[Model], **filters: Any) -> dict[Any, dict[str, Any]]:
    """Every column of every row (through the base manager), by primary key; bytes as bytes
    (PostgreSQL gives a memoryview)."""
    return {
        row["id"]: {
            name: bytes(value) if isinstance(value, memoryview) else value
            for name, value in row.items()
        }
        for row in model._base_manager.filter(**filters).values()
    }


def decoded(field: Any, value: Any) -> Any:
    """A column of an audit record as ``values()`` gives it."""
    if value is None:
        return None
    if isinstance(field, models.BinaryField):
        return bytes.fromhex(value[2:])  # "\\x" and hex digits, as row_to_json writes bytea
    if isinstance(field, models.DurationField) and isinstance(value, int):
        return dt.timedelta(microseconds=value)  # SQLite stores microseconds
    return field.to_python(value)


def as_stored(model: type[Model], record: dict[str, Any]) -> dict[str, Any]:
    """An audit record as ``values()`` gives the row: each column through its field."""
    return {
        field.attname: decoded(field, record[field.column]) for field in model._meta.concrete_fields
    }


def state(run: Run) -> RunState:
    return RunState.objects.get(run=run)


def attempt(action: Any) -> Any:
    try:
        return action()
    except CleanupRefused as refused:
        return refused


def prune_events(run: Run, events: list[RunEvent]) -> int:
    """Publish ``events`` an hour ago (the relay's acknowledgement, as its columns say it), then
    ``prune_outbox``: they are gone from the outbox, as after a retention period."""
    RunEvent.objects.filter(pk__in=[event.pk for event in events]).update(
        published_at=timezone.now() - dt.timedelta(hours=1)
    )
    top = max(event.seq for event in events)
    RunOutbox.objects.filter(run=run).update(next_seq=top + 1)
    return services.prune_outbox(0)


# -- restore: one transaction ----------------------------------------------------------------


def test_restoring_a_deleting_cleanup_is_all_or_nothing() -> None:
    """20 devices, the run saw 10: 10 removed in 4 audit events; since then a newer flush
    re-created one of them (a conflict) and one row's site was deleted (a conflict too). Any
    fault: every table as before. Then the restore puts back the 8 others, every column as
    removed, and reports both conflicts."""
    ensure_site()
    Site.objects.create(id=8, name="Lyon")
    sync(Device, "acme", range(20))
    Device.objects.filter(uid=UIDS[13]).update(site_id=8)
    run = sync(Device, "acme", range(10))
    before = columns(Device)
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3}):
        assert services.safe_cleanup(run, Device).removed == 10
    assert RunEvent.objects.filter(run=run, type="tracked_app.device.removed").count() == 4
    Site.objects.filter(id=8).delete()  # the site of device 13 is gone
    newer = services.create_run("acme")
    with services.flush(newer, Device) as flush:
        flush.write([device(11) | {"name": "back again"}])

    preview = services.restore_cleanup(run, Device, dry_run=True)
    faults = assert_atomic_under_faults(
        lambda: services.restore_cleanup(run, Device, restored_by="ops")
    )

    assert faults >= 4 + 2  # lock, line, 4 inserts, their events, ledgers, cleanup.restored
    after = columns(Device)
    back = {pk for pk, row in before.items() if row["uid"] not in (UIDS[11], UIDS[13])}
    assert {pk: after[pk] for pk in back} == {pk: before[pk] for pk in back}
    assert after[next(pk for pk in after if after[pk]["uid"] == UIDS[11])]["name"] == "back again"
    assert not Device.objects.filter(uid=UIDS[13]).exists()
    ledger = line(run, Device)
    assert (ledger.rows_restored, ledger.restore_conflicts, ledger.restored_by) == (8, 2, "ops")
    assert (preview.restored, preview.conflicts) == (8, 2)
    assert len(audit(run, Device, "restored")) == 8
    assert services.restore_cleanup(run, Device).already_restored


def test_restoring_a_soft_cleanup_is_all_or_nothing() -> None:
    """12 assets, the run saw 4: 8 tombstoned in 3 events. Since then one tombstoned row was
    purged by hand (it comes back from the audit, an INSERT) and one was revived by a newer
    flush (a conflict). Any fault: every table as before."""
    ensure_site()
    sync(Asset, "acme", range(12))
    run = sync(Asset, "acme", range(4))
    before = columns(Asset)
    with override_settings(RUNS_APP=SOFT_BATCHES):
        assert services.safe_cleanup(run, Asset).removed == 8
    purged = Asset.objects.get(code="a009")
    Asset.objects.filter(pk=purged.pk).delete()
    newer = services.create_run("acme")
    with services.flush(newer, Asset) as flush:
        assert flush.write([asset(5, name="revived")]).revived == 1

    faults = assert_atomic_under_faults(lambda: services.restore_cleanup(run, Asset))

    assert faults >= 3 * 2 + 3
    after = columns(Asset)
    assert Asset.objects.tombstoned().count() == 0
    for pk, row in before.items():
        if row["code"] != "a005":
            assert after[pk] == row, row["code"]  # the purged one too: same pk, every column
    assert after[next(pk for pk in after if after[pk]["code"] == "a005")]["name"] == "revived"
    ledger = line(run, Asset)
    assert (ledger.rows_restored, ledger.restore_conflicts) == (7, 1)


def test_a_dry_run_restore_writes_nothing_under_faults_or_without() -> None:
    ensure_site()
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(5))
    with override_settings(RUNS_APP=SOFT_BATCHES):
        services.safe_cleanup(run, Asset)
    before = snapshot()
    assert_atomic_under_faults(lambda: services.restore_cleanup(run, Asset, dry_run=True))
    assert snapshot() == before
    assert services.restore_cleanup(run, Asset, dry_run=True).restored == 5


# -- a soft cleanup of several batches ---------------------------------------------------------


@dataclass
class SoftCase:
    run: Run
    before: dict[Any, dict[str, Any]]
    doomed: set[str]  # codes the run did not see


def check_soft_cleanup(case: SoftCase) -> set[str]:
    """Every tombstone of the run has exactly one audit record, holding the row as it is now;
    no row the run saw is tombstoned; the ledgers count exactly the tombstones; ``done`` only
    when no live row of the run's plan is left. Returns the codes tombstoned."""
    rows = columns(Asset, tenant="acme")
    tombstoned = {row["code"]: row for row in rows.values() if row["deleted_by_run_id"]}
    assert set(tombstoned) <= case.doomed, "a row the run saw was tombstoned"
    assert {row["deleted_by_run_id"] for row in tombstoned.values()} <= {case.run.pk}
    records = audit(case.run, Asset)
    assert sorted(record["code"] for record in records) == sorted(tombstoned), "audit != rows"
    for record in records:
        assert as_stored(Asset, record) == tombstoned[record["code"]]
    for pk, row in rows.items():  # nothing else changed
        if row["code"] not in tombstoned:
            assert row == case.before[pk]
        else:
            untouched = ("deleted_at", "deleted_by_run_id", "deleted_reason")
            assert {k: v for k, v in row.items() if k not in untouched} == {
                k: v for k, v in case.before[pk].items() if k not in untouched
            }
    ledger = line(case.run, Asset)
    assert ledger.rows_removed == len(tombstoned) == state(case.run).rows_removed
    if ledger.cleanup_status == CleanupStatus.DONE:
        assert set(tombstoned) == case.doomed, "done while rows remain"
    assert Asset.objects.filter(tenant="other", deleted_at__isnull=False).count() == 0
    return set(tombstoned)


def test_a_soft_cleanup_of_several_batches_never_tombstones_without_its_audit() -> None:
    def setup() -> SoftCase:
        ensure_site()
        sync(Asset, "acme", range(20))
        sync(Asset, "other", range(20))  # the same codes in another tenant: never touched
        run = sync(Asset, "acme", range(0, 20, 2))
        doomed = {asset(index)["code"] for index in range(1, 20, 2)}
        return SoftCase(run, columns(Asset, tenant="acme"), doomed)

    def action(case: SoftCase) -> None:
        services.safe_cleanup(case.run, Asset)

    def check(case: SoftCase, faulted: bool) -> None:
        check_soft_cleanup(case)
        if faulted:  # the rerun finishes it: nothing twice, nothing more
            services.safe_cleanup(case.run, Asset)
        assert check_soft_cleanup(case) == case.doomed
        assert line(case.run, Asset).cleanup_status == CleanupStatus.DONE

    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3}):
        assert check_under_faults(setup, action, check) >= 4 * 3


# -- an approved cleanup: the approval, then batches -------------------------------------------


@dataclass
class ApprovalCase:
    run: Run
    older: Run
    approved: int
    universe: set[uuid.UUID]  # every device the tenant held (or was given) since the run


def removed_devices(case: ApprovalCase) -> int:
    """Rows gone, each with its one audit record, counted on both ledgers; never more than
    approved."""
    records = [uuid.UUID(str(record["uid"])) for record in audit(case.run, Device)]
    present = set(Device.objects.filter(tenant="acme").values_list("uid", flat=True))
    assert sorted(records) == sorted(case.universe - present), "a row gone without its audit"
    assert len(records) <= case.approved, "more removed than approved"
    ledger = line(case.run, Device)
    assert ledger.rows_removed == len(records) == state(case.run).rows_removed
    return len(records)


def test_an_approved_cleanup_never_removes_more_than_approved_over_reruns() -> None:
    """20 devices, the run saw 5: 15 withheld. Approved for 15, cut off anywhere. Before the
    rerun, 5 more rows become deletable (the project moved them into the tenant, last seen by
    an older run there): the rerun finishes within the approval, 15 in all, never 20."""

    def setup() -> ApprovalCase:
        ensure_site()
        older = sync(Device, "acme", range(20))
        run = sync(Device, "acme", range(5))
        with pytest.raises(CleanupRefused):
            services.safe_cleanup(run, Device)
        assert line(run, Device).withheld_count == 15
        return ApprovalCase(run, older, 15, set(UIDS[:20]))

    def action(case: ApprovalCase) -> None:
        services.safe_cleanup(case.run, Device, approve=15, approved_by="ops")

    def check(case: ApprovalCase, faulted: bool) -> None:
        removed_devices(case)
        if faulted:
            ledger = line(case.run, Device)
            if ledger.cleanup_status == CleanupStatus.REFUSED:  # the approval never committed
                services.safe_cleanup(case.run, Device, approve=15, approved_by="ops")
            else:
                assert ledger.approved_count == 15
                sync(Device, "elsewhere", range(40, 45))
                Device.objects.filter(tenant="elsewhere").update(
                    tenant="acme", last_seen_run=case.older
                )
                case.universe |= set(UIDS[40:45])
                services.safe_cleanup(case.run, Device)
        assert removed_devices(case) == 15
        ledger = line(case.run, Device)
        assert (ledger.cleanup_status, ledger.approved_by) == (CleanupStatus.DONE, "ops")

    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 4}):
        assert check_under_faults(setup, action, check) >= 4 + 4 * 3


def test_recording_a_withheld_plan_is_all_or_nothing() -> None:
    ensure_site()
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(4))
    plan = services.safe_cleanup(run, Device, dry_run=True)
    assert plan.refusal == "too_many_deletions"

    faults = assert_atomic_under_faults(lambda: attempt(lambda: services.safe_cleanup(run, Device)))

    assert faults >= 4
    ledger = line(run, Device)
    assert (ledger.cleanup_status, ledger.cleanup_reason) == ("refused", "too_many_deletions")
    assert ledger.withheld_count == plan.planned == 16
    assert ledger.withheld_keys == list(plan.sample_keys)
    assert Device.objects.count() == 20


# -- a flush that revives ----------------------------------------------------------------------


@dataclass
class ReviveCase:
    run: Run
    tombstoned: set[str]


def test_a_flush_that_revives_counts_exactly_the_rows_it_revived() -> None:
    """12 assets, 6 tombstoned by a soft cleanup; a newer run flushes all 12 in batches of 3
    (input reversed). After any fault, every committed batch is whole, a row is live exactly
    when a committed batch listed it or no cleanup tombstoned it, and rows_revived on the
    ledger line equals the revived rows and the events' counts."""

    def setup() -> ReviveCase:
        ensure_site()
        sync(Asset, "acme", range(12))
        cleaning = sync(Asset, "acme", range(6))
        services.safe_cleanup(cleaning, Asset)
        tombstoned = set(Asset.objects.tombstoned().values_list("code", flat=True))
        assert len(tombstoned) == 6
        return ReviveCase(services.create_run("acme"), tombstoned)

    def action(case: ReviveCase) -> None:
        with services.flush(case.run, Asset, batch_size=3) as flush:
            flush.write(asset(index, name="v2") for index in reversed(range(12)))

    def check(case: ReviveCase, faulted: bool) -> None:
        rows = {row.code: row for row in Asset.objects.all()}
        stamped = {code for code, row in rows.items() if row.last_seen_run_id == case.run.pk}
        for start in range(0, 12, 3):  # the batches, as the input gave them
            batch = {asset(11 - i)["code"] for i in range(start, start + 3)}
            assert stamped & batch in (set(), batch), "a partial batch"
        revived = stamped & case.tombstoned
        for code, row in rows.items():
            assert (row.deleted_at is None) == (code in stamped or code not in case.tombstoned)
            assert (row.name == "v2") == (code in stamped)
        ledger = RunModelState.objects.filter(run=case.run, model=sync_spec(Asset).label).first()
        flushed = RunEvent.objects.filter(run=case.run, type="assets.flushed")
        assert sum(event.payload["revived"] for event in flushed) == len(revived)
        assert (ledger.rows_revived if ledger else 0) == len(revived)
        assert (ledger.rows_seen if ledger else 0) == len(stamped)
        if not faulted:
            assert revived == case.tombstoned

    assert check_under_faults(setup, action, check) >= 4 * 4


# -- purging tombstones -------------------------------------------------------------------------


@dataclass
class PurgeCase:
    run: Run
    tombstoned: dict[Any, dict[str, Any]]  # the run's tombstoned rows, every column


def aged_soft_cleanup() -> PurgeCase:
    """Assets 0-11, the run saw 0-3: 8 tombstoned, their tombstones set two days ago."""
    ensure_site()
    sync(Asset, "acme", range(12))
    run = sync(Asset, "acme", range(4))
    with override_settings(RUNS_APP=SOFT_BATCHES):
        services.safe_cleanup(run, Asset)
    Asset.objects.tombstoned().update(deleted_at=timezone.now() - dt.timedelta(days=2))
    return PurgeCase(run, columns(Asset, deleted_at__isnull=False))


def test_a_purge_of_several_batches_never_deletes_a_row_without_its_audit() -> None:
    def action(case: PurgeCase) -> None:
        services.purge_tombstones(Asset, dt.timedelta(days=1), batch_size=3)

    def check(case: PurgeCase, faulted: bool) -> None:
        rows = columns(Asset)
        purged = set(case.tombstoned) - set(rows)
        records = audit(case.run, Asset, "purged")
        assert sorted(record["id"] for record in records) == sorted(purged)
        for record in records:
            assert as_stored(Asset, record) == case.tombstoned[record["id"]]
        assert line(case.run, Asset).rows_purged == len(purged)
        assert len(rows) == 12 - len(purged)
        if not faulted:
            assert len(purged) == 8

    assert check_under_faults(aged_soft_cleanup, action, check) >= 3 * 3


def test_a_soft_cleanup_purged_since_is_restored_from_its_audit() -> None:
    """The tombstoned rows were purged for good: the restore inserts them back from the
    cleanup's audit, with their primary keys and every column as before the cleanup."""
    ensure_site()
    sync(Asset, "acme", range(12))
    run = sync(Asset, "acme", range(4))
    before = columns(Asset)
    with override_settings(RUNS_APP=SOFT_BATCHES):
        services.safe_cleanup(run, Asset)
    Asset.objects.tombstoned().update(deleted_at=timezone.now() - dt.timedelta(days=2))
    assert services.purge_tombstones(Asset, dt.timedelta(days=1)).purged == 8

    result = services.restore_cleanup(run, Asset)

    assert (result.restored, result.conflicts, result.missing) == (8, 0, 0)
    assert columns(Asset) == before


# -- attacks -------------------------------------------------------------------------------------


def test_a_soft_restore_after_its_audit_was_pruned_reports_no_row_missing_that_came_back() -> None:
    """A soft cleanup's rows never left: with an audit event pruned, the restore still clears
    their tombstones (found by ``deleted_by_run``), so none of them is ``missing``: restored,
    conflicts and missing add up to what the ledger says was removed."""
    ensure_site()
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(4))
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 2, "CLEANUP_MAX_DELETE_FRACTION": 1}):
        assert services.safe_cleanup(run, Asset).removed == 6
    first = RunEvent.objects.filter(run=run, type="assets.removed").order_by("seq")[:1]
    assert prune_events(run, list(first)) == 1

    result = services.restore_cleanup(run, Asset)

    assert Asset.objects.tombstoned().count() == 0
    assert (result.restored, result.conflicts, result.missing) == (6, 0, 0)
    done = RunEvent.objects.get(run=run, type="cleanup.restored")
    assert done.payload["missing"] == 0


def test_a_deleting_restore_after_a_partial_prune_restores_what_is_left_and_counts_the_rest() -> (
    None
):
    ensure_site()
    sync(Device, "acme", range(10))
    run = sync(Device, "acme", range(4))
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 2, "CLEANUP_MAX_DELETE_FRACTION": 1}):
        services.safe_cleanup(run, Device)
    removed = list(RunEvent.objects.filter(run=run, type="tracked_app.device.removed"))
    assert len(removed) == 3
    prune_events(run, removed[:1])

    result = services.restore_cleanup(run, Device)

    assert (result.restored, result.conflicts, result.missing) == (4, 0, 2)
    assert Device.objects.count() == 8
    assert line(run, Device).rows_restored == 4


def test_a_deleting_restore_whose_whole_audit_was_pruned_is_refused_and_writes_nothing() -> None:
    ensure_site()
    sync(Device, "acme", range(10))
    run = sync(Device, "acme", range(6))
    services.safe_cleanup(run, Device)
    prune_events(run, list(RunEvent.objects.filter(run=run)))
    before = snapshot()
    with pytest.raises(RestoreRefused) as refused:
        services.restore_cleanup(run, Device)
    assert refused.value.reason == "audit_missing"
    assert snapshot() == before


def test_a_cleanup_cut_off_half_way_is_restored_exactly_and_never_resumed() -> None:
    ensure_site()
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(10))
    before = columns(Device)
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 4}):
        for k in range(1, 100):  # cut off once a batch committed and before the end
            with failing_statement(k), pytest.raises(InjectedFault):
                services.safe_cleanup(run, Device)
            if line(run, Device).rows_removed:
                break
    half = line(run, Device)
    assert half.cleanup_status == CleanupStatus.IN_PROGRESS and 0 < half.rows_removed < 10

    result = services.restore_cleanup(run, Device)

    assert (result.restored, result.missing) == (half.rows_removed, 0)
    assert columns(Device) == before
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device)
    assert refused.value.reason == "cleanup_restored"
    assert columns(Device) == before


def test_an_approval_after_a_partial_cleanup_keeps_the_ledger_equal_to_the_rows() -> None:
    """A cleanup cut off after its first batch; CLEANUP_MAX_DELETE_COUNT is lowered before the
    rerun, which is refused and withholds the rest; the operator approves it. The ledger line
    must still count every row the run's cleanup removed (the audit says so): the approval
    does not start the count again."""
    ensure_site()
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(10))
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3}):
        for k in range(1, 100):
            with failing_statement(k), pytest.raises(InjectedFault):
                services.safe_cleanup(run, Device)
            if line(run, Device).rows_removed:
                break
        first = line(run, Device).rows_removed
        assert first == 3
        with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3, "CLEANUP_MAX_DELETE_COUNT": 5}):
            with pytest.raises(CleanupRefused):
                services.safe_cleanup(run, Device)
            assert line(run, Device).withheld_count == 7
            result = services.safe_cleanup(run, Device, approve=7, approved_by="ops")

    assert result.removed == 7
    ledger = line(run, Device)
    assert ledger.rows_removed == len(audit(run, Device)) == 10 == state(run).rows_removed
    assert Device.objects.count() == 10
    restored = services.restore_cleanup(run, Device)
    assert (restored.restored, restored.missing) == (10, 0)


def test_an_approval_cut_off_after_a_partial_cleanup_stays_within_what_was_approved() -> None:
    """As above, and the approved cleanup is itself cut off after its first batch: the rerun
    removes what is left of the approval, no more, even with more rows deletable by then."""
    ensure_site()
    older = sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(10))
    settings = {"CLEANUP_BATCH_SIZE": 3, "CLEANUP_MAX_DELETE_COUNT": 5}
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3}):
        for k in range(1, 100):
            with failing_statement(k), pytest.raises(InjectedFault):
                services.safe_cleanup(run, Device)
            if line(run, Device).rows_removed:
                break
    with override_settings(RUNS_APP=settings):
        with pytest.raises(CleanupRefused):
            services.safe_cleanup(run, Device)
        for k in range(1, 100):  # the approval, or once it committed the rerun, cut off
            refused = line(run, Device).cleanup_status == CleanupStatus.REFUSED
            options: dict[str, Any] = {"approve": 7, "approved_by": "ops"} if refused else {}
            with failing_statement(k), pytest.raises(InjectedFault):
                services.safe_cleanup(run, Device, **options)
            if line(run, Device).rows_removed > 3:
                break
        assert line(run, Device).rows_removed == 6
        sync(Device, "elsewhere", range(40, 45))  # 5 more rows become deletable
        Device.objects.filter(tenant="elsewhere").update(tenant="acme", last_seen_run=older)
        services.safe_cleanup(run, Device)

    ledger = line(run, Device)
    assert ledger.cleanup_status == CleanupStatus.DONE
    assert ledger.rows_removed == len(audit(run, Device)) == 3 + 7 == state(run).rows_removed
    assert Device.objects.filter(tenant="acme").count() == 20 + 5 - 10


def test_approving_after_the_source_came_back_is_refused_and_removes_nothing() -> None:
    ensure_site()
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(4))
    with pytest.raises(CleanupRefused):
        services.safe_cleanup(run, Device)
    sync(Device, "acme", range(20))  # the source is back, whole

    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device, approve=16, approved_by="ops")

    assert refused.value.reason == "superseded"
    assert Device.objects.count() == 20
    assert line(run, Device).withheld_count is None  # nothing left to approve
    with pytest.raises(CleanupRefused) as again:
        services.safe_cleanup(run, Device, approve=16, approved_by="ops")
    assert again.value.reason == "nothing_withheld"


def test_a_grace_of_2_counts_only_completed_runs_that_flushed_the_model() -> None:
    """Between two misses of a row: a failed run (it saw the row), a completed run that flushed
    another model only. Neither counts as a look at the source: the row is removed after the
    second completed run that flushed assets and missed it, not before."""
    ensure_site()
    with override_settings(RUNS_APP={"CLEANUP_GRACE_RUNS": 2}):
        sync(Asset, "acme", range(10))
        first_miss = sync(Asset, "acme", range(9))
        failed = services.create_run("acme")
        with services.flush(failed, Asset) as flush:
            flush.write(asset(index) for index in range(10))  # saw a009 again
        services.fail_run(failed, "gave up")
        devices_only = sync(Device, "acme", range(3))
        with pytest.raises(CleanupRefused) as refused:
            services.safe_cleanup(devices_only, Asset)
        assert refused.value.reason == "not_flushed"
        assert services.safe_cleanup(first_miss, Asset, dry_run=True).refusal == "superseded"
        second_miss = sync(Asset, "acme", range(9))
        plan = services.safe_cleanup(second_miss, Asset, dry_run=True)
        # a009 was last seen by the failed run, after first_miss: one completed miss only.
        assert (plan.planned, plan.waiting) == (0, 1)
        assert services.safe_cleanup(second_miss, Asset).removed == 0
        third_miss = sync(Asset, "acme", range(9))
        assert services.safe_cleanup(third_miss, Asset).removed == 1
    assert list(Asset.objects.tombstoned().values_list("code", flat=True)) == ["a009"]


def test_a_grace_of_2_on_a_whole_table_model() -> None:
    def members(run: Run, count: int) -> None:
        with services.flush(run, Membership) as flush:
            flush.write({"repo_id": 1, "login": f"u{i}", "role": "r"} for i in range(count))

    with override_settings(RUNS_APP={"CLEANUP_GRACE_RUNS": 2}):
        runs = []
        for count in (10, 9, 9):
            run = services.create_run("org")
            members(run, count)
            runs.append(services.complete_run(run))
            result = services.safe_cleanup(run, Membership)
        assert (result.removed, result.waiting) == (1, 0)
        assert services.safe_cleanup(runs[-1], Membership).removed == 0  # run twice
    assert Membership.objects.count() == 9


def test_soft_rows_moved_to_another_scope() -> None:
    """A live row moved by the project into another tenant is never tombstoned by the first
    tenant's cleanup; a tombstoned row moved since is still the run's to restore."""
    ensure_site()
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(6))
    Asset.objects.filter(tenant="acme", code="a009").update(tenant="other")
    assert services.safe_cleanup(run, Asset).removed == 3
    moved = Asset.objects.get(code="a009")
    assert moved.deleted_at is None and moved.tenant == "other"
    Asset.objects.filter(tenant="acme", code="a008").update(tenant="elsewhere")

    result = services.restore_cleanup(run, Asset)

    assert (result.restored, result.conflicts) == (3, 0)
    assert Asset.objects.tombstoned().count() == 0
    assert Asset.objects.get(code="a008").tenant == "elsewhere"


def test_a_model_keyed_by_its_primary_key_is_restored_with_its_ids() -> None:
    """Sites (a whole-table model keyed by ``id``, the primary key the source gives)."""

    def sites(names: dict[int, str]) -> Run:
        run = services.create_run("world")
        with services.flush(run, Site) as flush:
            flush.write({"id": key, "name": name} for key, name in names.items())
        return services.complete_run(run)

    sites({1: "a", 2: "b", 3: "c", 4: "d"})
    run = sites({1: "a", 2: "b"})
    before = columns(Site)
    assert services.safe_cleanup(run, Site).removed == 2
    newer = services.create_run("world")
    with services.flush(newer, Site) as flush:
        flush.write([{"id": 4, "name": "D again"}])

    result = services.restore_cleanup(run, Site)

    assert (result.restored, result.conflicts, result.conflict_keys) == (1, 1, (4,))
    assert columns(Site)[3] == before[3]
    assert Site.objects.get(id=4).name == "D again"


TYPED_FIELDS: dict[str, Any] = {
    "code": models.CharField(max_length=20, unique=True),
    "blob": models.BinaryField(null=True),
    "doc": models.JSONField(null=True),
    "doc_strict": models.JSONField(default=dict),
    "at": models.DateTimeField(null=True),
    "day": models.DateField(null=True),
    "clock": models.TimeField(null=True),
    "span": models.DurationField(null=True),
    "ident": models.UUIDField(null=True),
    "money": models.DecimalField(max_digits=12, decimal_places=4, null=True),
    "ratio": models.FloatField(null=True),
    "big": models.BigIntegerField(null=True),
    "flag": models.BooleanField(null=True),
    "text": models.TextField(blank=True, default=""),
    "sync_key": ("code",),
}

TYPED_ROWS: list[dict[str, Any]] = [
    {
        "code": "full",
        "blob": bytes(range(256)),
        "doc": {"s": "é\u00e9日本\U0001f600\"'\\", "n": [1, 2.5, -0.0, 10**20], "b": None},
        "doc_strict": "a bare JSON string",
        "at": dt.datetime(2026, 11, 30, 10, 0, 0, 123456, tzinfo=dt.UTC),
        "day": dt.date(1999, 12, 31),
        "clock": dt.time(23, 59, 59, 999999),
        "span": dt.timedelta(days=3, seconds=7, microseconds=5),
        "ident": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "money": Decimal("12345678.1234"),
        "ratio": 0.1 + 0.2,
        "big": 2**62 + 1,
        "flag": False,
        "text": 'line\nbreak\ttab \\ quote" \u2028',
    },
    {
        "code": "empty",
        "blob": b"",
        "doc": None,
        "doc_strict": [],
        "at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "day": None,
        "clock": dt.time(0, 0),
        "span": dt.timedelta(0),
        "ident": None,
        "money": Decimal("-0.0001"),
        "ratio": 1e-300,
        "big": -(2**63),
        "flag": None,
        "text": "",
    },
    {"code": "kept", "ratio": 123456789.12345679, "flag": True},
]


def test_typed_values_round_trip_through_the_audit_and_the_restore() -> None:
    """Every column of every removed row, compared: bytes, JSON (a bare string in a JSON
    column, nested unicode, big numbers), datetimes with microseconds, dates, times,
    durations, UUIDs, decimals, floats that need 17 digits, 64-bit integers, booleans, NULLs."""
    with temporary_tracked_model("Typed", dict(TYPED_FIELDS)) as model:
        run = services.create_run("acme")
        with services.flush(run, model) as flush:
            flush.write(TYPED_ROWS)
        services.complete_run(run)
        stored = columns(model)
        assert {row["code"]: row["ratio"] for row in stored.values()} == {
            row["code"]: row.get("ratio") for row in TYPED_ROWS
        }
        cleaning = services.create_run("acme")
        with services.flush(cleaning, model) as flush:
            flush.write([TYPED_ROWS[2]])
        cleaning = services.complete_run(cleaning)
        kept_before = columns(model, code="kept")
        with override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_FRACTION": 1.0}):
            assert services.safe_cleanup(cleaning, model).removed == 2

        for record in audit(cleaning, model):
            assert as_stored(model, record) == stored[record["id"]], record["code"]
        result = services.restore_cleanup(cleaning, model)

        assert (result.restored, result.conflicts) == (2, 0)
        after = columns(model)
        for pk in stored:
            if stored[pk]["code"] != "kept":
                assert after[pk] == stored[pk], stored[pk]["code"]
        assert columns(model, code="kept") == kept_before
        for record in audit(cleaning, model, "restored"):
            assert as_stored(model, record) == stored[record["id"]], record["code"]
