"""Fault injection on the write paths of tracked models (issue 11): fail the k-th statement of
each path, for every k, with the suite's own models (``Device``: a UUID key and a scope field;
``Membership``: a key of two fields, the whole table one scope).

A path of one transaction must leave every table as it was (``assert_atomic_under_faults``); a
path of several (a flush of several batches, a cleanup of several batches) may have committed
its earlier transactions, so each one proves its invariants after every fault
(``check_under_faults``): no partial batch, ledgers equal to the rows, never ``succeeded`` with a
batch missing, never a row gone without its audit record.

Transactional tests (real commits): "nothing changed" is what another connection would see.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, models
from django.db.models import Model
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs_app import services
from runs_app.db import column
from runs_app.exceptions import CleanupRefused, FlushFailed, InvalidInput, RunClosed
from runs_app.models import (
    FlushSessionStatus,
    FlushStatus,
    Run,
    RunEvent,
    RunFlushSession,
    RunModelState,
    RunState,
    RunStatus,
)
from runs_app.services import FlushSession
from runs_app.tracking import sync_spec
from tests.helpers import (
    assert_atomic_under_faults,
    check_under_faults,
    snapshot,
    temporary_tracked_model,
)
from tests.tracked_app.models import Device, Membership, Site

pytestmark = pytest.mark.django_db(transaction=True)

MODELS = [pytest.param(Device, id="device"), pytest.param(Membership, id="membership")]

# Logins out of ASCII order on purpose: the flush sorts each batch by code point.
LOGINS = ["zoé", "Zoe", "ada", "éa", "ä", "日本", "\U0001f600", "e\u0301", "bob", "Ω"]


def uid(index: int) -> uuid.UUID:
    return uuid.UUID(int=index + 1)


def row(model: type[Model], index: int, version: str = "v1") -> dict[str, Any]:
    """The source's row ``index`` of ``model``: distinct keys for distinct indexes."""
    if model is Device:
        return {
            "uid": uid(index),
            "name": f"{version} device {index}",
            "site": 1 if index % 3 == 0 else None,
            "port": index,
            "online": index % 2 == 0,
            "price": f"{index}.25",
            "seen_on": "2026-11-30T10:00:00+00:00",
            "attrs": {"i": index, "v": version},
            "kind": "laptop" if index % 2 else "phone",
        }
    return {
        "repo_id": index // len(LOGINS),
        "login": LOGINS[index % len(LOGINS)],
        "role": f"{version} role",
    }


def key_of(model: type[Model], values: dict[str, Any]) -> tuple[Any, ...]:
    """A row's key as the table gives it back (``values()`` of the key fields)."""
    return tuple(values[name] for name in sync_spec(model).key_names)


def input_key(model: type[Model], index: int) -> tuple[Any, ...]:
    return key_of(model, row(model, index))


def rows_of(model: type[Model], run: Run | None = None) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The table's rows (the run's scope only, for a scoped model), by key."""
    rows = model._base_manager.all()
    if run is not None and sync_spec(model).scope is not None:
        rows = rows.filter(tenant=run.scope)
    return {key_of(model, values): values for values in rows.values()}


def line(run: Run | str, model: type[Model]) -> RunModelState | None:
    run_id = run if isinstance(run, str) else run.pk
    return RunModelState.objects.filter(run_id=run_id, model=sync_spec(model).label).first()


def state(run: Run) -> RunState:
    return RunState.objects.get(run=run)


def events(run: Run, suffix: str, model: type[Model]) -> list[RunEvent]:
    kind = f"{sync_spec(model).event_prefix}.{suffix}"
    return list(RunEvent.objects.filter(run=run, type=kind).order_by("seq"))


def flushed_run(scope: str, model: type[Model], indexes: range, version: str = "v1") -> Run:
    """A completed run of ``scope`` that flushed rows ``indexes`` of ``model``."""
    run = services.create_run(scope)
    with services.flush(run, model) as flush:
        flush.write(row(model, index, version) for index in indexes)
    return services.complete_run(run)


def ensure_site() -> None:
    Site.objects.get_or_create(id=1, defaults={"name": "HQ"})


def attempt(action: Callable[[], Any]) -> Any:
    """Run ``action``; a refusal (the path's normal outcome here) is returned, not raised."""
    try:
        return action()
    except CleanupRefused as refused:
        return refused


# -- opening, one batch, closing -------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_opening_a_session_is_atomic(model: type[Model]) -> None:
    """A faulted open leaves nothing behind (no open session that would fail the run later);
    the session that finally opened writes, closes, and the run completes."""
    ensure_site()
    run = services.create_run("acme")
    sessions: list[FlushSession] = []

    def open_session() -> None:
        session = services.flush(run, model)
        sessions.append(session)
        session.__enter__()

    faults = assert_atomic_under_faults(open_session)
    assert faults >= 4  # lock, model line, session, run ledger (and BEGIN on SQLite)
    opened = line(run, model)
    assert opened is not None and opened.flush_status == FlushStatus.IN_PROGRESS
    assert RunFlushSession.objects.filter(run=run).count() == 1
    session = sessions[-1]
    session.write([row(model, 0)])
    session.__exit__(None, None, None)
    done = services.complete_run(run)
    assert done.state.status == RunStatus.COMPLETED
    closed = line(run, model)
    assert closed is not None and (closed.rows_seen, closed.rows_confirmed) == (1, 1)


@pytest.mark.parametrize("model", MODELS)
def test_one_batch_is_all_or_nothing(model: type[Model]) -> None:
    count = 7

    def setup() -> tuple[Run, FlushSession]:
        ensure_site()
        run = services.create_run("acme")
        session = services.flush(run, model, batch_size=count)
        session.__enter__()
        return run, session

    def action(context: tuple[Run, FlushSession]) -> None:
        context[1].write([row(model, index) for index in range(count)])

    def check(context: tuple[Run, FlushSession], faulted: bool) -> None:
        run, _ = context
        stored = rows_of(model, run)
        ledger = line(run, model)
        assert ledger is not None
        flushed = events(run, "flushed", model)
        if faulted:
            assert (stored, flushed, ledger.rows_seen) == ({}, [], 0)
            assert ledger.flush_status == FlushStatus.FAILED
            assert state(run).rows_seen == 0
        else:
            assert len(stored) == count == ledger.rows_seen == state(run).rows_seen
            assert [event.payload["seen"] for event in flushed] == [count]
            assert ledger.flush_status == FlushStatus.IN_PROGRESS

    faults = check_under_faults(setup, action, check)
    assert faults >= 5


@pytest.mark.parametrize("model", MODELS)
def test_closing_a_session_under_faults(model: type[Model]) -> None:
    def setup() -> tuple[Run, FlushSession]:
        ensure_site()
        run = services.create_run("acme")
        session = services.flush(run, model, batch_size=4)
        session.__enter__()
        session.write([row(model, index) for index in range(10)])
        return run, session

    def action(context: tuple[Run, FlushSession]) -> None:
        context[1].__exit__(None, None, None)

    def check(context: tuple[Run, FlushSession], faulted: bool) -> None:
        run, session = context
        ledger = line(run, model)
        assert ledger is not None and session.id is not None
        record = RunFlushSession.objects.get(pk=session.id)
        assert len(rows_of(model, run)) == 10 == ledger.rows_seen  # the batches stay written
        if faulted:
            # Never succeeded: the session and the ledgers say failed, completion fails the run.
            assert record.status == FlushSessionStatus.FAILED
            assert ledger.flush_status == state(run).flush_status == FlushStatus.FAILED
            assert services.complete_run(run).state.status == RunStatus.FAILED
        else:
            assert record.status == FlushSessionStatus.SUCCEEDED
            assert ledger.flush_status == state(run).flush_status == FlushStatus.SUCCEEDED
            assert [e.payload["seen"] for e in RunEvent.objects.filter(type="flush.succeeded")] == [
                10
            ]

    assert check_under_faults(setup, action, check) >= 4


# -- a whole flush of several batches --------------------------------------------------------


@dataclass
class FlushCase:
    model: type[Model]
    run: Run
    batch_size: int
    indexes: list[int]
    before: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)

    def batches(self) -> Iterator[set[tuple[Any, ...]]]:
        for start in range(0, len(self.indexes), self.batch_size):
            chunk = self.indexes[start : start + self.batch_size]
            yield {input_key(self.model, index) for index in chunk}


