"""Races of tracked models (issue 11) on PostgreSQL, with real worker processes (``python -c``
running Django with the suite's settings, so ``Device`` and ``Membership`` exist).

Synchronisation is by marker files in the test's temporary directory and by waiting for
conditions of the database (a row count, a backend waiting on a lock), every wait bounded by a
timeout: no sleep stands in for a condition. Every worker is bounded in count and time.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from runs_app import services
from runs_app.models import (
    FlushStatus,
    Run,
    RunEvent,
    RunFlushSession,
    RunModelState,
    RunState,
    RunStatus,
)
from tests.helpers import WORKER_PRELUDE, Workers, finish_worker
from tests.relay_helpers import wait_until
from tests.tracked_app.models import Device, Membership

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]

TOTAL = 1000  # devices of a tenant before the race
PAGE = 50  # rows a page, and a batch
MEMBERS = 20_000  # memberships of the lock-order race

# The worker: ``python -c WORKER ROLE JSON``. Prints one JSON line with its outcome.
WORKER = (
    WORKER_PRELUDE
    + r"""
from django.test import override_settings
from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed, RunClosed
from tests.tracked_app.models import Device, Membership

LOGINS = ["zoé", "Zoe", "ada", "éa", "ä", "日本", "\U0001f600", "e\u0301", "bob", "Ω"]

def device(index, version):
    return {"uid": uuid.UUID(int=index + 1), "name": f"{version} {index}", "port": index,
            "attrs": {"v": version}}

def member(index, version):
    return {"repo_id": index // len(LOGINS), "login": LOGINS[index % len(LOGINS)],
            "role": version}

def pages(indexes, version, model="device"):
    make = device if model == "device" else member
    for start in range(0, len(indexes), args.get("page", 50)):
        yield [make(i, version) for i in indexes[start:start + args.get("page", 50)]]

def clean(run, model=Device):
    try:
        result = services.safe_cleanup(run, model)
        out["removed"] = result.removed
    except CleanupRefused as exc:
        out["refused"] = exc.reason

if role == "tenant":
    # A whole sync of one tenant: its run, a flush page by page, completion, cleanup.
    run = services.create_run(args["tenant"])
    out["run"] = run.pk
    with services.flush(run, Device, batch_size=args["page"]) as flush:
        mark(f"{args['name']}-open")
        wait_for(f"{args['other']}-open")
        for page in pages(args["indexes"], args["version"]):
            flush.write(page)
    out["status"] = services.complete_run(run).state.status
    clean(run)

elif role == "zombie":
    # A run's worker that stalls (no heartbeat) after `pause_after` pages, is reaped, then wakes
    # up and goes on writing as if nothing happened, re-opening sessions until told to stop.
    written, refused = 0, 0
    page_list = list(pages(args["indexes"], "zombie"))
    try:
        with services.flush(args["run_id"], Device, batch_size=args["page"]) as flush:
            for number, page in enumerate(page_list):
                if number == args["pause_after"]:
                    mark("zombie-paused")
                    wait_for("zombie-go")
                if number == args.get("hold_at"):
                    # This batch's transaction stays open (its locks held) until "zombie-go".
                    from django.db import transaction
                    with transaction.atomic():
                        flush.write(page)
                        mark("zombie-held")
                        wait_for("zombie-go")
                    # Stalled again right after the commit: else its next batch could take the
                    # run's lock before the waiting reaper and refresh its heartbeat (alive,
                    # not reaped: correct, but not this test's race).
                    wait_for("newer-created")
                else:
                    flush.write(page)
                written += 1
        out["flush"] = "closed"
    except RunClosed:
        out["flush"] = "run_closed"
    attempts, deadline = 0, time.monotonic() + 120
    while not (directory / "zombie-stop").exists():
        if attempts >= 100_000 or time.monotonic() > deadline:
            raise SystemExit("zombie: never told to stop")
        attempts += 1
        try:
            with services.flush(args["run_id"], Device, batch_size=args["page"]) as flush:
                flush.write(page_list[attempts % len(page_list)])
            out["late"] = "written"  # must never happen
            break
        except RunClosed:
            refused += 1
    out.update(written=written, refused=refused)

elif role == "newer":
    # The scope's next run: its creation reaps the stalled run; then a whole sync.
    with override_settings(RUNS_APP={"RUN_STALE_AFTER": args["stale_after"]}):
        run = services.create_run(args["tenant"])
    out["run"] = run.pk
    mark("newer-created")
    with services.flush(run, Device, batch_size=args["page"]) as flush:
        for page in pages(args["indexes"], "newer"):
            flush.write(page)
    out["status"] = services.complete_run(run).state.status
    clean(run)
    mark("zombie-stop")

