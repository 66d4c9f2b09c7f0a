"""Database plumbing shared by the services: which alias, table names, vendor switches."""

from __future__ import annotations

from typing import Any

from django.db import connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from .models import Run


def db_alias() -> str:
    """The database the services write to (the router's choice for Run; usually "default")."""
    return router.db_for_write(Run) or "default"


def connection_for_write() -> BaseDatabaseWrapper:
    return connections[db_alias()]


def table(model: type[Model]) -> str:
    """The quoted table name of a model, for the few raw statements."""
    return connection_for_write().ops.quote_name(model._meta.db_table)


def is_postgresql() -> bool:
    return connection_for_write().vendor == "postgresql"


def column(field: Field[Any, Any]) -> str:
    """A concrete field's column name (``Field.column`` is None only for fields without one)."""
    if field.column is None:
        raise ValueError(f"{field!r} has no column")
    return field.column