@pytest.mark.parametrize("model", MODELS)
def test_a_flush_of_several_batches_never_leaves_a_partial_batch(model: type[Model]) -> None:
    """Rows 0-11 exist (an older completed run); the flush updates 4-11 and creates 12-19, in
    batches of 3, input in a shuffled order."""
    indexes = [19, 4, 12, 7, 5, 18, 11, 13, 6, 10, 17, 8, 14, 9, 16, 15]

    def setup() -> FlushCase:
        ensure_site()
        flushed_run("acme", model, range(12))
        run = services.create_run("acme")
        return FlushCase(model, run, 3, indexes, rows_of(model))

    def action(case: FlushCase) -> None:
        with services.flush(case.run, model, batch_size=case.batch_size) as flush:
            flush.write(row(model, index, "v2") for index in case.indexes)

    def check(case: FlushCase, faulted: bool) -> None:
        stored = rows_of(model, case.run)
        stamped = {
            key for key, values in stored.items() if values["last_seen_run_id"] == case.run.pk
        }
        for batch in case.batches():
            assert stamped & batch in (set(), batch), "a partial batch"
        for key, values in stored.items():  # values follow the stamps: v2 exactly when stamped
            version = values["name" if model is Device else "role"].split()[0]
            assert (version == "v2") == (key in stamped), key
            if key in case.before and key not in stamped:
                assert values == case.before[key]
        # The ledgers equal the rows: per model, the run's summary, the session, the events.
        ledger = line(case.run, model)
        flushed = events(case.run, "flushed", model)
        seen = sum(event.payload["seen"] for event in flushed)
        created = sum(event.payload["created"] for event in flushed)
        assert seen == len(stamped) == (ledger.rows_seen if ledger else 0)
        assert created == len(stamped - set(case.before))
        assert (ledger.rows_created if ledger else 0) == created
        assert state(case.run).rows_seen == seen
        sessions = list(RunFlushSession.objects.filter(run=case.run))
        assert sum(s.batches for s in sessions) == len(flushed)
        assert sum(s.rows_seen for s in sessions) == seen
        # Never succeeded while a batch is missing.
        complete = len(stamped) == len(case.indexes)
        if ledger is not None and ledger.flush_status == FlushStatus.SUCCEEDED:
            assert complete and not faulted
        if faulted:
            run = services.complete_run(case.run)
            with pytest.raises(CleanupRefused) as refused:
                services.safe_cleanup(run, model)
            if ledger is None:
                # The open itself failed (raised to the caller, recorded nothing): the run never
                # flushed the model, so its cleanup has nothing to go by.
                assert refused.value.reason == "not_flushed"
            else:
                assert run.state.status == RunStatus.FAILED
                assert refused.value.reason == "flush_failed"
                assert not model._base_manager.filter(last_confirmed_run=run).exists()
            assert set(rows_of(model, case.run)) == set(stored)  # nothing deleted
        else:
            assert complete and ledger is not None
            assert ledger.flush_status == FlushStatus.SUCCEEDED

    assert check_under_faults(setup, action, check) >= 6 * 4