elif role == "shared":
    # One of two workers of one run, each flushing its own model; "fail_after" pages in, the
    # source of this one fails.
    model = Device if args["model"] == "device" else Membership
    name = args["model"]
    try:
        with services.flush(args["run_id"], model, batch_size=args["page"]) as flush:
            mark(f"{name}-open")
            wait_for(f"{args['other']}-open")
            for number, page in enumerate(pages(args["indexes"], "v2", args["model"])):
                if number == args.get("fail_after"):
                    raise ConnectionError("the source went away between two pages")
                flush.write(page)
        out["flush"] = "closed"
    except (FlushFailed, RunClosed) as exc:
        out["flush"] = type(exc).__name__
    try:
        out["status"] = services.complete_run(args["run_id"]).state.status
    except RunClosed:
        out["status"] = "already_closed"
    clean(args["run_id"], model)

elif role == "cleaner":
    # A cleanup whose first batch, its rows picked, waits for "go" just before locking them.
    from django.db import connection
    model = Membership if args["model"] == "membership" else Device
    table = model._meta.db_table
    def hold(execute, sql, params, many, context):
        locking = table in sql and sql.endswith("FOR UPDATE")
        if locking and not (directory / "cleaner-ready").exists():
            mark("cleaner-ready")
            wait_for("go")
        return execute(sql, params, many, context)
    with override_settings(RUNS_APP={"CLEANUP_BATCH_SIZE": args["batch"],
                                     "CLEANUP_MAX_DELETE_FRACTION": 1.0}):
        with connection.execute_wrapper(hold):
            clean(args["run_id"], model)

elif role == "restamper":
    # A newer run of the scope whose first batch, checked and locked to its run, waits for
    # "go" just before its upsert statement.
    from django.db import connection
    def hold(execute, sql, params, many, context):
        if sql.startswith("WITH up AS (INSERT") and not (directory / "restamper-ready").exists():
            mark("restamper-ready")
            wait_for("go")
        return execute(sql, params, many, context)
    run = services.create_run(args["scope"])
    out["run"] = run.pk
    with connection.execute_wrapper(hold):
        with services.flush(run, Membership, batch_size=args["page"]) as flush:
            for page in pages(args["indexes"], "newer", "membership"):
                flush.write(page)
    out["status"] = services.complete_run(run).state.status
print(json.dumps(out))
"""
)


WORKERS = Workers(WORKER)
start_worker = WORKERS.start


@pytest.fixture(autouse=True)
def _kill_leftover_workers() -> Any:
    yield
    WORKERS.kill_leftovers()


def finish(process: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    return finish_worker(process, timeout)


def uid(index: int) -> uuid.UUID:
    return uuid.UUID(int=index + 1)


def seed(tenant: str, indexes: range) -> Run:
    """A completed run of ``tenant`` that flushed devices ``indexes``."""
    run = services.create_run(tenant)
    with services.flush(run, Device) as flush:
        flush.write({"uid": uid(i), "name": f"v1 {i}", "port": i} for i in indexes)
    return services.complete_run(run)


def devices(tenant: str) -> dict[uuid.UUID, str | None]:
    """The tenant's devices: uid -> last_seen_run_id."""
    return dict(Device.objects.filter(tenant=tenant).values_list("uid", "last_seen_run_id"))


def removed_uids(run_id: str) -> list[uuid.UUID]:
    """The uids the run's cleanup audited, one entry per audit record (all in its scope)."""
    scope = Run.objects.get(pk=run_id).scope
    uids = []
    for event in RunEvent.objects.filter(run_id=run_id, type="tracked_app.device.removed"):
        assert event.payload["scope"] == scope
        uids += [uuid.UUID(record["uid"]) for record in event.payload["rows"]]
    return uids


def ledger(run_id: str, model: str = "tracked_app.device") -> RunModelState:
    return RunModelState.objects.get(run_id=run_id, model=model)


