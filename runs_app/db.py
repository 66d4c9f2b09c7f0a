"""Database plumbing shared by the services: which alias, table names, vendor switches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from .models import Run


def db_alias() -> str:
    """The database runs_app writes to: the routers' ``db_for_write`` for ``Run`` ("default"
    without routers). Every statement of the services and the relay runs there, their reads
    too (a read that feeds a write must see the write's transaction and never lag behind it),
    and every ``transaction.atomic`` of theirs is ``using`` it. The system checks require every
    runs_app model and tracked model to route there (``runs_app.E040``, ``E041``)."""
    return router.db_for_write(Run) or "default"


def db_alias_for_read() -> str:
    """The database for runs_app's read-only views: the routers' ``db_for_read`` for ``Run``
    (a replica, if the routers say so). Only for reads that feed no write and may lag a little
    behind it: ``runs_status`` (:func:`runs_app.inspection.health`). The admin's querysets
    follow the routers on their own (Django asks ``db_for_read``)."""
    return router.db_for_read(Run) or "default"


def connection_for_write() -> BaseDatabaseWrapper:
    """The connection of :func:`db_alias`: the one every raw statement of runs_app runs on,
    compiled for (``query.get_compiler(using=...)``), and quoted for."""
    return connections[db_alias()]


def table(model: type[Model]) -> str:
    """The quoted table name of a model, for the few raw statements."""
    return connection_for_write().ops.quote_name(model._meta.db_table)


def is_postgresql() -> bool:
    """Whether runs_app's database (not necessarily "default") is PostgreSQL."""
    return connection_for_write().vendor == "postgresql"


def column(field: Field[Any, Any]) -> str:
    """A concrete field's column name (``Field.column`` is None only for fields without one)."""
    if field.column is None:
        raise ValueError(f"{field!r} has no column")
    return field.column


def pg_array(values: Iterable[str | int | bool]) -> str:
    """A PostgreSQL array literal of ``values`` (``{"a","b"}``, ``{1,2}``, ``{t,f}``), passed as
    one text parameter cast to its array type (``%s::text[]``): the relay's per-pass arrays.
    Django's psycopg backend binds parameters on the client, and there a Python list is adapted
    and quoted element by element, about 0.15 ms per 100 values (0.5 ms of each pass's
    acknowledgement); this costs a fifth of that. Strings are double-quoted, with double quotes and
    backslashes escaped, so any text (commas, braces, ``NULL``) reads back as itself."""
    parts = []
    for value in values:
        if isinstance(value, bool):
            parts.append("t" if value else "f")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"