# -- completion across models ------------------------------------------------------------------


def two_model_run(*, fail_membership: bool = False) -> Run:
    ensure_site()
    flushed_run("acme", Device, range(10))
    run = services.create_run("acme")
    with services.flush(run, Device, batch_size=4) as flush:
        flush.write(row(Device, index, "v2") for index in range(2, 12))
    try:
        with services.flush(run, Membership, batch_size=4) as flush:
            flush.write(row(Membership, index) for index in range(9))
            if fail_membership:
                raise ConnectionError("the members API went away between two pages")
    except FlushFailed:
        assert fail_membership
    return run


def test_completing_a_run_of_two_models_is_all_or_nothing() -> None:
    run = two_model_run()
    faults = assert_atomic_under_faults(lambda: services.complete_run(run))
    assert faults >= 6  # lock, lines, a confirmation per model, ledgers, event
    done = state(run)
    assert (done.status, done.rows_confirmed, done.rows_seen) == (RunStatus.COMPLETED, 19, 19)
    device_line, member_line = line(run, Device), line(run, Membership)
    assert device_line is not None and member_line is not None
    assert (device_line.rows_confirmed, member_line.rows_confirmed) == (10, 9)
    assert Device.objects.filter(last_confirmed_run=run).count() == 10
    assert Membership.objects.filter(last_confirmed_run=run).count() == 9
    # The older run's confirmation stays on the two rows this run did not see.
    assert set(Device.objects.exclude(last_confirmed_run=run).values_list("uid", flat=True)) == {
        uid(0),
        uid(1),
    }
    (completed,) = RunEvent.objects.filter(run=run, type="run.completed")
    assert completed.payload["rows_confirmed"] == 19


def test_completing_a_run_whose_second_model_failed_is_all_or_nothing() -> None:
    run = two_model_run(fail_membership=True)
    before_confirmed = dict(Device.objects.values_list("uid", "last_confirmed_run_id"))
    assert_atomic_under_faults(lambda: services.complete_run(run))
    assert state(run).status == RunStatus.FAILED
    assert dict(Device.objects.values_list("uid", "last_confirmed_run_id")) == before_confirmed
    assert not Membership.objects.filter(last_confirmed_run=run).exists()
    assert {ledger.rows_confirmed for ledger in RunModelState.objects.filter(run=run)} == {0}
    (failed,) = RunEvent.objects.filter(run=run, type="run.failed")
    assert failed.payload["reason"] == "flush_failed"


# -- cleanup: refusals and deletions -----------------------------------------------------------


def refusal_case(reason: str) -> tuple[Run, type[Model]]:
    """A run whose ``safe_cleanup(run, Device)`` (or Membership) refuses with ``reason``."""
    ensure_site()
    flushed_run("acme", Device, range(10))
    if reason == "flush_failed":
        run = services.create_run("acme")
        with pytest.raises(FlushFailed), services.flush(run, Device) as flush:
            flush.write([row(Device, 0), {"uid": "not a uuid"}])
        return services.complete_run(run), Device
    if reason == "run_not_completed":
        run = services.create_run("acme")
        with services.flush(run, Device) as flush:
            flush.write([row(Device, 0)])
        return services.fail_run(run, "the job gave up"), Device
    if reason == "not_flushed":
        return flushed_run("acme", Device, range(10)), Membership
    if reason == "superseded":
        old = flushed_run("acme", Device, range(9))
        flushed_run("acme", Device, range(10))
        return old, Device
    if reason == "empty_run":
        return flushed_run("acme", Device, range(0)), Device
    assert reason == "too_many_deletions"
    return flushed_run("acme", Device, range(3)), Device


@pytest.mark.parametrize(
    "reason",
    [
        "flush_failed",
        "run_not_completed",
        "not_flushed",
        "superseded",
        "empty_run",
        "too_many_deletions",
    ],
)
def test_recording_a_refusal_is_all_or_nothing(reason: str) -> None:
    run, model = refusal_case(reason)
    before = snapshot()
    faults = assert_atomic_under_faults(lambda: attempt(lambda: services.safe_cleanup(run, model)))
    assert faults >= 4  # lock, ledger, model line, event
    assert snapshot()["Device"] == before["Device"]  # nothing deleted, whatever the reason
    refused = line(run, model)
    assert refused is not None
    assert (refused.cleanup_status, refused.cleanup_reason) == ("refused", reason)
    assert (state(run).cleanup_status, state(run).cleanup_reason) == ("refused", reason)
    (event,) = RunEvent.objects.filter(run=run, type="cleanup.refused")
    assert (event.payload["reason"], event.payload["model"]) == (reason, sync_spec(model).label)


@dataclass
class CleanupCase:
    model: type[Model]
    run: Run
    before: dict[tuple[Any, ...], dict[str, Any]]  # the scope's rows before the cleanup
    doomed: set[tuple[Any, ...]]  # the rows the run did not see


def audited(case: CleanupCase) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for event in events(case.run, "removed", case.model):
        assert event.payload["model"] == sync_spec(case.model).label
        assert event.payload["scope"] == case.run.scope
        records.extend(event.payload["rows"])
    return records


