"""Reversible, gradual cleanup: soft delete and revival, undoing a run's cleanup, a grace period
of N runs, withheld deletions approved up to the size shown. The "Done when" of the issue, each
as a user meets it, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.test import override_settings
from django.test.utils import isolate_apps

from runs_app import services
from runs_app.exceptions import CleanupRefused, InvalidInput, RestoreRefused
from runs_app.models import CleanupStatus, Run, RunEvent, RunModelState
from runs_app.tracking import LiveTrackedManager, TrackedQuerySet, sync_spec
from tests.tracked_app.models import Asset, Device, Site

pytestmark = pytest.mark.django_db(transaction=True)

UIDS = [uuid.UUID(int=index + 1) for index in range(60)]


def device(index: int) -> dict[str, Any]:
    return {
        "uid": UIDS[index],
        "name": f"device {index}",
        "port": 8000 + index,
        "online": index % 2 == 0,
        "price": f"{index}.50",
        "seen_on": "2026-11-30T10:00:00+00:00",
        "attrs": {"rack": index, "tags": ["a", "b"], "label": "x"},
        "site": 7 if index % 3 == 0 else None,
    }


def asset(index: int, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "code": f"a{index:03d}",
        "name": f"asset {index}",
        "size": index,
        "attrs": {"n": index, "s": "text"},
        "seen_on": "2026-11-30T10:00:00+00:00",
        "active": index % 2 == 0,
        "blob": bytes([index % 256, 0, 255]),
    }
    row.update(values)
    return row


def sync(model: type[Any], tenant: str, indexes: range | list[int], **values: Any) -> Run:
    make = device if model is Device else asset
    run = services.create_run(tenant)
    with services.flush(run, model) as flush:
        flush.write(make(index, **values) for index in indexes)
    return services.complete_run(run)


def line(run: Run, model: type[Any]) -> RunModelState:
    return RunModelState.objects.get(run=run, model=sync_spec(model).label)


def rows_of(model: type[Any]) -> list[dict[str, Any]]:
    return list(model.objects.order_by("pk").values())


@pytest.fixture
def site() -> Site:
    return Site.objects.create(id=7, name="Paris")


# -- undo a wrong cleanup (delete mode) -----------------------------------------------------------


def test_a_wrong_cleanup_is_undone_and_every_row_is_back_with_its_primary_key(site: Site) -> None:
    sync(Device, "acme", range(40))
    run = sync(Device, "acme", range(30))  # the source "lost" 10 devices
    before = rows_of(Device)
    assert services.safe_cleanup(run, Device).removed == 10
    assert Device.objects.count() == 30

    result = services.restore_cleanup(run, Device, restored_by="alice")

    assert (result.restored, result.conflicts, result.missing) == (10, 0, 0)
    assert rows_of(Device) == before  # same primary keys, every column as it was
    state = line(run, Device)
    assert state.cleanup_status == CleanupStatus.RESTORED
    assert (state.rows_restored, state.restore_conflicts, state.restored_by) == (10, 0, "alice")
    restored = RunEvent.objects.filter(run=run, type=f"{sync_spec(Device).event_prefix}.restored")
    assert sum(len(event.payload["rows"]) for event in restored) == 10
    done = RunEvent.objects.get(run=run, type="cleanup.restored")
    assert done.payload["restored"] == 10 and done.payload["restored_by"] == "alice"


def test_a_second_restore_restores_nothing_and_says_so(site: Site) -> None:
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(15))
    services.safe_cleanup(run, Device)
    services.restore_cleanup(run, Device)
    events = RunEvent.objects.count()

    again = services.restore_cleanup(run, Device)

    assert again.already_restored and again.restored == 0
    assert RunEvent.objects.count() == events  # nothing written
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device)
    assert refused.value.reason == "cleanup_restored"


def test_a_key_flushed_again_since_is_a_conflict_and_the_rest_comes_back(site: Site) -> None:
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(15))
    services.safe_cleanup(run, Device)  # removes 15..19
    newer = services.create_run("acme")
    with services.flush(newer, Device) as flush:
        flush.write([device(16) | {"name": "back again"}])

    result = services.restore_cleanup(run, Device)

    assert (result.restored, result.conflicts) == (4, 1)
    assert result.conflict_keys == (str(UIDS[16]),)
    assert Device.objects.get(uid=UIDS[16]).name == "back again"  # not overwritten
    assert Device.objects.count() == 20


def test_a_dry_run_lists_what_would_come_back_and_writes_nothing(site: Site) -> None:
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(15))
    services.safe_cleanup(run, Device)
    events = RunEvent.objects.count()

    preview = services.restore_cleanup(run, Device, dry_run=True)

    assert preview.dry_run and preview.restored == 5
    assert preview.sample_keys == tuple(str(uid) for uid in UIDS[15:20])
    assert Device.objects.count() == 15 and RunEvent.objects.count() == events
    assert line(run, Device).cleanup_status == CleanupStatus.DONE


@pytest.mark.parametrize("how", ["never", "refused"])
def test_restoring_a_cleanup_that_removed_nothing_is_refused_and_writes_nothing(
    how: str, site: Site
) -> None:
    sync(Device, "acme", range(20))
    run = sync(Device, "acme", range(2) if how == "refused" else range(20))
    if how == "refused":
        with pytest.raises(CleanupRefused):
            services.safe_cleanup(run, Device)  # too many deletions
    events = RunEvent.objects.count()

    with pytest.raises(RestoreRefused) as refused:
        services.restore_cleanup(run, Device)

    assert refused.value.reason == {"never": "cleanup_not_run", "refused": "cleanup_refused"}[how]
    assert RunEvent.objects.count() == events


# -- soft delete ----------------------------------------------------------------------------------


def test_soft_cleanup_tombstones_and_the_next_sync_revives(site: Site) -> None:
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(8))

    result = services.safe_cleanup(run, Asset)

    assert result.removed == 2 and result.mode == "soft"
    assert Asset.objects.count() == 10 and Asset.objects.live().count() == 8
    gone = Asset.objects.tombstoned().get(code="a008")
    assert gone.deleted_by_run_id == run.pk and gone.deleted_reason == "not_seen"
    assert gone.deleted_at is not None

    again = services.create_run("acme")
    with services.flush(again, Asset) as flush:
        written = flush.write([asset(index) for index in range(9)])
    services.complete_run(again)

    assert written.revived == 1
    back = Asset.objects.get(code="a008")
    assert back.deleted_at is None and back.deleted_by_run_id is None and back.deleted_reason == ""
    assert line(again, Asset).rows_revived == 1
    flushed = RunEvent.objects.filter(run=again, type="assets.flushed").get()
    assert flushed.payload["revived"] == 1


def test_soft_cleanup_is_undone_by_clearing_the_tombstones(site: Site) -> None:
    sync(Asset, "acme", range(10))
    run = sync(Asset, "acme", range(6))
    before = rows_of(Asset)
    services.safe_cleanup(run, Asset)

    result = services.restore_cleanup(run, Asset)

    assert (result.restored, result.conflicts, result.mode) == (4, 0, "soft")
    assert rows_of(Asset) == before
    assert Asset.objects.tombstoned().count() == 0


# -- grace period ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Device, Asset])
def test_a_row_missed_once_is_kept_under_a_grace_of_2_and_removed_after_the_second_miss(
    model: type[Any], site: Site
) -> None:
    with override_settings(RUNS_APP={"CLEANUP_GRACE_RUNS": 2}):
        sync(model, "acme", range(10))
        first_miss = sync(model, "acme", range(9))
        plan = services.safe_cleanup(first_miss, model, dry_run=True)
        assert (plan.planned, plan.waiting) == (0, 1)
        assert services.safe_cleanup(first_miss, model).removed == 0
        assert line(first_miss, model).rows_waiting == 1

        second_miss = sync(model, "acme", range(9))
        result = services.safe_cleanup(second_miss, model)

    assert (result.removed, result.waiting) == (1, 0)
    assert model.objects.live().count() == 9


# -- withheld deletions ---------------------------------------------------------------------------


def test_a_refused_mass_deletion_is_approved_for_its_shown_size(site: Site) -> None:
    sync(Device, "acme", range(40))
    run = sync(Device, "acme", range(10))
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device)
    assert refused.value.reason == "too_many_deletions"
    withheld = line(run, Device)
    assert withheld.withheld_count == 30
    assert withheld.withheld_keys[0] == str(min(UIDS[10:40], key=str))

    result = services.safe_cleanup(run, Device, approve=30, approved_by="alice")

    assert result.removed == 30 and result.approved_by == "alice"
    done = line(run, Device)
    assert (done.approved_by, done.approved_count, done.cleanup_status) == ("alice", 30, "done")
    event = RunEvent.objects.get(run=run, type="cleanup.approved")
    assert event.payload["approved_by"] == "alice" and event.payload["approved_count"] == 30


def test_an_approval_is_refused_again_when_the_plan_grew_past_it(site: Site) -> None:
    sync(Device, "acme", range(40))
    run = sync(Device, "acme", range(10))
    with pytest.raises(CleanupRefused):
        services.safe_cleanup(run, Device)
    # The source shrank further: a second look at the same run's view cannot grow it, so the
    # operator approved less than the plan shows.
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device, approve=20, approved_by="alice")

    assert refused.value.reason == "approval_exceeded"
    assert "30" in refused.value.message
    assert Device.objects.count() == 40
    assert line(run, Device).withheld_count == 30


def test_approving_without_a_withheld_plan_is_refused_and_writes_nothing(site: Site) -> None:
    sync(Device, "acme", range(10))
    run = sync(Device, "acme", range(9))
    events = RunEvent.objects.count()
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device, approve=1, approved_by="alice")
    assert refused.value.reason == "nothing_withheld"
    assert RunEvent.objects.count() == events and Device.objects.count() == 10


@pytest.mark.parametrize("count", [0, -1, 1.5, "3", True])
def test_approving_a_bad_count_names_the_field(count: Any, site: Site) -> None:
    run = sync(Device, "acme", range(3))
    with pytest.raises(InvalidInput) as bad:
        services.safe_cleanup(run, Device, approve=count, approved_by="alice")
    assert bad.value.field == "approve"


@isolate_apps("tests.tracked_app")
def test_a_project_can_make_its_default_manager_hide_tombstoned_rows(site: Site) -> None:
    sync(Asset, "acme", range(4))
    services.safe_cleanup(sync(Asset, "acme", range(3)), Asset)

    class LiveAsset(Asset):
        objects = LiveTrackedManager()
        all_objects = TrackedQuerySet.as_manager()

        class Meta:
            proxy = True
            app_label = "tracked_app"

    assert sorted(LiveAsset.objects.values_list("code", flat=True)) == ["a000", "a001", "a002"]
    assert LiveAsset.all_objects.count() == 4
    assert Asset.objects.count() == 4  # the shipped default manager hides nothing
    assert list(Asset.objects.tombstoned().values_list("code", flat=True)) == ["a003"]
    assert Device.objects.live().count() == Device.objects.count()
    assert not Device.objects.tombstoned().exists()