def waiting_on_a_lock(statement: str) -> bool:
    """A backend of the test database is waiting on a lock, running a statement that contains
    ``statement`` (so a lock wait of another kind, e.g. autovacuum's, is not mistaken for it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND pid <> pg_backend_pid() "
            "AND position(%s in query) > 0",
            [statement],
        )
        return bool(cursor.fetchone()[0])


# -- (a) two tenants at once -------------------------------------------------------------------


def test_two_tenants_flushed_and_cleaned_up_at_once_never_touch_each_other(
    tmp_path: Path,
) -> None:
    """Both tenants hold the same 1,000 device uids. Two processes each flush their tenant in 20
    batches (900 of the old uids and 50 new ones), at once, then complete and clean up while the
    other may still be flushing: each removes exactly its 100 missing devices."""
    seed("t1", range(TOTAL))
    seed("t2", range(TOTAL))
    plans = {
        "t1": [*range(0, 900), *range(1000, 1050)],
        "t2": [*range(100, 1000), *range(1050, 1100)],
    }
    workers = {
        tenant: start_worker(
            "tenant",
            tmp_path,
            tenant=tenant,
            name=tenant,
            other="t2" if tenant == "t1" else "t1",
            indexes=indexes[::-1],  # reversed: each batch is sorted by the flush anyway
            version=f"{tenant}-v2",
            page=PAGE,
        )
        for tenant, indexes in plans.items()
    }
    results = {tenant: finish(worker) for tenant, worker in workers.items()}
    for tenant, indexes in plans.items():
        result = results[tenant]
        run_id = result["run"]
        assert (result["status"], result.get("removed")) == (RunStatus.COMPLETED, 100), result
        stored = devices(tenant)
        assert set(stored) == {uid(i) for i in indexes}
        assert set(stored.values()) == {run_id}
        names = set(Device.objects.filter(tenant=tenant).values_list("name", flat=True))
        assert all(name.startswith(f"{tenant}-v2 ") for name in names)
        gone = set(range(TOTAL)) - set(indexes)
        assert sorted(removed_uids(run_id)) == sorted(uid(i) for i in gone)
        line = ledger(run_id)
        assert (line.rows_seen, line.rows_created, line.rows_updated) == (950, 50, 900)
        assert (line.rows_confirmed, line.rows_removed) == (950, 100)
        assert RunFlushSession.objects.get(run_id=run_id).batches == 950 // PAGE
    assert Device.objects.count() == 1900


# -- (b) a zombie run ----------------------------------------------------------------------------


def test_a_reaped_zombie_still_flushing_never_writes_and_the_newer_run_loses_nothing(
    tmp_path: Path,
) -> None:
    """The zombie writes 5 of its 20 pages (uids 0-249 of its 1,000 - 1,100 source), stalls, is
    reaped by the newer run's creation, then wakes up and keeps writing and re-opening sessions
    while the newer run flushes 800 devices, completes and cleans up. Every zombie write after
    the reap is refused (RunClosed); the newer run keeps all it saw and removes exactly the rest,
    including what the zombie created before it was reaped."""
    tenant = "zombie-a"
    seed(tenant, range(TOTAL))
    zombie = services.create_run(tenant)
    zombie_indexes = [*range(1000, 1100), *range(0, 900)]  # 100 new devices first
    z = start_worker(
        "zombie",
        tmp_path,
        run_id=zombie.pk,
        indexes=zombie_indexes,
        page=PAGE,
        pause_after=5,
    )
    wait_until(lambda: (tmp_path / "zombie-paused").exists(), what="the zombie stalling")
    # The zombie's last heartbeat is long ago: the newer run's creation reaps it.
    RunState.objects.filter(run=zombie).update(heartbeat_at=timezone.now() - timedelta(hours=2))
    newer_indexes = list(range(150, 950))
    n = start_worker(
        "newer", tmp_path, tenant=tenant, indexes=newer_indexes, page=PAGE, stale_after=3600
    )
    wait_until(lambda: (tmp_path / "newer-created").exists(), what="the newer run created")
    (tmp_path / "zombie-go").write_text("1")
    newer = finish(n)
    result = finish(z)

    assert result["flush"] == "run_closed" and "late" not in result, result
    assert result["written"] == 5 and result["refused"] >= 1, result
    zombie_state = RunState.objects.get(run=zombie)
    assert (zombie_state.status, zombie_state.error[:6]) == (RunStatus.FAILED, "stale:")
    # Nothing of the zombie's after its run.failed: its 5 batches, then the reaping.
    zombie_events = list(RunEvent.objects.filter(run=zombie).order_by("seq"))
    types = [event.type for event in zombie_events]
    assert types.count("tracked_app.device.flushed") == 5
    assert types[-1] == "run.failed", types
    assert RunFlushSession.objects.get(run=zombie).batches == 5

    assert (newer["status"], newer.get("removed")) == (RunStatus.COMPLETED, 300), newer
    stored = devices(tenant)
    assert set(stored) == {uid(i) for i in newer_indexes}
    assert set(stored.values()) == {newer["run"]}
    seen_before = {uid(i) for i in range(TOTAL)} | {uid(i) for i in range(1000, 1100)}
    assert sorted(removed_uids(newer["run"])) == sorted(seen_before - set(stored))
    assert ledger(newer["run"]).rows_removed == 300


def test_a_zombie_batch_committing_while_the_newer_run_reaps_it(tmp_path: Path) -> None:
    """The zombie's 3rd batch holds its transaction open (its run's lock) when the newer run's
    creation comes to reap it: the creation waits for the batch, which commits first; the
    reaping then fails the zombie, and its next batch is refused. The newer run's cleanup
    removes what the zombie's committed batch created and the newer run did not see, and
    nothing the newer run saw."""
    tenant = "zombie-b"
    seed(tenant, range(TOTAL))
    zombie = services.create_run(tenant)
    zombie_indexes = [*range(0, 100), *range(1000, 1050), *range(100, 1000)]
    z = start_worker(
        "zombie",
        tmp_path,
        run_id=zombie.pk,
        indexes=zombie_indexes,
        page=PAGE,
        pause_after=-1,
        hold_at=2,  # uids 1000-1049: new devices, which the newer run will not see
    )
    wait_until(lambda: (tmp_path / "zombie-held").exists(), what="the zombie's batch held open")
    # A stale threshold so short that the zombie counts as stale as soon as its heartbeat is
    # read: only the lock it holds keeps it alive until its batch commits.
    newer_indexes = list(range(0, 900))
    n = start_worker(
        "newer", tmp_path, tenant=tenant, indexes=newer_indexes, page=PAGE, stale_after=0.001
    )
    # The reaping's lock_state: the zombie's run row, locked by the zombie's open batch.
    wait_until(
        lambda: waiting_on_a_lock('FROM "runs_app_run" WHERE "runs_app_run"."id" ='),
        what="the newer run's creation waiting for the zombie's batch",
    )
    assert not (tmp_path / "newer-created").exists()
    (tmp_path / "zombie-go").write_text("1")
    newer = finish(n)
    result = finish(z)

    assert result["flush"] == "run_closed" and "late" not in result, result
    assert result["written"] == 3, result
    assert RunState.objects.get(run=zombie).status == RunStatus.FAILED
    assert RunFlushSession.objects.get(run=zombie).batches == 3
    assert (newer["status"], newer.get("removed")) == (RunStatus.COMPLETED, 150), newer
    stored = devices(tenant)
    assert set(stored) == {uid(i) for i in newer_indexes}
    assert set(stored.values()) == {newer["run"]}
    gone = {uid(i) for i in range(900, 1000)} | {uid(i) for i in range(1000, 1050)}
    assert sorted(removed_uids(newer["run"])) == sorted(gone)


# -- (c) two workers of one run, two models, one failing -----------------------------------------


def test_two_workers_of_one_run_on_two_models_one_failing_fail_the_run(tmp_path: Path) -> None:
    """Rounds of: one worker flushes 1,000 devices, the other the memberships; the memberships'
    source fails between two pages, at a different moment each round. Whoever completes first,
    the run fails, both cleanups refuse, nothing is deleted, nothing confirmed."""
    for round_, fail_after in enumerate((0, 3, 12)):
        tenant = f"shared-{round_}"
        seed(tenant, range(TOTAL))
        members_before = Membership.objects.count()
        run = services.create_run(tenant)
        directory = tmp_path / str(round_)
        directory.mkdir()
        a = start_worker(
            "shared",
            directory,
            run_id=run.pk,
            model="device",
            other="membership",
            indexes=list(range(TOTAL - 100)),
            page=PAGE,
        )
        b = start_worker(
            "shared",
            directory,
            run_id=run.pk,
            model="membership",
            other="device",
            indexes=list(range(round_ * 1000, round_ * 1000 + 1000)),
            page=PAGE,
            fail_after=fail_after,
        )
        results = [finish(a), finish(b)]
        state = RunState.objects.get(run=run)
        assert state.status == RunStatus.FAILED, results
        # Failed by the memberships' session, or by a completion that found it still open.
        assert state.flush_status in (FlushStatus.FAILED, FlushStatus.IN_PROGRESS), results
        assert results[0]["flush"] in ("closed", "FlushFailed", "RunClosed"), results
        assert results[1]["flush"] in ("FlushFailed", "RunClosed"), results
        assert [r.get("refused") for r in results] == ["flush_failed", "flush_failed"], results
        assert len(devices(tenant)) == TOTAL  # not one device lost
        assert not RunEvent.objects.filter(run=run, type__endswith=".removed").exists()
        assert not Device.objects.filter(last_confirmed_run=run).exists()
        assert not Membership.objects.filter(last_confirmed_run=run).exists()
        assert RunModelState.objects.get(run=run, model="tracked_app.membership").flush_status in (
            FlushStatus.FAILED,
            FlushStatus.IN_PROGRESS,
        )
        written = Membership.objects.filter(last_seen_run=run).count()
        assert written % PAGE == 0 and written <= fail_after * PAGE
        assert Membership.objects.count() == members_before + written


# -- lock order: a cleanup and a newer run's flush on non-ASCII text keys ------------------------


def test_a_cleanup_and_a_newer_flush_on_the_same_text_keys_never_deadlock(
    tmp_path: Path,
) -> None:
    """A cleanup of run 2 (memberships whose logins have accents, combining marks, CJK and astral
    characters) has made its plan when a newer run of the scope is created; then both go at
    once over nearly the same 18,000 rows: the cleanup locking its batch in key order
    (``COLLATE "C"``), the flush upserting its batch sorted by code point. One order for both,
    so one waits for the other but they never deadlock (with the cleanup's order reversed,
    PostgreSQL reports "deadlock detected"); every row the newer run saw survives, every other
    row is deleted with its audit."""
    scope = "org"
    all_members = list(range(MEMBERS))
    first = services.create_run(scope)
    with services.flush(first, Membership, batch_size=2000) as flush:
        flush.write(member_row(i, "v1") for i in all_members)
    services.complete_run(first)
    second = services.create_run(scope)
    with services.flush(second, Membership) as flush:
        flush.write(member_row(i, "v2") for i in range(0, MEMBERS, 10))
    second = services.complete_run(second)

    # One batch each, over nearly the same rows, both held at their first locking statement
    # and let go together: two transactions locking thousands of the same rows at once.
    cleaner = start_worker("cleaner", tmp_path, run_id=second.pk, model="membership", batch=MEMBERS)
    wait_until(lambda: (tmp_path / "cleaner-ready").exists(), what="the cleanup's batch picked")
    restamped = [i for i in all_members if i % 10 and i % 7]
    restamper = start_worker(
        "restamper", tmp_path, scope=scope, indexes=restamped, page=len(restamped)
    )
    wait_until(lambda: (tmp_path / "restamper-ready").exists(), what="the flush's batch ready")
    (tmp_path / "go").write_text("1")
    cleaned, newer = finish(cleaner), finish(restamper)

    assert newer["status"] == RunStatus.COMPLETED, newer
    assert "refused" not in cleaned, cleaned
    stored = {
        (repo, login): run
        for repo, login, run in Membership.objects.values_list("repo_id", "login", "last_seen_run")
    }
    seen_by_second = {member_key(i) for i in range(0, MEMBERS, 10)}
    seen_by_newer = {member_key(i) for i in restamped}
    # Exactly the rows a completed run saw last are left, each stamped by that run.
    assert set(stored) == seen_by_second | seen_by_newer
    assert all(stored[key] == second.pk for key in seen_by_second)
    assert all(stored[key] == newer["run"] for key in seen_by_newer)
    # Every row gone has one audit record; a re-stamped row was only deleted (and audited)
    # before the newer run wrote it again.
    records = [
        (record["repo_id"], record["login"])
        for event in RunEvent.objects.filter(run=second, type="tracked_app.membership.removed")
        for record in event.payload["rows"]
    ]
    deletable = {member_key(i) for i in all_members} - seen_by_second
    assert len(records) == len(set(records)) == cleaned["removed"]
    assert deletable - seen_by_newer <= set(records) <= deletable
    line = ledger(second.pk, "tracked_app.membership")
    assert (line.rows_removed, line.cleanup_status) == (cleaned["removed"], "done")


LOGINS = ["zoé", "Zoe", "ada", "éa", "ä", "日本", "\U0001f600", "e\u0301", "bob", "Ω"]


def member_key(index: int) -> tuple[int, str]:
    return index // len(LOGINS), LOGINS[index % len(LOGINS)]


def member_row(index: int, version: str) -> dict[str, Any]:
    repo_id, login = member_key(index)
    return {"repo_id": repo_id, "login": login, "role": version}
