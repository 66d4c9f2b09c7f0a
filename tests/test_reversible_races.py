"""Races of reversible cleanup (issue 12) on PostgreSQL, with real worker processes (``python -c``
running Django with the suite's settings): a restore racing a newer run's flush of the same
keys, in both orders; two restores of one run at once; a soft cleanup racing a newer run's
flush that revives the same keys, in both orders.

The order is enforced, never hoped for: a worker holds its transaction open at a chosen
statement until a marker file says go, and the test waits for the other side to be blocked on
that transaction's locks (``pg_stat_activity``) before saying it. Every wait is bounded by a
timeout; no sleep stands in for a condition.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from runs_app import services
from runs_app.models import CleanupStatus, Run, RunEvent, RunModelState, RunStatus
from tests.helpers import WORKER_PRELUDE, Workers, finish_worker, waiting_on_a_lock
from tests.relay_helpers import wait_until
from tests.tracked_app.models import Asset, Device

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]

# The worker: ``python -c WORKER ROLE JSON``. Prints one JSON line with its outcome.
WORKER = (
    WORKER_PRELUDE
    + r"""
from django.db import connection, transaction
from django.db.utils import OperationalError
from django.test import override_settings
from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed
from tests.tracked_app.models import Asset, Device

model = Asset if args.get("model") == "asset" else Device
table = model._meta.db_table

def row(index, version):
    if model is Asset:
        return {"code": f"a{index:03d}", "name": f"{version} {index}", "size": index}
    return {"uid": uuid.UUID(int=index + 1), "name": f"{version} {index}", "port": index}

