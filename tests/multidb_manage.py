"""``manage.py`` for the multi-database tests, with a guard on the connections that runs_app must
not use: ``python -m tests.multidb_manage <command> ...`` (settings: ``tests.multidb_settings``
unless ``DJANGO_SETTINGS_MODULE`` says otherwise).

- ``default`` refuses every statement that names a table of a model routed elsewhere (runs_app's
  and the tracked models') and every ``pg_notify``/``LISTEN``: a statement compiled or sent for
  the wrong alias fails loudly instead of finding an empty table or waking nobody.
- ``replica`` (when the settings have one) refuses writes, and reads while this thread holds a
  transaction on ``runs``.

A refusal raises :class:`StrayStatement` and is also appended, as a JSON line, to the file named
by ``MULTIDB_VIOLATIONS``, so a test sees it even where the code under test handles the error.
The guard is installed on each connection as it connects (every thread's, every reconnection).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

RUNS = "runs"
REPLICA = "replica"

_WRITE = re.compile(r"^\s*(insert|update|delete|replace)\b|\bfor\s+update\b|\bupdate\s+\S+\s+set\b")


class StrayStatement(RuntimeError):
    """A statement on a connection that runs_app must not use for it."""


def _refuse(alias: str, problem: str, sql: str) -> None:
    path = os.environ.get("MULTIDB_VIOLATIONS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"alias": alias, "problem": problem, "sql": sql[:500]}) + "\n")
    raise StrayStatement(f"{problem} on {alias!r}: {sql[:300]}")


@cache
def _forbidden_on_default() -> tuple[str, ...]:
    from django.apps import apps
    from django.db import router

    tables = {
        model._meta.db_table.lower()
        for model in apps.get_models(include_auto_created=True)
        if (router.db_for_write(model) or "default") != "default"
    }
    return (*sorted(tables), "pg_notify", "listen ")


def _guard_default(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    text = sql.lower()
    for needle in _forbidden_on_default():
        if needle in text:
            _refuse("default", f"statement about {needle!r}", sql)
    return execute(sql, params, many, context)


def _guard_replica(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    from django.db import connections

    if _WRITE.search(sql.lower()):
        _refuse(REPLICA, "write", sql)
    if connections[RUNS].in_atomic_block:
        _refuse(REPLICA, f"read inside a transaction on {RUNS!r}", sql)
    return execute(sql, params, many, context)


_GUARDS = {"default": _guard_default, REPLICA: _guard_replica}


def _install(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    guard = _GUARDS.get(connection.alias)
    if guard is not None and guard not in connection.execute_wrappers:
        connection.execute_wrappers.append(guard)


def install_guard() -> None:
    connection_created.connect(_install, weak=False, dispatch_uid="tests.multidb_manage")


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.multidb_settings")
    install_guard()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