def check_cleanup(case: CleanupCase) -> set[tuple[Any, ...]]:
    """Every row gone has exactly one audit record holding its columns, no row left has one, and
    the ledgers count exactly the rows gone. Returns the keys gone."""
    model = case.model
    stored = rows_of(model, case.run)
    gone = set(case.before) - set(stored)
    assert gone <= case.doomed, "a row the run saw was deleted"
    records = audited(case)
    spec = sync_spec(model)
    recorded = [
        tuple(field.to_python(record[column(field)]) for field in spec.key) for record in records
    ]
    assert sorted(recorded, key=repr) == sorted(gone, key=repr), "a row gone without its audit"
    for record in records:
        original = case.before[tuple(field.to_python(record[column(field)]) for field in spec.key)]
        for item in model._meta.concrete_fields:
            assert item.to_python(record[column(item)]) == original[item.attname], item.name
    ledger = line(case.run, model)
    assert ledger is not None
    assert ledger.rows_removed == len(gone) == state(case.run).rows_removed
    if gone:
        assert ledger.cleanup_status in ("in_progress", "done")
    return gone


def cleanup_case(model: type[Model], *, other_scope: bool = True) -> CleanupCase:
    ensure_site()
    flushed_run("acme", model, range(20))
    if other_scope and model is Device:
        flushed_run("other", Device, range(20))  # the same keys in another tenant
    run = flushed_run("acme", model, range(0, 20, 2), "v2")
    before = rows_of(model, run)
    doomed = {input_key(model, index) for index in range(1, 20, 2)}
    return CleanupCase(model, run, before, doomed)


@pytest.mark.parametrize("model", MODELS)
def test_a_cleanup_of_several_batches_never_loses_an_audit_record(model: type[Model]) -> None:
    """10 of 20 rows to delete (half the scope: at the fraction guard, not over it), in batches
    of 3; for Device, another tenant holds the same keys and is never touched."""

    def setup() -> CleanupCase:
        return cleanup_case(model)

    def action(case: CleanupCase) -> None:
        services.safe_cleanup(case.run, model)

    def check(case: CleanupCase, faulted: bool) -> None:
        gone = check_cleanup(case)
        if model is Device:
            assert Device.objects.filter(tenant="other").count() == 20
        if not faulted:
            assert gone == case.doomed
            ledger = line(case.run, model)
            assert ledger is not None and ledger.cleanup_status == "done"
            return
        # Run again without a fault: it finishes the job, nothing twice, nothing more.
        services.safe_cleanup(case.run, model)
        assert check_cleanup(case) == case.doomed
        ledger = line(case.run, model)
        assert ledger is not None and ledger.cleanup_status == "done"

    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 3}):
        faults = check_under_faults(setup, action, check)
    assert faults >= 4 * 3


def test_a_forced_cleanup_cut_off_by_a_fault_finishes_as_forced() -> None:
    """Forced past the fraction guard (16 of 20 gone), cut off half-way: the rerun, without
    force, resumes the forced cleanup instead of refusing half-way through."""

    def setup() -> CleanupCase:
        ensure_site()
        flushed_run("acme", Device, range(20))
        run = flushed_run("acme", Device, range(4), "v2")
        doomed = {input_key(Device, index) for index in range(4, 20)}
        return CleanupCase(Device, run, rows_of(Device, run), doomed)

    def action(case: CleanupCase) -> None:
        services.safe_cleanup(case.run, Device, force=True)

    def check(case: CleanupCase, faulted: bool) -> None:
        gone = check_cleanup(case)
        if faulted:
            rerun = attempt(lambda: services.safe_cleanup(case.run, Device))
            if gone:
                assert not isinstance(rerun, CleanupRefused), rerun
                assert rerun.forced
            else:  # nothing deleted yet: nothing was forced yet either
                assert isinstance(rerun, CleanupRefused)
                assert rerun.reason == "too_many_deletions"
                services.safe_cleanup(case.run, Device, force=True)
            gone = check_cleanup(case)
        assert gone == case.doomed
        ledger = line(case.run, Device)
        assert ledger is not None and (ledger.cleanup_status, ledger.cleanup_forced) == (
            "done",
            True,
        )

    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 5}):
        assert check_under_faults(setup, action, check) >= 4 * 4


def test_a_closed_run_refuses_a_zombie_batch_under_faults() -> None:
    """The batch of a session whose run was failed meanwhile: RunClosed, whatever statement
    fails, and the failed run's ledger is never touched."""

    def setup() -> tuple[Run, FlushSession]:
        run = services.create_run("acme")
        session = services.flush(run, Device)
        session.__enter__()
        services.fail_run(run, "reaped")
        return run, session

    def action(context: tuple[Run, FlushSession]) -> None:
        with suppress(RunClosed):
            context[1].write([row(Device, 0)])

    def check(context: tuple[Run, FlushSession], faulted: bool) -> None:
        run, _ = context
        assert not Device.objects.exists()
        assert state(run).flush_status == FlushStatus.IN_PROGRESS  # as the reaping left it
        assert not RunEvent.objects.filter(run=run, type="flush.failed").exists()

    check_under_faults(setup, action, check)


# -- attacks: what the spec says and the code must honour ----------------------------------------
# Models a test needs once are built by temporary_tracked_model (dropped and unregistered after).


def test_a_stamp_redeclared_on_another_column_is_refused_by_the_checks() -> None:
    """A model redeclaring a stamp on a column of its own (``db_column``) passed E033, then
    every flush failed on the missing column ``created_at`` / ``last_seen_run_id``: the raw
    statements write the stamps by their column names."""
    from runs_app.tracking import check_declaration

    stamps = {
        "created_at": models.DateTimeField(default=timezone.now, db_column="first_seen"),
        "last_seen_run": models.ForeignKey(
            "runs_app.Run",
            on_delete=models.SET_NULL,
            null=True,
            related_name="+",
            db_column="seen_by",
        ),
    }
    for name, stamp in stamps.items():
        attributes = {"code": models.IntegerField(unique=True), name: stamp, "sync_key": ("code",)}
        with temporary_tracked_model(f"Stamp{name.title().replace('_', '')}", attributes) as model:
            ids = [message.id for message in check_declaration(model)]  # type: ignore[arg-type]
            assert ids == ["runs_app.E033"], (name, ids)


