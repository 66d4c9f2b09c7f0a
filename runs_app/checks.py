"""System checks for the ``RUNS_APP`` settings and the database.

``manage.py check`` lists every problem at once, each with a hint. Every id means one thing:

- ``runs_app.E001``: ``RUNS_APP`` is not a dict.
- ``runs_app.E002``: ``RUNS_APP`` has unknown keys.
- ``runs_app.E003`` ... ``E018``, ``E022`` ... ``E024``: one setting's value is invalid, one id
  per setting (``Setting.check_id`` in ``conf.RunsAppSettings``): E003 MAX_PAYLOAD_BYTES,
  E004 FLUSH_BATCH_SIZE, E005 CLEANUP_BATCH_SIZE, E006 CLEANUP_MAX_DELETE_FRACTION,
  E007 CLEANUP_MAX_DELETE_COUNT, E008 RUN_STALE_AFTER, E009 PUBLISHER, E010 PUBLISHER_OPTIONS,
  E011 DRAIN_BATCH_SIZE, E012 LEASE_SECONDS, E013 MAX_ATTEMPTS, E014 RETRY_BASE_SECONDS,
  E015 RETRY_MAX_SECONDS, E016 POLL_INTERVAL, E017 NOTIFY, E018 NOTIFY_CHANNEL,
  E022 DRAIN_MAX_BYTES, E023 CLEANUP_GRACE_RUNS, E024 TOMBSTONE_RETENTION.
- ``runs_app.E020``: SQLite is older than 3.35.
- ``runs_app.E021``: the publisher does not import or build.
- ``runs_app.E025``: RETRY_MAX_SECONDS is below RETRY_BASE_SECONDS (a relation between two
  settings, checked once both are valid on their own: ``RELATIONS``).
- ``runs_app.W001``: SQLite without ``transaction_mode`` IMMEDIATE.
- ``runs_app.E040``: a runs_app model is routed to another database than ``runs_app.Run``.
- ``runs_app.E041``: a tracked model is routed to another database than runs_app's.

The checks of tracked models' declarations (E030 ...) live in ``runs_app.tracking``. A new
check takes the next free id, never one that already means something.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.db import connections

from .conf import SETTINGS, user_settings


@dataclass(frozen=True)
class Relation:
    """A rule between settings, checked only when each of ``keys`` is valid on its own (its own
    id says so otherwise). ``problem`` gets the effective values by key and returns the message,
    or None when the rule holds."""

    check_id: str
    keys: tuple[str, ...]
    problem: Callable[[dict[str, Any]], str | None]
    hint: str


def _retry_ceiling_below_base(values: dict[str, Any]) -> str | None:
    base, ceiling = values["RETRY_BASE_SECONDS"], values["RETRY_MAX_SECONDS"]
    if ceiling >= base:
        return None
    return f"RUNS_APP['RETRY_MAX_SECONDS'] ({ceiling!r}) is below RETRY_BASE_SECONDS ({base!r})."


RELATIONS: tuple[Relation, ...] = (
    Relation(
        check_id="runs_app.E025",
        keys=("RETRY_BASE_SECONDS", "RETRY_MAX_SECONDS"),
        problem=_retry_ceiling_below_base,
        hint="The backoff ceiling must be at least the base delay: raise RETRY_MAX_SECONDS "
        "or lower RETRY_BASE_SECONDS.",
    ),
)

SQLITE_MIN_VERSION = (3, 35, 0)


def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """E001, E002, one id per invalid setting, then the relations (E025...)."""
    configured = user_settings()
    if not isinstance(configured, dict):
        return [
            checks.Error(
                f"RUNS_APP must be a dict, not {type(configured).__name__}.",
                hint="Set RUNS_APP = {...} in your settings, or remove it to use the defaults.",
                id="runs_app.E001",
            )
        ]
    errors: list[Any] = []
    unknown = sorted(str(key) for key in configured if key not in SETTINGS)
    if unknown:
        errors.append(
            checks.Error(
                f"RUNS_APP has unknown key(s): {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(SETTINGS)}.",
                id="runs_app.E002",
            )
        )
    values: dict[str, Any] = {}
    for key, setting in SETTINGS.items():
        value = configured.get(key, setting.default)
        if setting.is_valid(value):
            values[key] = value
            continue
        errors.append(
            checks.Error(
                f"RUNS_APP[{key!r}] is {value!r}; it must be {setting.expected}.",
                hint=setting.hint
                or f"Fix it or remove it to use the default ({setting.default!r}).",
                id=setting.check_id,
            )
        )
    for relation in RELATIONS:
        if not all(key in values for key in relation.keys):
            continue
        message = relation.problem(values)
        if message is not None:
            errors.append(checks.Error(message, hint=relation.hint, id=relation.check_id))
    return errors


def check_database(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """On runs_app's database (the routers' choice for writes, not necessarily "default"):
    SQLite needs RETURNING (3.35+) and, for safe concurrent writers, IMMEDIATE transactions.
    Reads the connection's settings only: no connection is opened."""
    from .db import db_alias  # the database the services write to

    alias = db_alias()
    connection = connections[alias]
    if connection.vendor != "sqlite":
        return []
    import sqlite3

    problems: list[Any] = []
    if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
        problems.append(
            checks.Error(
                f"SQLite {sqlite3.sqlite_version} is too old for runs_app.",
                hint="runs_app needs SQLite 3.35 or newer (UPDATE ... RETURNING).",
                id="runs_app.E020",
            )
        )
    options = connection.settings_dict.get("OPTIONS", {})
    if str(options.get("transaction_mode", "")).upper() != "IMMEDIATE":
        problems.append(
            checks.Warning(
                f"runs_app's database ({alias!r}) is SQLite without transaction_mode IMMEDIATE.",
                hint=(
                    f'Set DATABASES["{alias}"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE" '
                    "so concurrent writers wait for each other instead of failing with "
                    '"database is locked".'
                ),
                id="runs_app.W001",
            )
        )
    return problems


