"""Test helpers: table snapshots, statement fault injection, threads with their own connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from django.apps import apps
from django.core.management.base import BaseCommand, CommandParser
from django.db import OperationalError, connection, connections
from django.db.models import Model

from runs_app.models import (
    Project,
    Run,
    RunEvent,
    RunFlushSession,
    RunModelState,
    RunOutbox,
    RunState,
    TrackedModel,
)
from tests.relay_helpers import ROOT, database_url
from tests.tracked_app.models import Asset, Device, Membership, Site

# The tracked models last: children before parents, the order reset_tables deletes in.
TRACKED_MODELS = (Asset, Device, Membership, Site, Project)
ALL_MODELS = (Run, RunState, RunModelState, RunFlushSession, RunOutbox, RunEvent, *TRACKED_MODELS)


class InjectedFault(OperationalError):
    """Raised in place of a statement, like a dropped connection would."""


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of runs_app's tables and the tracked models', in primary-key order: equal
    snapshots mean nothing changed."""
    return {
        model.__name__: sorted(
            (tuple(sorted(row.items())) for row in model.objects.values()), key=repr
        )
        for model in ALL_MODELS
    }


class StatementCounter:
    """``connection.execute_wrapper`` that counts statements and fails the ``fail_at``-th one."""

    def __init__(self, fail_at: int | None = None, *, writes_only: bool = False) -> None:
        self.fail_at = fail_at
        self.writes_only = writes_only
        self.count = 0
        self.statements: list[str] = []

    @staticmethod
    def is_write(sql: str) -> bool:
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        return head in {"INSERT", "UPDATE", "DELETE", "WITH"} or "FOR UPDATE" in sql.upper()

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        if not self.writes_only or self.is_write(sql):
            self.count += 1
            self.statements.append(sql)
            if self.fail_at is not None and self.count == self.fail_at:
                raise InjectedFault(f"injected fault at statement {self.count}: {sql[:80]}")
        return execute(sql, params, many, context)


@contextmanager
def failing_statement(k: int, *, writes_only: bool = False) -> Iterator[StatementCounter]:
    counter = StatementCounter(k, writes_only=writes_only)
    with connection.execute_wrapper(counter):
        yield counter


def assert_atomic_under_faults(
    action: Callable[[], Any], *, writes_only: bool = False, max_statements: int = 500
) -> int:
    """Fail the k-th statement of ``action`` for k = 1, 2, ... until it runs to the end.

    After each injected failure, no row of the five tables may have changed. Returns how many
    faults were injected (the number of statements the action executes), at least one.
    """
    for k in range(1, max_statements + 1):
        before = snapshot()
        raised = False
        with failing_statement(k, writes_only=writes_only) as counter:
            try:
                action()
            except InjectedFault:
                raised = True
        if not raised:
            assert counter.count < k, f"statement {k} ran but the fault did not surface"
            assert k > 1, "the action executed no statement at all"
            return k - 1
        assert snapshot() == before, f"partial write after a fault at statement {k}"
    raise AssertionError(f"action still failing after {max_statements} statements")


def run_in_threads(target: Callable[[int], Any], count: int, timeout: float = 60) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads, each closing its own connection; re-raise errors."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        try:
            start.wait(timeout)
            results[index] = target(index)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a worker thread did not finish in time"
    if errors:
        raise errors[0]
    return results


def reset_tables() -> None:
    """Delete every row of runs_app's tables and the tracked models' (children first)."""
    for model in (
        *TRACKED_MODELS,
        RunEvent,
        RunOutbox,
        RunModelState,
        RunFlushSession,
        RunState,
        Run,
    ):
        model.objects.all().delete()