def test_a_stamp_redeclared_on_its_own_column_still_flushes() -> None:
    attributes = {
        "code": models.IntegerField(unique=True),
        "updated_at": models.DateTimeField(auto_now=True, verbose_name="last change"),
        "sync_key": ("code",),
    }
    with temporary_tracked_model("StampSameColumn", attributes) as model:
        from runs_app.tracking import check_declaration

        assert check_declaration(model) == []  # type: ignore[arg-type]
        run = flushed_run_of(model, "s", [{"code": 1}])
        stored = model._base_manager.get()
        assert stored.last_seen_run_id == run.pk  # type: ignore[attr-defined]


def flushed_run_of(model: type[Model], scope: str, rows: list[Any], **options: Any) -> Run:
    run = services.create_run(scope)
    with services.flush(run, model, **options) as flush:
        flush.write(rows)
    return services.complete_run(run)


def test_fields_the_project_owns_get_what_django_would_insert_and_are_never_updated() -> None:
    """Fields outside ``sync_fields`` are the project's: a flush inserts them as Django's own
    ``create()`` would and never updates them. An ``auto_now_add`` time (refused by E034 too), a
    text field whose default is "" without ``blank=True`` and a field with only a database
    default (both passing E034) were each refused (``rows[0].added: must not be null``,
    ``rows[0].note: must not be empty``, ``rows[0].flag: must be a string, not
    DatabaseDefault``), so such a model could not be synced at all."""
    attributes = {
        "code": models.IntegerField(unique=True),
        "name": models.CharField(max_length=20),
        "added": models.DateTimeField(auto_now_add=True),
        "note": models.CharField(max_length=20, default=""),  # not blank=True
        "flag": models.CharField(max_length=5, db_default="yes"),
        "sync_key": ("code",),
        "sync_fields": ("name",),
    }
    with temporary_tracked_model("ProjectOwned", attributes) as model:
        from runs_app.tracking import check_declaration

        assert check_declaration(model) == []  # type: ignore[arg-type]
        start = timezone.now()
        flushed_run_of(model, "s", [{"code": 1, "name": "first"}])
        first = model._base_manager.values().get()
        assert first["added"] >= start
        assert (first["note"], first["flag"], first["name"]) == ("", "yes", "first")
        model._base_manager.update(note="the project's", flag="no")
        flushed_run_of(model, "s", [{"code": 1, "name": "second"}])
        second = model._base_manager.values().get()
        assert (second["name"], second["note"], second["flag"]) == ("second", "the project's", "no")
        assert second["added"] == first["added"]


def test_auto_now_fields_of_a_model_owning_every_field() -> None:
    """With ``sync_fields = None`` an ``auto_now_add`` field is the project's bookkeeping (set
    once, at insert) and an ``auto_now`` field changes on every write, as with ``save()``; a row
    need not give either."""
    attributes = {
        "code": models.IntegerField(unique=True),
        "added": models.DateTimeField(auto_now_add=True),
        "touched": models.DateTimeField(auto_now=True),
        "sync_key": ("code",),
    }
    with temporary_tracked_model("AutoTimes", attributes) as model:
        flushed_run_of(model, "s", [{"code": 1}])
        first = model._base_manager.values().get()
        flushed_run_of(model, "s", [{"code": 1}])
        second = model._base_manager.values().get()
        assert second["added"] == first["added"]
        assert second["touched"] > first["touched"]


@pytest.mark.parametrize(
    "value", [7.9, 7.5, Decimal("7.25"), -0.5], ids=["float", "half", "decimal", "negative"]
)
def test_an_integer_given_with_a_fraction_is_refused_not_truncated(value: Any) -> None:
    """``IntegerField.to_python(7.9)`` is ``int(7.9) == 7``: the row silently became key 7 and,
    in the same batch, replaced the source's real row 7 (seen 1, not 2)."""
    run = services.create_run("geo")
    with pytest.raises(FlushFailed) as caught, services.flush(run, Site) as flush:
        flush.write([{"id": 7, "name": "seven"}, {"id": value, "name": "not seven"}])
    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput) and cause.field == "sites[1].id", cause
    assert not Site.objects.exists()
    # A column that is not a key is no different: a port of 80.5 is not port 80.
    run = services.create_run("acme")
    with pytest.raises(FlushFailed) as caught, services.flush(run, Device) as flush:
        flush.write([row(Device, 0) | {"port": value if value > 0 else 80.5}])
    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput) and cause.field == "rows[0].port", cause


def test_integers_given_as_whole_floats_or_text_are_one_key() -> None:
    run = services.create_run("geo")
    with services.flush(run, Site) as flush:
        result = flush.write(
            [{"id": 7, "name": "a"}, {"id": 7.0, "name": "b"}, {"id": "7", "name": "c"}]
        )
    assert (result.seen, list(Site.objects.values_list("id", "name"))) == (1, [(7, "c")])