def check_database_routing(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[Any]:
    """E040: every runs_app model is written to one database (each service's transaction is on
    one connection). E041: so is every tracked model (its run stamps are foreign keys to
    ``Run``, and flush, completion and cleanup write its rows in runs_app's transactions).
    Asks the routers only (``db_for_write``): no connection is opened."""
    from django.apps import apps
    from django.db import router

    from .db import db_alias
    from .tracking import is_tracked, model_label

    alias = db_alias()
    problems: list[Any] = []
    for model in apps.get_models():
        target = router.db_for_write(model) or "default"
        if target == alias:
            continue
        if is_tracked(model):
            problems.append(
                checks.Error(
                    f"The tracked model {model_label(model)} is routed to the database "
                    f"{target!r}, runs_app to {alias!r}.",
                    hint=(
                        "A tracked model must live on runs_app's database: its last_seen_run "
                        "and last_confirmed_run are foreign keys to runs_app.Run, and runs_app "
                        "writes its rows in its own transactions. Route it (db_for_write, "
                        f"db_for_read, allow_migrate) to {alias!r} like runs_app's models."
                    ),
                    obj=model,
                    id="runs_app.E041",
                )
            )
        elif model._meta.app_label == "runs_app":
            problems.append(
                checks.Error(
                    f"runs_app.{model.__name__} is routed to the database {target!r}, "
                    f"runs_app.Run to {alias!r}.",
                    hint=(
                        "Route every model of the app label 'runs_app' to one database: "
                        "db_for_write must answer the same alias for all of them."
                    ),
                    obj=model,
                    id="runs_app.E040",
                )
            )
    return problems


def check_publisher(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """E021: the publisher must import and build. Only builds it (then closes it): publishers
    connect lazily, in ``publish``, so the check never touches a broker."""
    configured = user_settings()
    if not isinstance(configured, dict):
        return []  # E001 says so already
    path = configured.get("PUBLISHER", SETTINGS["PUBLISHER"].default)
    options = configured.get("PUBLISHER_OPTIONS", SETTINGS["PUBLISHER_OPTIONS"].default)
    for key, value in (("PUBLISHER", path), ("PUBLISHER_OPTIONS", options)):
        if not SETTINGS[key].is_valid(value):
            return []  # E009/E010 say so already
    from .exceptions import PublisherError
    from .publishers import close_publisher, load_publisher

    try:
        close_publisher(load_publisher(path, options))
    except PublisherError as exc:
        return [
            checks.Error(
                str(exc),
                hint=(
                    "RUNS_APP['PUBLISHER'] must name an importable class built as "
                    "Class(**RUNS_APP['PUBLISHER_OPTIONS']), with a publish(messages) method; "
                    "check the path, the installed packages and the option names."
                ),
                id="runs_app.E021",
            )
        ]
    return []