def hold_after(prefix, count):
    # Holds the transaction open after the count-th statement starting with prefix (on the
    # model's table) ran: its row locks stay taken until "go".
    seen = []
    def wrapper(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.startswith(prefix) and table in sql:
            seen.append(sql)
            if len(seen) == count:
                mark(f"{args['name']}-held")
                wait_for(args.get("go", "go"))
        return result
    return wrapper

def hold_before(needle):
    # Holds before the first statement containing needle on the model's table runs.
    held = []
    def wrapper(execute, sql, params, many, context):
        if needle in sql and table in sql and not held:
            held.append(sql)
            mark(f"{args['name']}-held")
            wait_for(args.get("go", "go"))
        return execute(sql, params, many, context)
    return wrapper

if role == "restore":
    wrapper = hold_after("INSERT INTO", args["hold_after"]) if args.get("hold_after") else None
    try:
        if wrapper is not None:
            with connection.execute_wrapper(wrapper):
                result = services.restore_cleanup(args["run_id"], model)
        else:
            result = services.restore_cleanup(args["run_id"], model)
        out.update(restored=result.restored, conflicts=result.conflicts,
                   conflict_keys=[str(key) for key in result.conflict_keys],
                   already_restored=result.already_restored)
    except OperationalError as exc:
        out["error"] = str(exc).splitlines()[0]

elif role == "flush":
    # A newer run of the scope (`run_id`, else created here) flushes `indexes` in one batch;
    # with "hold", its batch's transaction stays open after the write (its rows locked) until
    # "go".
    run = services.get_run(args["run_id"]) if args.get("run_id") else services.create_run(
        args["tenant"])
    out["run"] = run.pk
    mark(f"{args['name']}-created")
    try:
        with services.flush(run, model, batch_size=len(args["indexes"])) as flush:
            rows = [row(index, args["version"]) for index in args["indexes"]]
            if args.get("hold"):
                with transaction.atomic():
                    written = flush.write(rows)
                    mark(f"{args['name']}-held")
                    wait_for(args.get("go", "go"))
            else:
                written = flush.write(rows)
        out.update(created=written.created, updated=written.updated, revived=written.revived)
        out["status"] = services.complete_run(run).state.status
    except FlushFailed as exc:
        out["error"] = str(exc)

elif role == "cleaner":
    # A cleanup whose first batch holds: before locking its rows ("before") or after its
    # UPDATE / DELETE ran ("after"), until "go".
    if args["hold"] == "before":
        wrapper = hold_before("FOR UPDATE")
    else:
        wrapper = hold_after("UPDATE" if model is Asset else "DELETE", 1)
    with override_settings(RUNS_APP={"CLEANUP_MAX_DELETE_FRACTION": 1.0}):
        with connection.execute_wrapper(wrapper):
            try:
                out["removed"] = services.safe_cleanup(args["run_id"], model).removed
            except CleanupRefused as exc:
                out["refused"] = exc.reason
print(json.dumps(out))
"""
)

WORKERS = Workers(WORKER)
start_worker = WORKERS.start


@pytest.fixture(autouse=True)
def _kill_leftover_workers() -> Any:
    yield
    WORKERS.kill_leftovers()


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    return finish_worker(process, 120)


# Where a restore waits for a flush's batch, and a flush for a restore: on the rows, or (once
# the restore holds off the scope's writers) on the run's lock or its scope's creation lock.
RESTORE_WAITS = ("INSERT INTO", "FOR NO KEY UPDATE")
FLUSH_WAITS = ("WITH up AS", "FOR NO KEY UPDATE", "pg_advisory_xact_lock")


def held(directory: Path, name: str) -> None:
    wait_until(lambda: (directory / f"{name}-held").exists(), 90, f"{name} holding")


def go(directory: Path, name: str = "go") -> None:
    (directory / name).write_text("1")


def uid(index: int) -> uuid.UUID:
    return uuid.UUID(int=index + 1)


def code(index: int) -> str:
    return f"a{index:03d}"


def sync(model: type[Any], tenant: str, indexes: range | list[int], version: str = "v1") -> Run:
    run = services.create_run(tenant)
    with services.flush(run, model) as flush:
        if model is Asset:
            flush.write({"code": code(i), "name": f"{version} {i}", "size": i} for i in indexes)
        else:
            flush.write({"uid": uid(i), "name": f"{version} {i}", "port": i} for i in indexes)
    return services.complete_run(run)


def ledger(run_id: str, model: type[Any]) -> RunModelState:
    label = model._meta.label_lower
    return RunModelState.objects.get(run_id=run_id, model=label)


def devices(tenant: str = "acme") -> dict[uuid.UUID, tuple[str, str | None]]:
    """uid -> (name, last_seen_run_id); a uid twice would show as a shorter dict than count."""
    rows = list(Device.objects.filter(tenant=tenant).values_list("uid", "name", "last_seen_run"))
    found: dict[uuid.UUID, tuple[str, str | None]] = {key: (name, seen) for key, name, seen in rows}
    assert len(found) == len(rows), "a key exists twice"
    return found


def cleaned_devices() -> tuple[Run, dict[uuid.UUID, tuple[str, str | None]]]:
    """Devices 0-39 (a first run), then a run that saw 0-19: its cleanup removed 20-39.
    Returns the cleaning run and the devices as they were before its cleanup."""
    sync(Device, "acme", range(40))
    run = sync(Device, "acme", range(20))
    before = devices()
    assert services.safe_cleanup(run, Device).removed == 20
    return run, before


def check_restore_against_flush(
    cleaned: tuple[Run, dict[uuid.UUID, tuple[str, str | None]]],
    restore: dict[str, Any],
    flush: dict[str, Any],
    conflicts: set[int],
) -> None:
    """Every key once; the flush's values on every key it wrote; the restore's rows on the
    other keys it removed; the ledgers equal to the rows."""
    cleaning, before = cleaned
    stored = devices()
    flushed = set(range(30, 50))
    assert set(stored) == {uid(i) for i in range(50)}
    for index in flushed:
        assert stored[uid(index)] == (f"v2 {index}", flush["run"]), index
    for index in range(20, 30):
        assert stored[uid(index)] == before[uid(index)], index
    assert restore["restored"] == 20 - len(conflicts)
    assert restore["conflicts"] == len(conflicts)
    assert sorted(restore["conflict_keys"]) == sorted(str(uid(i)) for i in conflicts)
    line = ledger(cleaning.pk, Device)
    assert (line.rows_restored, line.restore_conflicts) == (20 - len(conflicts), len(conflicts))
    assert line.cleanup_status == CleanupStatus.RESTORED
    newer = ledger(flush["run"], Device)
    assert newer.rows_seen == 20 == newer.rows_created + newer.rows_updated
    assert (newer.rows_created, newer.rows_updated) == (flush["created"], flush["updated"])
    assert Device.objects.filter(last_seen_run=flush["run"]).count() == 20
    restored = RunEvent.objects.filter(run=cleaning, type="tracked_app.device.restored")
    assert sum(len(event.payload["rows"]) for event in restored) == restore["restored"]


def test_a_restore_after_a_newer_flush_of_the_same_keys_reports_them_as_conflicts(
    tmp_path: Path,
) -> None:
    """The newer run's batch (devices 30-49, 30-39 among those the cleanup removed) is written
    and held open; the restore starts and waits on it; the batch commits: the restore keeps
    the flush's rows and reports them as conflicts."""
    cleaned = cleaned_devices()
    flush = start_worker(
        "flush", tmp_path, name="flush", tenant="acme", indexes=list(range(30, 50)),
        version="v2", hold=True,
    )  # fmt: skip
    held(tmp_path, "flush")
    restore = start_worker("restore", tmp_path, name="restore", run_id=cleaned[0].pk)
    wait_until(lambda: waiting_on_a_lock(*RESTORE_WAITS), 60, "the restore waiting")
    go(tmp_path)
    flushed, restored = finish(flush), finish(restore)

    assert flushed["status"] == RunStatus.COMPLETED, flushed
    assert (flushed["created"], flushed["updated"]) == (20, 0)
    check_restore_against_flush(cleaned, restored, flushed, set(range(30, 40)))


def test_a_flush_after_a_restore_of_the_same_keys_updates_what_the_restore_put_back(
    tmp_path: Path,
) -> None:
    """The restore's INSERT ran and is held open; the newer run's batch waits on it; the
    restore commits: every removed row is back, then the flush updates those it lists."""
    cleaned = cleaned_devices()
    restore = start_worker("restore", tmp_path, name="restore", run_id=cleaned[0].pk, hold_after=1)
    held(tmp_path, "restore")
    flush = start_worker(
        "flush", tmp_path, name="flush", tenant="acme", indexes=list(range(30, 50)),
        version="v2",
    )  # fmt: skip
    wait_until(lambda: waiting_on_a_lock(*FLUSH_WAITS), 60, "the flush waiting")
    go(tmp_path)
    restored, flushed = finish(restore), finish(flush)

    assert flushed["status"] == RunStatus.COMPLETED, flushed
    assert (flushed["created"], flushed["updated"]) == (10, 10)
    check_restore_against_flush(cleaned, restored, flushed, set())


def test_two_restores_of_one_run_at_once_restore_once(tmp_path: Path) -> None:
    cleaned, _ = cleaned_devices()
    first = start_worker("restore", tmp_path, name="first", run_id=cleaned.pk, hold_after=1)
    held(tmp_path, "first")
    second = start_worker("restore", tmp_path, name="second", run_id=cleaned.pk)
    wait_until(lambda: waiting_on_a_lock("FOR NO KEY UPDATE"), 60, "the second restore waiting")
    go(tmp_path)
    results = sorted([finish(first), finish(second)], key=lambda result: result["restored"])

    assert results[0]["already_restored"] and results[0]["restored"] == 0, results
    assert not results[1]["already_restored"] and results[1]["restored"] == 20, results
    assert set(devices()) == {uid(i) for i in range(40)}
    assert RunEvent.objects.filter(run=cleaned, type="cleanup.restored").count() == 1
    restored = RunEvent.objects.filter(run=cleaned, type="tracked_app.device.restored")
    assert sum(len(event.payload["rows"]) for event in restored) == 20
    assert ledger(cleaned.pk, Device).rows_restored == 20


def check_revived(cleaning: Run, flushed: dict[str, Any], cleaned: dict[str, Any]) -> None:
    """No row the newer run saw is tombstoned; it holds the newer run's values; the others
    the cleanup removed are tombstoned with their audit; the cleanup's ledger counts its
    audit; the newer run never counts more revivals than there were tombstones."""
    assert flushed["status"] == RunStatus.COMPLETED, flushed
    rows = {asset.code: asset for asset in Asset.objects.filter(tenant="acme")}
    assert len(rows) == 40
    for index in range(20, 40):  # the newer run's rows
        asset = rows[code(index)]
        assert asset.deleted_at is None and asset.deleted_by_run_id is None, index
        assert (asset.name, asset.last_seen_run_id) == (f"v2 {index}", flushed["run"])
    for index in range(20):
        assert rows[code(index)].deleted_at is None  # the cleaning run saw them
    audited = [
        record["code"]
        for event in RunEvent.objects.filter(run=cleaning, type="assets.removed")
        for record in event.payload["rows"]
    ]
    assert len(audited) == len(set(audited)) == cleaned["removed"]
    assert set(audited) <= {code(i) for i in range(20, 40)}
    line = ledger(cleaning.pk, Asset)
    assert (line.rows_removed, line.cleanup_status) == (cleaned["removed"], CleanupStatus.DONE)
    newer = ledger(flushed["run"], Asset)
    assert newer.rows_revived == flushed["revived"] <= cleaned["removed"]
    assert newer.rows_seen == 20


@pytest.mark.parametrize("first", ["cleanup", "flush"])
def test_a_soft_cleanup_racing_a_newer_flush_of_the_same_keys_never_tombstones_its_rows(
    first: str, tmp_path: Path
) -> None:
    """Assets 0-39, the cleaning run saw 0-19; its cleanup has made its plan when a newer run
    flushes 20-39 again. ``cleanup`` first: the batch's tombstones are written and held
    uncommitted while the flush waits on them. ``flush`` first: the flush's batch is written
    and held while the cleanup's batch waits to lock the rows. Either way, no row the newer
    run saw ends tombstoned."""
    sync(Asset, "acme", range(40))
    cleaning = sync(Asset, "acme", range(20))
    hold = "after" if first == "cleanup" else "before"
    cleaner = start_worker(
        "cleaner", tmp_path, name="cleaner", model="asset", run_id=cleaning.pk, hold=hold
    )
    held(tmp_path, "cleaner")  # the plan is made: the newer run does not supersede it now
    flush = start_worker(
        "flush", tmp_path, name="flush", model="asset", tenant="acme",
        indexes=list(range(20, 40)), version="v2", hold=first == "flush", go="go-flush",
    )  # fmt: skip
    if first == "cleanup":
        wait_until(lambda: waiting_on_a_lock("WITH up AS"), 60, "the flush waiting")
        go(tmp_path)
        cleaned = finish(cleaner)
        go(tmp_path, "go-flush")
        flushed = finish(flush)
        assert cleaned["removed"] == 20
    else:
        held(tmp_path, "flush")
        go(tmp_path)
        wait_until(lambda: waiting_on_a_lock("FOR UPDATE"), 60, "the cleanup waiting")
        go(tmp_path, "go-flush")
        flushed, cleaned = finish(flush), finish(cleaner)
        assert (cleaned["removed"], flushed["revived"]) == (0, 0)
    check_revived(cleaning, flushed, cleaned)
    # Undoing the cleanup now puts nothing back over the newer run's rows.
    result = services.restore_cleanup(cleaning, Asset)
    assert (result.restored, result.conflicts) == (0, cleaned["removed"])
    assert Asset.objects.filter(tenant="acme", deleted_at__isnull=False).count() == 0


def test_a_restore_whose_audit_interleaves_with_a_newer_batch_never_deadlocks_it(
    tmp_path: Path,
) -> None:
    """The cleanup removed devices 10-19 in its first batch (last seen by the oldest run) and
    0-9 in its second: two audit events, restored one INSERT after the other. A newer run,
    active already, writes 0-19 in one batch, in key order, while the restore holds 10-19
    inserted. Before the restore held off the scope's writers, the batch inserted 0-9, waited
    on 10, the restore went on to 0-9 and waited on the batch: "deadlock detected", and the
    newer run's flush failed. Now the batch waits for the restore, then updates its rows."""
    sync(Device, "acme", range(10, 20))
    second = services.create_run("acme")
    with services.flush(second, Device) as session:
        session.write(
            {"uid": uid(i), "name": f"v1 {i}", "port": i} for i in [*range(10), *range(20, 30)]
        )
    services.complete_run(second)
    cleaning = sync(Device, "acme", range(20, 30))
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": 10}):
        assert services.safe_cleanup(cleaning, Device, force=True).removed == 20
    events = RunEvent.objects.filter(run=cleaning, type="tracked_app.device.removed")
    assert [
        sorted(uuid.UUID(record["uid"]) for record in event.payload["rows"])
        for event in events.order_by("seq")
    ] == [[uid(i) for i in range(10, 20)], [uid(i) for i in range(10)]]
    newer = services.create_run("acme")
    restore = start_worker("restore", tmp_path, name="restore", run_id=cleaning.pk, hold_after=1)
    held(tmp_path, "restore")
    flush = start_worker(
        "flush", tmp_path, name="flush", run_id=newer.pk, indexes=list(range(20)),
        version="v2",
    )  # fmt: skip
    wait_until(lambda: waiting_on_a_lock(*FLUSH_WAITS), 60, "the flush waiting")
    go(tmp_path)
    restored, flushed = finish(restore), finish(flush)

    assert "error" not in flushed and flushed["status"] == RunStatus.COMPLETED, flushed
    assert (restored["restored"], restored["conflicts"]) == (20, 0), restored
    assert (flushed["created"], flushed["updated"]) == (0, 20)
    stored = devices()
    assert set(stored) == {uid(i) for i in range(30)}
    assert all(stored[uid(i)] == (f"v2 {i}", newer.pk) for i in range(20))