def test_nullable_json_stores_sql_null_alike_on_both_vendors() -> None:
    """A nullable JSON field given None (or left out without a default) is SQL NULL, not the
    JSON ``null``; a non-nullable one given None gets its default; JSON text values stay text."""
    attributes = {
        "code": models.IntegerField(unique=True),
        "doc": models.JSONField(null=True),
        "meta": models.JSONField(null=True, default=dict),
        "tags": models.JSONField(default=list),
        "sync_key": ("code",),
    }
    with temporary_tracked_model("NullableJson", attributes) as model:
        run = flushed_run_of(
            model,
            "s",
            [
                {"code": 1, "doc": None, "meta": None, "tags": None},
                {"code": 2},
                {"code": 3, "doc": "text", "meta": [None], "tags": {"a": None}},
            ],
        )
        rows = model._base_manager.order_by("code")
        assert list(rows.values_list("code", "doc", "meta", "tags")) == [
            (1, None, None, []),
            (2, None, {}, []),
            (3, "text", [None], {"a": None}),
        ]
        assert list(rows.filter(doc__isnull=True).values_list("code", flat=True)) == [1, 2]
        assert list(rows.filter(meta__isnull=True).values_list("code", flat=True)) == [1]
        # The audit of a removed row keeps the NULL a NULL.
        newer = flushed_run_of(model, "s", [{"code": 2}, {"code": 3}])
        services.safe_cleanup(newer, model)
        (event,) = events(newer, "removed", model)
        (record,) = event.payload["rows"]
        assert (record["code"], record["doc"], record["meta"], record["tags"]) == (
            1,
            None,
            None,
            [],
        )
        del run


def test_a_foreign_key_as_the_sync_key() -> None:
    """One row per site and tenant: the key is the foreign key itself, given by name or by
    attname, deduplicated as one key, confirmed, cleaned up and audited by its id."""
    attributes = {
        "tenant": models.CharField(max_length=200),
        "site": models.ForeignKey(Site, on_delete=models.CASCADE),
        "label": models.CharField(max_length=20),
        "sync_key": ("site",),
        "sync_scope": "tenant",
    }
    meta = {
        "constraints": [models.UniqueConstraint(fields=["tenant", "site"], name="per_site_key")]
    }
    Site.objects.bulk_create(Site(id=index, name=f"site {index}") for index in range(1, 7))
    with temporary_tracked_model("PerSite", attributes, meta) as model:
        flushed_run_of(
            model, "acme", [{"site": index, "label": "v1"} for index in (5, 1, 3, 2, 4, 6)]
        )
        flushed_run_of(model, "other", [{"site": 1, "label": "other"}])
        run = services.create_run("acme")
        with services.flush(run, model) as flush:
            result = flush.write(
                [
                    {"site": 1, "label": "x"},
                    {"site_id": 2, "label": "v2"},
                    {"site_id": 1, "label": "v2"},
                ]
                + [{"site": site, "label": "v2"} for site in (4, 3)]
            )
        assert (result.seen, result.created, result.updated) == (4, 0, 4)
        (flushed,) = events(run, "flushed", model)
        assert (flushed.payload["first_key"], flushed.payload["last_key"]) == (1, 4)
        run = services.complete_run(run)
        plan = services.safe_cleanup(run, model, dry_run=True)
        assert (plan.planned, plan.sample_keys) == (2, (5, 6))
        assert services.safe_cleanup(run, model).removed == 2
        acme = model._base_manager.filter(tenant="acme")
        assert sorted(acme.values_list("site_id", "label")) == [(i, "v2") for i in range(1, 5)]
        assert model._base_manager.filter(tenant="other").count() == 1
        (removed,) = events(run, "removed", model)
        assert [record["site_id"] for record in removed.payload["rows"]] == [5, 6]


def test_non_ascii_text_keys_sort_alike_in_the_flush_the_database_and_the_cleanup() -> None:
    """The flush writes (and locks) a batch in code point order; the cleanup locks in ``COLLATE
    "C"`` order. Both must be one order, or a flush and a cleanup could deadlock: keys with
    accents, combining marks, other scripts, full-width and astral characters, cases."""
    logins = [
        "zoé",
        "Zoe",
        "zoe",
        "éa",
        "a",
        "ä",
        "\U0001f600",
        "é",
        "e\u0301",
        "日本",
        "\uff5a",
        "A",
    ]
    first = services.create_run("org")
    with services.flush(first, Membership) as flush:
        flush.write({"repo_id": 1, "login": login, "role": "r"} for login in logins)
    services.complete_run(first)
    (flushed,) = events(first, "flushed", Membership)
    expected = sorted(logins)
    assert (flushed.payload["first_key"], flushed.payload["last_key"]) == (
        [1, expected[0]],
        [1, expected[-1]],
    )
    collate = ' COLLATE "C"' if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT login FROM tracked_app_membership ORDER BY login{collate}")
        assert [login for (login,) in cursor.fetchall()] == expected
    run = services.create_run("org")
    with services.flush(run, Membership) as flush:
        flush.write({"repo_id": 1, "login": login, "role": "r"} for login in logins[:5])
    run = services.complete_run(run)
    gone = sorted(logins[5:])
    result = services.safe_cleanup(run, Membership, force=True)
    assert result.sample_keys == tuple([1, login] for login in gone)
    records = [r for e in events(run, "removed", Membership) for r in e.payload["rows"]]
    assert [record["login"] for record in records] == gone


# SQLite's bound variable limit: as this build has it, SQLite's default (32,766) and the one
# before SQLite 3.32 (999). Only SQLite has one (a PostgreSQL pass runs the first case only, so
# it skips nothing).
VARIABLE_LIMITS = [None, 32766, 999] if connection.vendor == "sqlite" else [None]


