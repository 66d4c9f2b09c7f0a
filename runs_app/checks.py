"""System checks for the ``RUNS_APP`` settings and the database (ids ``runs_app.E0xx``/``W0xx``).

Each setting has one check id; ``manage.py check`` lists every problem at once, with a hint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.db import connections

from .conf import DEFAULTS, MAX_DURATION_SECONDS, user_settings
from .tracking import MAX_GRACE_RUNS

NOTIFY_CHANNEL_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float: finite, but no setting can use it
        return False


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _duration(value: Any) -> bool:
    return _positive_number(value) and value <= MAX_DURATION_SECONDS


DURATION = f"a positive number of seconds, at most {MAX_DURATION_SECONDS} (100 years)"


# key -> (check id, is the value valid?, what a valid value is)
SETTING_RULES: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "MAX_PAYLOAD_BYTES": ("runs_app.E003", _positive_int, "a positive integer (bytes)"),
    "FLUSH_BATCH_SIZE": ("runs_app.E004", _positive_int, "a positive integer (rows)"),
    "CLEANUP_BATCH_SIZE": ("runs_app.E005", _positive_int, "a positive integer (rows)"),
    "CLEANUP_MAX_DELETE_FRACTION": (
        "runs_app.E006",
        lambda v: _is_number(v) and 0 < v <= 1,
        "a number greater than 0 and at most 1",
    ),
    "CLEANUP_MAX_DELETE_COUNT": (
        "runs_app.E007",
        lambda v: v is None or (_is_int(v) and v >= 0),
        "None (no limit) or an integer >= 0",
    ),
    "RUN_STALE_AFTER": ("runs_app.E008", _duration, DURATION),
    "CLEANUP_GRACE_RUNS": (
        "runs_app.E023",
        lambda v: _is_int(v) and 1 <= v <= MAX_GRACE_RUNS,
        f"an integer from 1 to {MAX_GRACE_RUNS} (runs)",
    ),
    "TOMBSTONE_RETENTION": (
        "runs_app.E024",
        lambda v: v is None or _duration(v),
        "None or " + DURATION,
    ),
    "PUBLISHER": (
        "runs_app.E009",
        lambda v: isinstance(v, str) and "." in v and not v.startswith("."),
        'a dotted import path such as "runs_app.publishers.LoggingPublisher"',
    ),
    "PUBLISHER_OPTIONS": (
        "runs_app.E010",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        "a dict of keyword arguments for the publisher class",
    ),
    "DRAIN_BATCH_SIZE": ("runs_app.E011", _positive_int, "a positive integer (events)"),
    "DRAIN_MAX_BYTES": (
        "runs_app.E022",
        _positive_int,
        "a positive integer (bytes of event payloads read per claim)",
    ),
    "LEASE_SECONDS": ("runs_app.E012", _duration, DURATION),
    "MAX_ATTEMPTS": ("runs_app.E013", _positive_int, "a positive integer"),
    "RETRY_BASE_SECONDS": ("runs_app.E014", _duration, DURATION),
    "RETRY_MAX_SECONDS": (
        "runs_app.E015",
        _duration,
        "a positive number of seconds, at least RETRY_BASE_SECONDS, at most 3153600000",
    ),
    "POLL_INTERVAL": ("runs_app.E016", _duration, DURATION),
    "NOTIFY": ("runs_app.E017", lambda v: isinstance(v, bool), "True or False"),
    "NOTIFY_CHANNEL": (
        "runs_app.E018",
        lambda v: isinstance(v, str) and bool(NOTIFY_CHANNEL_PATTERN.match(v)),
        "a PostgreSQL identifier: a letter or _, then letters, digits or _, 63 at most",
    ),
}

SQLITE_MIN_VERSION = (3, 35, 0)


def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
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
    unknown = sorted(str(key) for key in configured if key not in DEFAULTS)
    if unknown:
        errors.append(
            checks.Error(
                f"RUNS_APP has unknown key(s): {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(DEFAULTS)}.",
                id="runs_app.E002",
            )
        )
    for key, (check_id, is_valid, expected) in SETTING_RULES.items():
        if key in configured and not is_valid(configured[key]):
            errors.append(
                checks.Error(
                    f"RUNS_APP[{key!r}] is {configured[key]!r}; it must be {expected}.",
                    hint=f"Fix it or remove it to use the default ({DEFAULTS[key]!r}).",
                    id=check_id,
                )
            )
    base = configured.get("RETRY_BASE_SECONDS", DEFAULTS["RETRY_BASE_SECONDS"])
    ceiling = configured.get("RETRY_MAX_SECONDS", DEFAULTS["RETRY_MAX_SECONDS"])
    if _duration(base) and _duration(ceiling) and ceiling < base:
        errors.append(
            checks.Error(
                f"RUNS_APP['RETRY_MAX_SECONDS'] ({ceiling!r}) is below "
                f"RETRY_BASE_SECONDS ({base!r}).",
                hint="The backoff ceiling must be at least the base delay.",
                id="runs_app.E015",
            )
        )
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
    path = configured.get("PUBLISHER", DEFAULTS["PUBLISHER"])
    options = configured.get("PUBLISHER_OPTIONS", DEFAULTS["PUBLISHER_OPTIONS"])
    for key, value in (("PUBLISHER", path), ("PUBLISHER_OPTIONS", options)):
        if not SETTING_RULES[key][1](value):
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