def caused_by_fault(exc: BaseException | None) -> bool:
    """True if ``exc`` is an injected fault or chained (cause or context) to one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InjectedFault):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def check_under_faults(
    setup: Callable[[], Any],
    action: Callable[[Any], Any],
    check: Callable[[Any, bool], None],
    *,
    max_statements: int = 500,
) -> int:
    """``assert_atomic_under_faults`` for actions made of several transactions (a flush of
    several batches, a cleanup of several batches), where earlier transactions may legitimately
    have committed when a later one fails.

    For k = 1, 2, ...: reset the tables, ``context = setup()``, run ``action(context)`` with its
    k-th statement failing, then ``check(context, faulted)`` proves the invariants (e.g. no
    partial batch). An exception from the action must be the fault or chained to it. Returns how
    many statements the action executes. Needs ``django_db(transaction=True)``.
    """
    for k in range(1, max_statements + 1):
        reset_tables()
        context = setup()
        faulted = False
        with failing_statement(k) as counter:
            try:
                action(context)
            except Exception as exc:
                if not caused_by_fault(exc):
                    raise
                faulted = True
        check(context, faulted)
        if not faulted:
            assert counter.count < k, f"statement {k} ran but the fault did not surface"
            assert k > 1, "the action executed no statement at all"
            return k - 1
    raise AssertionError(f"action still failing after {max_statements} statements")


def project_rows(keys: Iterable[str], version: str = "v1") -> list[dict[str, Any]]:
    """Input rows for flush_projects: ``{"key": k, "name": "Name k", "data": {"v": version}}``."""
    return [{"key": key, "name": f"Name {key}", "data": {"v": version}} for key in keys]


def keys(start: int, stop: int) -> list[str]:
    return [f"p{index:03d}" for index in range(start, stop)]


def synced_run(scope: str, project_keys: Iterable[str], version: str = "v1") -> Run:
    """A completed run of ``scope`` that flushed ``project_keys``."""
    from runs_app import services

    run = services.create_run(scope)
    services.flush_projects(run, project_rows(project_keys, version))
    return services.complete_run(run)


def stored(scope: str) -> dict[str, tuple[str, Any, str | None]]:
    """The scope's projects: key -> (name, data, last_seen_run_id)."""
    return {
        project.key: (project.name, project.data, project.last_seen_run_id)
        for project in Project.objects.filter(scope=scope)
    }


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@contextmanager
def temporary_tracked_model(
    name: str, attributes: dict[str, Any], meta: dict[str, Any] | None = None
) -> Iterator[type[Model]]:
    """A tracked model of the suite's ``tracked_app`` that exists for one block: its class
    (``TrackedModel`` with ``attributes``: fields and the sync declaration), then its table;
    afterwards the table is dropped and the model unregistered, so no other test sees it. For
    models a test needs once (a declaration the suite's own models do not have). Needs
    ``django_db(transaction=True)`` (a schema change cannot run inside the test's transaction on
    SQLite)."""
    options = type("Meta", (), {"app_label": "tracked_app", **(meta or {})})
    # Its fields exist only at run time: mypy knows it as a Model, not by its fields.
    model: type[Model] = type(
        name,
        (TrackedModel,),
        {"__module__": "tests.tracked_app.models", "Meta": options, **attributes},
    )
    try:
        with connection.schema_editor() as editor:
            editor.create_model(model)
        try:
            yield model
        finally:
            with connection.schema_editor() as editor:
                editor.delete_model(model)
    finally:
        # model_name is set on every model class (django-stubs types it optional).
        del apps.all_models["tracked_app"][cast("str", model._meta.model_name)]
        apps.clear_cache()


def finish_worker(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Wait for a worker process (killed after ``timeout`` seconds); it must exit 0 and print
    its result as JSON on its last line of output, which is returned."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("a worker process did not finish in time") from None
    assert process.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def shell_parser(command: BaseCommand, name: str) -> CommandParser:
    """``command``'s parser as ``manage.py name`` from a shell builds it: a bad argument exits 2
    (``SystemExit``) with argparse's message instead of raising ``CommandError``."""
    # The flag run_from_argv sets; django-stubs does not declare it.
    command._called_from_command_line = True  # type: ignore[attr-defined]
    return command.create_parser("manage.py", name)


#: The start of every worker script (``Workers``): Django set up with the suite's settings,
#: ``role`` and ``args`` from the command line, ``out`` (the JSON line a worker prints), and the
#: marker files two processes meet at (``wait_for(name)``, ``mark(name)``).
WORKER_PRELUDE = r"""
import json, sys, time, uuid
from pathlib import Path
import django
django.setup()

role, args = sys.argv[1], json.loads(sys.argv[2])
directory = Path(args["dir"])
out = {"role": role}

def wait_for(name, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not (directory / name).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{role}: timed out waiting for {name}")
        time.sleep(0.01)  # the poll's interval; the marker is the condition

def mark(name):
    (directory / name).write_text("1")
"""


class Workers:
    """Worker processes of a test module: ``python -c SCRIPT ROLE JSON`` running Django with the
    suite's settings on the test's database. ``kill_leftovers()`` (from the module's autouse
    fixture) kills any still alive when a test ends, e.g. one a failed assertion left waiting
    for a marker, so no worker outlives its test."""

    def __init__(self, script: str, settings: str = "tests.settings") -> None:
        self.script = script
        self.settings = settings
        self.running: list[subprocess.Popen[str]] = []

    def start(self, role: str, directory: Path, **args: Any) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "DJANGO_SETTINGS_MODULE": self.settings,
            "PYTHONPATH": str(ROOT),
        }
        process = subprocess.Popen(
            [sys.executable, "-c", self.script, role, json.dumps({"dir": str(directory), **args})],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.running.append(process)
        return process

    def kill_leftovers(self) -> None:
        while self.running:
            process = self.running.pop()
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)


def waiting_on_a_lock(*statements: str) -> bool:
    """A backend of the test database waits on a lock, running a statement containing one of
    ``statements``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND pid <> pg_backend_pid() "
            "AND EXISTS (SELECT 1 FROM unnest(%s::text[]) s WHERE position(s in query) > 0)",
            [list(statements)],
        )
        return bool(cursor.fetchone()[0])