@pytest.mark.parametrize("limit", VARIABLE_LIMITS, ids=lambda limit: f"limit-{limit or 'build'}")
def test_batches_above_sqlites_variable_limit_are_counted_exactly(limit: int | None) -> None:
    """Batches of 5,000 rows of Device's 11 columns: 55,000 values, over SQLite's default bound
    variable limit (32,766; 999 before SQLite 3.32). Every batch is chunked inside its one
    transaction; created and updated stay exact."""
    ensure_site()
    with sqlite_variable_limit(limit):
        first = services.create_run("acme")
        with services.flush(first, Device, batch_size=5000) as flush:
            assert flush.write(row(Device, index) for index in range(12_000)).created == 12_000
        services.complete_run(first)
        run = services.create_run("acme")
        with services.flush(run, Device, batch_size=5000) as flush:
            result = flush.write(row(Device, index, "v2") for index in range(6_000, 13_000))
        assert (result.seen, result.created, result.updated) == (7_000, 1_000, 6_000)
        run = services.complete_run(run)
    ledger = line(run, Device)
    assert ledger is not None and (ledger.rows_created, ledger.rows_confirmed) == (1_000, 7_000)
    assert Device.objects.count() == 13_000
    assert Device.objects.filter(last_seen_run=run, name__startswith="v2").count() == 7_000
    assert [e.payload["seen"] for e in events(run, "flushed", Device)] == [5_000, 2_000]


@contextmanager
def sqlite_variable_limit(limit: int | None) -> Iterator[None]:
    if limit is None:
        yield
        return
    connection.ensure_connection()
    raw = connection.connection
    previous = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    try:
        yield
    finally:
        raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, previous)


@pytest.mark.parametrize("limit", [32766, 999])
def test_one_upsert_statement_per_batch_of_5000(limit: int) -> None:
    """The batch travels as one JSON text on both vendors: the bound-variable limit (SQLite's
    default, and the 999 of older builds) never splits it."""
    ensure_site()
    with sqlite_variable_limit(limit if connection.vendor == "sqlite" else None):
        run = services.create_run("acme")
        with (
            CaptureQueriesContext(connection) as queries,
            services.flush(run, Device, batch_size=5000) as flush,
        ):
            flush.write(row(Device, index) for index in range(5000))
    upserts = [
        q for q in queries.captured_queries if 'INSERT INTO "tracked_app_device"' in q["sql"]
    ]
    assert len(upserts) == 1
    assert Device.objects.filter(last_seen_run=run).count() == 5000


def test_a_row_given_as_an_instance_of_another_model_is_refused() -> None:
    run = services.create_run("acme")
    with pytest.raises(FlushFailed) as caught, services.flush(run, Device) as flush:
        flush.write([row(Device, 0), Site(id=1, name="a site is not a device")])
    cause = caught.value.__cause__
    assert isinstance(cause, InvalidInput) and cause.field == "rows[1]"
    assert "Device instance, not Site" in str(cause)
    assert not Device.objects.exists()
    run = services.create_run("org")
    with pytest.raises(FlushFailed), services.flush(run, Membership) as flush:
        flush.write([Device(uid=uid(0), name="a device is not a membership")])
    assert not Membership.objects.exists()


def test_an_instance_takes_only_the_fields_the_source_owns() -> None:
    """An instance's scope, stamps and project fields are not the source's: the row goes into
    the run's scope, stamped by the run, and the project's fields get their defaults."""
    ensure_site()
    stranger = flushed_run("other", Device, range(0))
    instance = Device(
        uid=uid(0),
        name="from an instance",
        site_id=1,
        tenant="other",
        note="not the source's",
        last_seen_run_id=stranger.pk,
        last_confirmed_run_id=stranger.pk,
    )
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write([instance])
    stored = Device.objects.get()
    assert (stored.tenant, stored.note, stored.site_id) == ("acme", "", 1)
    assert (stored.last_seen_run_id, stored.last_confirmed_run_id) == (run.pk, None)
    assert stored.token != instance.token


def test_duplicate_keys_within_a_batch_and_across_batches() -> None:
    """Within a batch the last row of a key wins (even given as another spelling of the same
    UUID); across batches each batch counts it. The table and the confirmations count rows."""
    ensure_site()
    run = services.create_run("acme")
    rows = [
        row(Device, 0),
        row(Device, 1),
        row(Device, 0, "v2"),  # the same batch: the last row of key 0 wins
        row(Device, 2) | {"uid": str(uid(2)).upper()},
        row(Device, 2, "v3") | {"uid": uid(2).hex},  # the same key, spelt otherwise
        row(Device, 3),
        row(Device, 1, "v4"),  # the next batch: key 1 again, an update
    ]
    with services.flush(run, Device, batch_size=3) as flush:
        result = flush.write(rows)
    assert (result.seen, result.created, result.updated) == (5, 4, 1)
    run = services.complete_run(run)
    assert dict(Device.objects.values_list("uid", "name")) == {
        uid(0): "v2 device 0",
        uid(1): "v4 device 1",
        uid(2): "v3 device 2",
        uid(3): "v1 device 3",
    }
    ledger = line(run, Device)
    assert ledger is not None and (ledger.rows_seen, ledger.rows_confirmed) == (5, 4)
    assert [e.payload["seen"] for e in events(run, "flushed", Device)] == [2, 2, 1]


def test_cleanup_never_deletes_a_row_the_project_moved_to_another_tenant() -> None:
    """The project moves a device to another tenant (its own code, the admin): the row keeps
    the stamp of the old tenant's run. The old tenant's next cleanup must leave it alone; on
    PostgreSQL it deleted it (the batch's pick, lock and DELETE filtered by run, not by scope):
    planned 4, removed 5, a row of tenant "b" gone with its audit under tenant "a"."""
    ensure_site()
    flushed_run("a", Device, range(10))
    Device.objects.filter(uid=uid(9)).update(tenant="b")
    run = flushed_run("a", Device, range(5))
    result = services.safe_cleanup(run, Device)
    assert (result.planned, result.removed) == (4, 4)
    assert list(Device.objects.filter(tenant="b").values_list("uid", flat=True)) == [uid(9)]
    records = [r for e in events(run, "removed", Device) for r in e.payload["rows"]]
    assert sorted(uuid.UUID(r["uid"]) for r in records) == [uid(i) for i in range(5, 9)]


