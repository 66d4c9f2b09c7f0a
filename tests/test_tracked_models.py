"""Tracked models of the project's own: typed keys and columns, foreign keys, several models in
one run, per-model completion and cleanup, audit records that carry every column."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushEnded, FlushFailed, InvalidInput
from runs_app.models import FlushStatus, Run, RunEvent, RunModelState, RunStatus
from runs_app.tracking import sync_spec
from tests.tracked_app.models import Device, Membership, Site

pytestmark = pytest.mark.django_db(transaction=True)

UIDS = [uuid.UUID(int=index + 1) for index in range(40)]


def device(index: int, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "uid": UIDS[index],
        "name": f"device {index}",
        "port": 8000 + index,
        "online": index % 2 == 0,
        "price": f"{index}.50",
        "seen_on": "2026-11-30T10:00:00+00:00",
        "attrs": {"rack": index, "tags": ["a", "b"]},
    }
    row.update(values)
    return row


def sync_devices(tenant: str, indexes: range | list[int], **values: Any) -> Run:
    run = services.create_run(tenant)
    with services.flush(run, Device) as flush:
        flush.write(device(index, **values) for index in indexes)
    return services.complete_run(run)


def line(run: Run, model: type[Any]) -> RunModelState:
    return RunModelState.objects.get(run=run, model=sync_spec(model).label)


def flush_error(run: Run, rows: list[Any], model: type[Any] = Device) -> InvalidInput:
    with pytest.raises(FlushFailed) as caught, services.flush(run, model) as flush:
        flush.write(rows)
    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput), caught.value
    return cause


# -- flushing ------------------------------------------------------------------------------------


def test_typed_values_are_converted_by_the_models_fields_and_stored() -> None:
    Site.objects.create(id=7, name="Paris")
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        result = flush.write([device(0, site=7), device(1, site_id=7, price=None, seen_on=None)])

    assert (result.seen, result.created, result.updated) == (2, 2, 0)
    first, second = Device.objects.order_by("port")
    assert first.tenant == "acme"  # the scope field is the run's scope
    assert first.uid == UIDS[0] and first.site_id == 7 and second.site_id == 7
    assert first.price == Decimal("0.50") and second.price is None
    assert first.seen_on == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert first.attrs == {"rack": 0, "tags": ["a", "b"]}
    assert (first.online, second.online, first.kind) == (True, False, "phone")
    assert first.last_seen_run_id == run.pk and first.last_confirmed_run_id is None
    assert first.token != second.token  # a callable default, per row


def test_an_update_writes_the_owned_fields_and_leaves_the_projects_own_alone() -> None:
    first = sync_devices("acme", range(3))
    Device.objects.update(note="kept by the project")
    tokens = dict(Device.objects.values_list("uid", "token"))

    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        result = flush.write([device(index, name=f"renamed {index}") for index in range(3)])
    services.complete_run(run)

    assert (result.created, result.updated) == (0, 3)
    rows = list(Device.objects.order_by("port"))
    assert [row.name for row in rows] == ["renamed 0", "renamed 1", "renamed 2"]
    assert {row.note for row in rows} == {"kept by the project"}
    assert dict(Device.objects.values_list("uid", "token")) == tokens
    assert {row.last_confirmed_run_id for row in rows} == {run.pk}
    assert all(row.created_at < row.updated_at for row in rows)
    assert first.pk != run.pk


def test_instances_of_the_model_are_rows_too() -> None:
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write([Device(uid=UIDS[0], name="from an instance", port=1)])
    assert Device.objects.get().name == "from an instance"


def test_a_key_of_several_fields_and_a_whole_table_scope() -> None:
    run = services.create_run("org")
    with services.flush(run, Membership) as flush:
        flush.write(
            [
                {"repo_id": 1, "login": "ada", "role": "admin"},
                {"repo_id": 1, "login": "bob", "role": "read"},
                {"repo_id": 2, "login": "ada", "role": "write"},
                {"repo_id": 1, "login": "ada", "role": "owner"},  # repeated: the last one wins
            ]
        )
    services.complete_run(run)
    assert set(Membership.objects.values_list("repo_id", "login", "role")) == {
        (1, "ada", "owner"),
        (1, "bob", "read"),
        (2, "ada", "write"),
    }
    (event,) = RunEvent.objects.filter(run=run, type="tracked_app.membership.flushed")
    assert event.payload["first_key"] == [1, "ada"] and event.payload["last_key"] == [2, "ada"]
    assert event.payload["model"] == "tracked_app.membership"


def test_a_primary_key_given_by_the_source_is_a_key() -> None:
    run = services.create_run("geo")
    with services.flush(run, Site) as flush:
        flush.write([{"id": 10, "name": "Lyon"}, {"id": 3, "name": "Nice"}])
    run2 = services.create_run("geo2")
    with services.flush(run2, Site) as flush:
        result = flush.write([{"id": 10, "name": "Lyon 2"}])
    assert (result.created, result.updated) == (0, 1)
    assert dict(Site.objects.values_list("id", "name")) == {3: "Nice", 10: "Lyon 2"}


@pytest.mark.parametrize(
    ("row", "field", "limit"),
    [
        pytest.param({"name": "n"}, "rows[1].uid", None, id="missing-key"),
        pytest.param({"uid": None, "name": "n"}, "rows[1].uid", None, id="null-key"),
        pytest.param({"uid": "not a uuid", "name": "n"}, "rows[1].uid", None, id="bad-uuid"),
        pytest.param({"uid": UIDS[5]}, "rows[1].name", None, id="missing-required"),
        pytest.param({"uid": UIDS[5], "name": "n" * 51}, "rows[1].name", 50, id="too-long"),
        pytest.param({"uid": UIDS[5], "name": 5}, "rows[1].name", None, id="text-not-str"),
        pytest.param({"uid": UIDS[5], "name": ""}, "rows[1].name", 50, id="empty-not-blank"),
        pytest.param({"uid": UIDS[5], "name": "n", "port": "x"}, "rows[1].port", None, id="int"),
        pytest.param({"uid": UIDS[5], "name": "n", "port": -1}, "rows[1].port", 0, id="range"),
        pytest.param(
            {"uid": UIDS[5], "name": "n", "price": "123456789"}, "rows[1].price", None, id="digits"
        ),
        pytest.param(
            {"uid": UIDS[5], "name": "n", "kind": "tablet"}, "rows[1].kind", None, id="choices"
        ),
        pytest.param(
            {"uid": UIDS[5], "name": "n", "attrs": {"x": float("nan")}},
            "rows[1].attrs",
            None,
            id="json-nan",
        ),
        pytest.param({"uid": UIDS[5], "name": "n", "note": "x"}, "rows[1]", None, id="not-owned"),
        pytest.param({"uid": UIDS[5], "name": "n", "tenant": "x"}, "rows[1]", None, id="scope"),
        pytest.param(
            {"uid": UIDS[5], "name": "n", "last_seen_run": None}, "rows[1]", None, id="stamp"
        ),
        pytest.param(
            {"uid": UIDS[5], "name": "n", "site": 1, "site_id": 1},
            "rows[1].site",
            None,
            id="fk-twice",
        ),
        pytest.param(["uid", "name"], "rows[1]", None, id="not-a-mapping"),
    ],
)
def test_bad_rows_name_the_field_and_nothing_of_the_batch_is_written(
    row: Any, field: str, limit: Any
) -> None:
    run = services.create_run("acme")
    error = flush_error(run, [device(0), row])
    assert error.field == field, error
    if limit is not None:
        assert error.limit == limit
    assert not Device.objects.exists()
    assert line(run, Device).flush_status == FlushStatus.FAILED
    assert services.complete_run(run).state.status == RunStatus.FAILED


def test_a_foreign_key_to_a_missing_row_fails_the_flush_and_writes_nothing_of_its_batch() -> None:
    run = services.create_run("acme")
    with pytest.raises(FlushFailed), services.flush(run, Device) as flush:
        flush.write([device(0, site=404)])
    assert not Device.objects.exists()
    assert services.complete_run(run).state.status == RunStatus.FAILED


def test_a_non_tracked_model_is_refused_at_once() -> None:
    run = services.create_run("acme")
    with pytest.raises(InvalidInput) as caught:
        services.flush(run, RunModelState)
    assert caught.value.field == "model"


def test_statements_per_batch_are_constant_for_a_user_model() -> None:
    def statements(tenant: str, batches: int) -> int:
        run = services.create_run(tenant)
        with (
            CaptureQueriesContext(connection) as queries,
            services.flush(run, Device, batch_size=4) as flush,
        ):
            flush.write(device(index) for index in range(4 * batches))
        return len(queries.captured_queries)

    one, two, three = (statements(f"t{n}", n) for n in (1, 2, 3))
    assert two - one == three - two <= 10


# -- several models in one run -------------------------------------------------------------------


def test_two_models_in_one_run_are_counted_per_model_and_confirmed_together() -> None:
    Site.objects.create(id=1, name="HQ")
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write(device(index, site=1) for index in range(5))
    with services.flush(run, Membership) as flush:
        flush.write({"repo_id": 1, "login": f"u{index}", "role": "r"} for index in range(3))
    run = services.complete_run(run)

    assert run.state.status == RunStatus.COMPLETED
    assert (line(run, Device).rows_seen, line(run, Device).rows_confirmed) == (5, 5)
    assert (line(run, Membership).rows_seen, line(run, Membership).rows_confirmed) == (3, 3)
    assert (run.state.rows_seen, run.state.rows_confirmed) == (8, 8)
    assert Membership.objects.filter(last_confirmed_run=run).count() == 3


def test_one_model_failing_fails_the_run_and_every_models_cleanup_refuses() -> None:
    sync_devices("acme", range(10))
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write(device(index) for index in range(5))

    def source() -> Any:
        yield {"repo_id": 1, "login": "ada", "role": "r"}
        raise ConnectionError("members API down between two pages")

    with pytest.raises(FlushFailed), services.flush(run, Membership, batch_size=1) as flush:
        flush.write(source())
    run = services.complete_run(run)

    assert run.state.status == RunStatus.FAILED
    assert line(run, Device).flush_status == FlushStatus.SUCCEEDED
    assert line(run, Membership).flush_status == FlushStatus.FAILED
    for model in (Device, Membership):
        with pytest.raises(CleanupRefused) as refused:
            services.safe_cleanup(run, model)
        assert refused.value.reason == "flush_failed"
    assert Device.objects.count() == 10  # not one row lost


def test_a_second_flush_of_a_model_after_it_succeeded_ends_the_runs_flush() -> None:
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write([device(0)])
    with services.flush(run, Membership) as flush:  # another model: allowed
        flush.write([{"repo_id": 1, "login": "ada", "role": "r"}])
    with pytest.raises(FlushEnded), services.flush(run, Device):
        pass
    assert services.complete_run(run).state.status == RunStatus.FAILED


# -- cleanup per model ---------------------------------------------------------------------------


def test_cleanup_removes_exactly_the_rows_the_run_did_not_see_with_every_column_audited() -> None:
    Site.objects.create(id=1, name="HQ")
    sync_devices("acme", range(20), site=1)
    sync_devices("other", range(20))  # another tenant: never touched
    run = sync_devices("acme", range(18), site=1)
    gone = {UIDS[18]: Device.objects.get(tenant="acme", uid=UIDS[18])}
    gone[UIDS[19]] = Device.objects.get(tenant="acme", uid=UIDS[19])

    plan = services.safe_cleanup(run, Device, dry_run=True)
    assert (plan.planned, plan.removed, plan.refusal) == (2, 0, None)
    assert plan.sample_keys == (str(UIDS[18]), str(UIDS[19]))
    result = services.safe_cleanup(run, Device)

    assert (result.planned, result.removed) == (2, 2)
    assert set(Device.objects.filter(tenant="acme").values_list("uid", flat=True)) == set(UIDS[:18])
    assert Device.objects.filter(tenant="other").count() == 20
    assert (line(run, Device).rows_removed, line(run, Device).cleanup_status) == (2, "done")
    assert run.state.__class__.objects.get(run=run).rows_removed == 2
    (event,) = RunEvent.objects.filter(run=run, type="tracked_app.device.removed")
    assert (event.payload["scope"], event.payload["model"]) == ("acme", "tracked_app.device")
    records = event.payload["rows"]
    assert [uuid.UUID(record["uid"]) for record in records] == [UIDS[18], UIDS[19]]
    for record in records:  # enough to put the row back: every column, converted by its field
        original = gone[uuid.UUID(record["uid"])]
        for field in Device._meta.concrete_fields:
            value = record[field.column]
            assert field.to_python(value) == getattr(original, field.attname), field.name


def test_cleanup_of_a_model_the_run_did_not_flush_refuses_not_flushed() -> None:
    run = sync_devices("acme", range(3))
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Membership)
    assert refused.value.reason == "not_flushed"
    assert line(run, Membership).cleanup_status == "refused"


def test_an_empty_flush_of_a_model_is_an_empty_run_for_its_cleanup() -> None:
    sync_devices("acme", range(3))
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write([])
    run = services.complete_run(run)
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Device)
    assert refused.value.reason == "empty_run"
    assert services.safe_cleanup(run, Device, force=True).removed == 3


def test_cleanup_of_a_key_of_several_fields_in_a_whole_table_model() -> None:
    members = [{"repo_id": repo, "login": login, "role": "r"} for repo in (1, 2) for login in "ab"]
    first = services.create_run("org")
    with services.flush(first, Membership) as flush:
        flush.write(members)
    services.complete_run(first)
    run = services.create_run("org")
    with services.flush(run, Membership) as flush:
        flush.write(members[:3])
    run = services.complete_run(run)
    result = services.safe_cleanup(run, Membership, force=True)
    assert (result.removed, result.sample_keys) == (1, ([2, "b"],))
    assert set(Membership.objects.values_list("repo_id", "login")) == {(1, "a"), (1, "b"), (2, "a")}


def test_a_row_still_referenced_refuses_its_batch_and_says_so() -> None:
    def sites(ids: list[int]) -> Run:
        run = services.create_run("geo")
        with services.flush(run, Site) as flush:
            flush.write({"id": site_id, "name": f"site {site_id}"} for site_id in ids)
        return services.complete_run(run)

    sites([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    services.create_run("acme")  # Device rows referencing site 10
    Device.objects.create(tenant="other", uid=UIDS[0], name="d", site_id=10)
    run = sites([1, 2, 3, 4, 5, 6, 7, 8, 9])
    with pytest.raises(CleanupRefused) as refused:
        services.safe_cleanup(run, Site)
    assert refused.value.reason == "rows_referenced"
    assert Site.objects.filter(id=10).exists()
    state = line(run, Site)
    assert (state.cleanup_status, state.cleanup_reason) == ("refused", "rows_referenced")
    assert RunEvent.objects.filter(run=run, type="cleanup.refused").count() == 1
    assert not RunEvent.objects.filter(run=run, type="sites.removed").exists()