def test_binary_fields_round_trip_and_their_rows_can_be_audited() -> None:
    """A BinaryField: on PostgreSQL the flush stored the text ``Binary(b'...')`` instead of the
    bytes (psycopg's adapter object turned into text), or failed (``invalid input syntax for type
    bytea``); on SQLite the cleanup could never run (``json_object``: JSON cannot hold BLOB
    values)."""
    attributes = {
        "code": models.IntegerField(unique=True),
        "blob": models.BinaryField(null=True),
        "sync_key": ("code",),
    }
    values = [b"plain", b"\x00\xff\\x41'\"", b"", memoryview(b"view"), None]
    with temporary_tracked_model("Blobs", attributes) as model:
        flushed_run_of(model, "s", [{"code": i, "blob": v} for i, v in enumerate(values)])
        stored = dict(model._base_manager.values_list("code", "blob"))
        assert {code: None if blob is None else bytes(blob) for code, blob in stored.items()} == {
            i: None if v is None else bytes(v) for i, v in enumerate(values)
        }
        run = flushed_run_of(model, "s", [{"code": i, "blob": b"kept"} for i in range(3)])
        assert services.safe_cleanup(run, model).removed == 2
        records = [r for e in events(run, "removed", model) for r in e.payload["rows"]]
        # As PostgreSQL's row_to_json writes bytea: "\x" and the hex digits.
        assert [(r["code"], r["blob"]) for r in records] == [(3, "\\x76696577"), (4, None)]


def test_a_scope_longer_than_the_scope_field_is_refused_when_the_session_opens() -> None:
    """The run's scope does not fit the model's scope field: SQLite stored it anyway (it does not
    enforce max_length) while PostgreSQL failed the first batch with a DataError. It is refused
    on both when the session opens, naming the field, before anything is written."""
    attributes = {
        "tenant": models.CharField(max_length=4),
        "code": models.IntegerField(),
        "sync_key": ("code",),
        "sync_scope": "tenant",
    }
    meta = {"constraints": [models.UniqueConstraint(fields=["tenant", "code"], name="short_key")]}
    with temporary_tracked_model("ShortScope", attributes, meta) as model:
        run = services.create_run("acme-corp")
        with pytest.raises(InvalidInput) as caught, services.flush(run, model) as flush:
            flush.write([{"code": 1}])
        assert caught.value.field == "scope" and caught.value.limit == 4
        assert not model._base_manager.exists()
        assert line(run, model) is None
        flushed_run_of(model, "acme", [{"code": 1}])  # a scope that fits
        assert model._base_manager.get().tenant == "acme"  # type: ignore[attr-defined]


def test_cleanup_of_rows_another_model_references_refuses_and_undoes_the_batch() -> None:
    """Sites a Device still references (``on_delete=PROTECT``) cannot be deleted: the database
    refuses the batch holding one, which is undone whole, and the cleanup refuses
    ``rows_referenced``. No row gone without its audit; ledgers equal to the rows gone."""
    geo = services.create_run("geo")
    with services.flush(geo, Site) as flush:
        flush.write({"id": index, "name": f"site {index}"} for index in range(1, 11))
    services.complete_run(geo)
    Device.objects.create(tenant="t", uid=uid(0), name="still at site 9", site_id=9)
    run = services.create_run("geo")
    with services.flush(run, Site) as flush:
        flush.write({"id": index, "name": f"site {index}"} for index in range(1, 8))
    run = services.complete_run(run)
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 1}):
        with pytest.raises(CleanupRefused) as refused:
            services.safe_cleanup(run, Site)
        assert refused.value.reason == "rows_referenced"
        left = set(Site.objects.values_list("id", flat=True))
        assert 9 in left
        gone = set(range(1, 11)) - left
        records = [r["id"] for e in events(run, "removed", Site) for r in e.payload["rows"]]
        assert sorted(records) == sorted(gone)
        ledger = line(run, Site)
        assert ledger is not None and ledger.rows_removed == len(gone) == state(run).rows_removed
        assert (ledger.cleanup_status, ledger.cleanup_reason) == ("refused", "rows_referenced")
        # The reference gone, a rerun finishes: every row gone once, with its audit.
        Device.objects.all().delete()
        services.safe_cleanup(run, Site)
    assert set(Site.objects.values_list("id", flat=True)) == set(range(1, 8))
    records = [r["id"] for e in events(run, "removed", Site) for r in e.payload["rows"]]
    assert sorted(records) == [8, 9, 10]
    ledger = line(run, Site)
    assert ledger is not None and (ledger.rows_removed, ledger.cleanup_status) == (3, "done")


def test_an_owned_field_a_row_leaves_out_is_written_with_its_default() -> None:
    """``sync_fields`` are the source's: a row that leaves one out says "the default", on an
    update too (the row is the source's whole record of it); the project's fields stay."""
    ensure_site()
    flushed_run("acme", Device, range(1))
    Device.objects.update(note="the project's")
    run = services.create_run("acme")
    with services.flush(run, Device) as flush:
        flush.write([{"uid": uid(0), "name": "renamed"}])
    stored = Device.objects.get()
    assert (stored.name, stored.port, stored.site_id, stored.attrs, stored.kind) == (
        "renamed",
        0,
        None,
        {},
        "phone",
    )
    assert (stored.price, stored.seen_on, stored.note) == (None, None, "the project's")
